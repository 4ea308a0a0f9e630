"""Commands of the method's offline pipeline: concepts, phrases, OTI, phi training."""

from __future__ import annotations

import argparse
from pathlib import Path

from isearle.cli.common import (
    add_backbone_arguments,
    add_decode_argument,
    add_oti_arguments,
    add_preset_argument,
    add_source_arguments,
    backbone_from,
    decode_from,
    oti_config_from,
    source_from,
)


def add_concepts_arguments(p: argparse.ArgumentParser) -> None:
    add_backbone_arguments(p)
    add_source_arguments(p)
    p.add_argument("--vocabulary", default="openimages", help="openimages, imagenet, shapes, or a text file (one concept a line)")
    p.add_argument("--top-k", type=int, default=250, help="concepts kept per image (SEARLE stores 250)")
    add_decode_argument(p, default="searle")
    p.add_argument("--out", type=Path, required=True, help="JSON file: {image id: [concepts, best first]}")


def concepts_main(args: argparse.Namespace) -> int:
    from isearle.artifacts import write_json
    from isearle.concepts import concept_bank
    from isearle.images import extract_readable

    backbone = backbone_from(args)
    bank = concept_bank(backbone, args.vocabulary)
    ids, items = source_from(args, backbone.image_size)
    rows, feats, bad = extract_readable(backbone, items, decode=args.decode)
    names = bank.top_names(feats, args.top_k)
    write_json(args.out, dict(zip([ids[r] for r in rows], names, strict=True)))
    skipped = f" ({len(bad)} unreadable skipped: see the log)" if bad else ""
    print(f"wrote the top {args.top_k} of {len(bank.names)} concepts for {len(rows)} images to {args.out}{skipped}")
    return 0


# ------------------------------------------------------------------------------------ phrases
def add_phrases_arguments(p: argparse.ArgumentParser) -> None:
    from isearle.phrases import LMConfig

    d = LMConfig()
    add_preset_argument(p)
    p.add_argument("--vocabulary", default="openimages", help="openimages, imagenet, shapes, or a text file")
    p.add_argument("--generator", choices=["lm", "offline"], default="lm",
                   help="lm: a transformers causal LM (paper: GPT-Neo 2.7B); offline: no download")
    p.add_argument("--lm-model", default=d.model, help="causal LM for --generator lm")
    p.add_argument("--samples", type=int, default=d.samples, help=f"phrases sampled per concept (paper: {d.samples})")
    p.add_argument("--batch-size", type=int, default=d.batch_size,
                   help=f"sequences per generate call (SEARLE: {d.batch_size}, all of a concept at once)")
    p.add_argument("--device", default=None, help="cuda or cpu for --generator lm (default: cuda, fp16, when present)")
    p.add_argument("--limit", type=int, default=None, help="only the first N concepts (quick runs)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--out", type=Path, required=True,
                   help="JSON cache {concept: [phrases]}; a killed run resumes there, concept by concept")


def phrases_main(args: argparse.Namespace) -> int:
    from isearle.concepts import load_vocabulary
    from isearle.phrases import LMConfig, generate_phrases, lm_generator, offline_generator
    from isearle.presets import preset
    from isearle.shapes.captions import phrase_generator

    concepts = load_vocabulary(args.vocabulary)[: args.limit]
    settings: dict = {"generator": args.generator, "vocabulary": args.vocabulary, "samples": args.samples,
                      "seed": args.seed}
    if args.generator == "lm":
        lm = LMConfig(model=args.lm_model, samples=args.samples, batch_size=args.batch_size, seed=args.seed,
                      device=args.device)
        settings["lm"] = {k: v for k, v in vars(lm).items() if k not in ("device", "batch_size")}
        gen = lm_generator(lm)
    else:
        gen = (phrase_generator(args.samples, args.seed) if args.vocabulary == "shapes"
               else offline_generator(min(args.samples, 16), args.seed))
    style = preset(args.preset).phrases
    bank = generate_phrases(concepts, gen, cache=args.out, style=style, settings=settings)
    kept = sum(1 for v in bank.values() if v)
    print(f"{kept} of {len(bank)} concepts kept, {sum(map(len, bank.values()))} phrases ({style} style) in {args.out}")
    return 0


# ---------------------------------------------------------------------------------------- oti
def add_oti_command_arguments(p: argparse.ArgumentParser) -> None:
    add_backbone_arguments(p)
    add_source_arguments(p)
    add_oti_arguments(p)
    p.add_argument("--phi", default=None, help="warm start from this phi (then fewer --steps suffice)")
    p.add_argument("--ray", action="store_true", help="run on Ray Data (local Ray unless --ray-address)")
    p.add_argument("--ray-address", default=None, help="Ray cluster address")
    add_decode_argument(p)
    p.add_argument("--out", type=Path, required=True, help="output folder; an interrupted run resumes there")


def oti_main(args: argparse.Namespace) -> int:
    from isearle.concepts import concept_bank
    from isearle.oti_runs import invert_images
    from isearle.phi import load_phi
    from isearle.phrases import load_phrase_bank

    backbone = backbone_from(args)
    config = oti_config_from(args, device=backbone.device)
    ids, items = source_from(args, backbone.image_size)
    bank = load_phrase_bank(args.phrases) if args.phrases else None
    phi = load_phi(args.phi, backbone.device, backbone) if args.phi else None
    concepts = concept_bank(backbone, args.vocabulary)
    if args.ray:
        from isearle.scale import ray_oti

        ids, tokens = ray_oti(backbone, ids, items, args.out, config, concepts, bank, phi,
                              address=args.ray_address, decode=decode_from(args))
    else:
        ids, tokens = invert_images(backbone, ids, items, args.out, config, concepts, bank, phi,
                                    decode=decode_from(args))
    print(f"{len(ids)} pseudo-tokens of width {tokens.shape[1]} in {args.out}")
    return 0


# ---------------------------------------------------------------------------------- train-phi
def add_train_phi_arguments(p: argparse.ArgumentParser) -> None:
    from isearle.phi_training import PhiTrainConfig

    d = PhiTrainConfig()
    add_backbone_arguments(p)
    add_preset_argument(p)
    p.add_argument("--oti", type=Path, nargs="+", required=True,
                   help="folder(s) of `isearle oti` runs (features, concepts, tokens); several are concatenated")
    p.add_argument("--phrases", type=Path, default=None, help="phrase JSON for the GPT loss (none: distillation only)")
    p.add_argument("--epochs", type=int, default=None, help=f"training epochs (paper: {d.epochs})")
    p.add_argument("--batch-size", type=int, default=None,
                   help=f"batch size (paper: {d.batch_size}; the last partial batch is dropped)")
    p.add_argument("--lr", type=float, default=None, help=f"AdamW learning rate ({d.lr})")
    p.add_argument("--temperature", type=float, default=None, help=f"NT-Xent temperature ({d.temperature})")
    p.add_argument("--lambda-gpt", type=float, default=None, help=f"weight of the GPT phrase loss ({d.lambda_gpt})")
    p.add_argument("--lambda-reg", type=float, default=None, help="weight of iSEARLE's token penalty (default: the preset's)")
    p.add_argument("--reg-form", choices=["norm", "knn", "none"], default=None,
                   help="form of the token penalty (default: the preset's)")
    p.add_argument("--reg-norm", type=float, default=None,
                   help="'norm' penalty target in units of the mean token-embedding norm (match OTI's --max-norm)")
    p.add_argument("--no-hard-negatives", action="store_true", help="random batches (SEARLE) instead of similar images")
    p.add_argument("--seed", type=int, default=None, help="seed")
    p.add_argument("--val-every", type=int, default=None,
                   help="validate every N epochs; --out then keeps the best epoch, OUT.last.safetensors the last")
    p.add_argument("--val-benchmark", choices=["shapes", "cirr", "circo"], default="shapes",
                   help="validation benchmark (val split): shapes (offline) or cirr / circo with --val-data")
    p.add_argument("--val-data", type=Path, default=None, help="dataset folder of --val-benchmark (official layout)")
    p.add_argument("--val-metric", default=None, help="metric to maximise (default: R@1 for cirr, mAP@10 otherwise)")
    p.add_argument("--save-frequency", type=int, default=0,
                   help="keep phi every N epochs as OUT.epochNNN.safetensors (SEARLE: 5; 0: none); "
                        "OUT.metrics.csv gets every epoch's losses and validation")
    from isearle.precision import COMPUTE_PRECISION_HELP, add_compute_precision_argument

    add_compute_precision_argument(p, help="phi training's " + COMPUTE_PRECISION_HELP.replace(
        "default: fp16 on CUDA, fp32 on CPU", "default: fp16 on CUDA, fp32 on CPU, as SEARLE's train_phi.py"))
    p.add_argument("--out", type=Path, required=True,
                   help="phi checkpoint (.safetensors, settings in its metadata); a killed run resumes from "
                        "OUT.training.safetensors")


def train_phi_main(args: argparse.Namespace) -> int:
    from isearle.evaluation import phi_validator
    from isearle.oti_runs import load_runs
    from isearle.phi_training import Selection, TrainingRecords, save_trained, train_phi
    from isearle.phrases import load_phrase_bank
    from isearle.presets import preset

    backbone = backbone_from(args)
    ids, features, tokens, concepts, oti = load_runs(args.oti, backbone)
    config = preset(args.preset).phi_config(
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, temperature=args.temperature,
        lambda_gpt=args.lambda_gpt, lambda_reg=args.lambda_reg, reg_form=args.reg_form, reg_norm=args.reg_norm,
        hard_negatives=False if args.no_hard_negatives else None, seed=args.seed, val_every=args.val_every,
        precision=args.precision or preset(args.preset).precision(backbone.device))
    bank = load_phrase_bank(args.phrases) if args.phrases else None
    validate = selection = None
    if config.val_every:
        validate = phi_validator(backbone, args.val_benchmark, args.val_data, args.val_metric)
        selection = Selection()
    state = args.out.with_name(args.out.stem + ".training.safetensors")  # resumable: kept until phi is saved
    base = {"backbone": backbone.name, "pretrained": backbone.pretrained, "oti": oti, "preset": args.preset,
            "train": vars(config)}
    records = TrainingRecords(args.out, args.save_frequency, base)
    phi, history = train_phi(backbone, features, tokens, config, concepts, bank, validate=validate,
                             selection=selection, checkpoint=state, records=records)
    extra = {**base, "final_losses": history[-1] if history else {}, "val": [h["val"] for h in history if "val" in h]}
    paths = save_trained(phi, args.out, extra, selection)
    state.unlink(missing_ok=True)
    best = f"; best validation {selection.metric:.2f} at epoch {selection.epoch}" if selection and selection.state else ""
    print(f"phi trained on {len(ids)} images; last epoch losses {history[-1] if history else {}}{best}; "
          f"saved {', '.join(map(str, paths))}")
    return 0
