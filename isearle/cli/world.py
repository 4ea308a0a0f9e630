"""Commands of the offline world: `isearle train-clip` (the tiny CLIP) and `isearle build-shapes` (ShapesCIR)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_train_clip_arguments(p: argparse.ArgumentParser) -> None:
    """Options of `isearle train-clip`."""
    from isearle.clip_training import TrainConfig

    d = TrainConfig()
    p.add_argument("--model", default=d.model, help="open_clip config name (default: the bundled isearle-shapes)")
    p.add_argument("--steps", type=int, default=d.steps, help="training steps")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="batch size")
    p.add_argument("--lr", type=float, default=d.lr, help="peak AdamW learning rate")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay")
    p.add_argument("--warmup", type=int, default=d.warmup, help="linear warmup steps")
    p.add_argument("--time-budget", type=float, default=d.time_budget_min,
                   help="minutes: the cosine schedule ends by then even if steps remain (0: off)")
    p.add_argument("--scenes", type=int, default=d.n_scenes, help="training scenes rendered into the cache")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of scenes, captions and batches")
    p.add_argument("--caption-weights", type=float, nargs=4, default=list(d.caption_weights),
                   metavar=("FULL", "PARTIAL", "CLAUSE", "EDIT"), help="sampling weights of the caption forms")
    p.add_argument("--composite", type=float, default=d.composite,
                   help="share of captions with one composite word standing for a description (0: off)")
    from isearle.precision import COMPUTE_PRECISION_HELP, add_compute_precision_argument

    add_compute_precision_argument(p, default=d.precision,
                                   help=COMPUTE_PRECISION_HELP.replace("default: fp16 on CUDA, fp32 on CPU",
                                                                       f"default: {d.precision}"))
    p.add_argument("--threads", type=int, default=d.threads, help="torch threads (0: all CPUs of this process)")
    p.add_argument("--out-dir", default=d.out_dir, help="checkpoint folder (last.safetensors)")
    p.add_argument("--resume", action="store_true", help="continue from OUT_DIR/last.safetensors")
    p.add_argument("--eval-every", type=int, default=d.eval_every, help="steps between zero-shot evaluations (0: off)")
    p.add_argument("--eval-scenes", type=int, default=d.eval_scenes, help="held-out scenes of the zero-shot R@1")
    p.add_argument("--export", default=d.export, help="fp16 safetensors written at the end")
    p.add_argument("--eval-only", default=None, metavar="WEIGHTS",
                   help="only measure zero-shot R@1 of these weights ('isearle-shapes': the bundled ones)")


def train_clip_main(args: argparse.Namespace) -> int:
    """`isearle train-clip`: train + export, or with --eval-only measure R@1 of existing weights."""
    from isearle.backbone import load_backbone
    from isearle.clip_training import TrainConfig, evaluate_zero_shot, train_tiny_clip
    from isearle.runtime import set_threads

    if args.eval_only:
        set_threads(args.threads, faiss_threads=None)
        backbone = load_backbone(args.model, args.eval_only, device="cpu")
        print(json.dumps(evaluate_zero_shot(backbone, n=args.eval_scenes)))
        return 0
    config = TrainConfig(model=args.model, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                         weight_decay=args.weight_decay, warmup=args.warmup, time_budget_min=args.time_budget,
                         n_scenes=args.scenes, seed=args.seed, caption_weights=tuple(args.caption_weights),
                         precision=args.precision, composite=args.composite, threads=args.threads, out_dir=args.out_dir,
                         resume=args.resume, eval_every=args.eval_every, eval_scenes=args.eval_scenes,
                         export=args.export)
    train_tiny_clip(config)
    return 0


def add_build_arguments(p: argparse.ArgumentParser) -> None:
    """Options of `isearle build-shapes`."""
    from isearle.shapes.benchmark import BENCHMARK_DIR

    p.add_argument("--out", type=Path, default=BENCHMARK_DIR, help="output folder (default: assets/shapescir)")
    p.add_argument("--seed", type=int, default=0, help="seed of both splits and the gallery")
    p.add_argument("--val", type=int, default=160, help="val queries (balanced over the 8 edit types)")
    p.add_argument("--test", type=int, default=640, help="test queries (balanced over the 8 edit types)")
    p.add_argument("--gallery", type=int, default=2000, help="random gallery scenes besides the queries' images (>= 2000)")


def build_main(args: argparse.Namespace) -> int:
    """`isearle build-shapes`."""
    from isearle.shapes.benchmark import build_benchmark

    stats = build_benchmark(args.out, args.seed, args.val, args.test, args.gallery)
    print(json.dumps(stats, indent=2))
    return 0
