"""`isearle` command line: parses arguments and calls the library, nothing else.

Each sub-command is (name, help, add-arguments function, run function); commands owned by other
modules are imported lazily so that `isearle --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

# torch and FAISS each bring an OpenMP runtime; spinning idle threads of one starve the other.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

DEFAULT_MODEL = "ViT-B-32"
DEFAULT_PRETRAINED = "openai"


def add_backbone_arguments(p: argparse.ArgumentParser) -> None:
    """--model / --pretrained / --device, shared by every command that loads CLIP."""
    p.add_argument("--model", default=DEFAULT_MODEL, help="open_clip model name (e.g. ViT-B-32, ViT-L-14, isearle-shapes)")
    p.add_argument("--pretrained", default=DEFAULT_PRETRAINED,
                   help="pretrained tag (openai, isearle-shapes), a local checkpoint, or 'none' for random init")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")


def add_source_arguments(p: argparse.ArgumentParser) -> None:
    """Where images come from: a folder, or scenes rendered from the offline shapes world."""
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--images", type=Path, help="folder of images (searched recursively)")
    g.add_argument("--shapes", type=int, metavar="N", help="render N unlabeled scenes of the offline shapes world")
    p.add_argument("--shapes-seed", type=int, default=1000, help="seed of the rendered shapes scenes")


def backbone_from(args: argparse.Namespace):
    from isearle.backbone import load_backbone

    pretrained = None if str(args.pretrained).lower() == "none" else args.pretrained
    return load_backbone(args.model, pretrained, args.device)


def source_from(args: argparse.Namespace, size: int) -> tuple[list[str], list]:
    """(ids, items) for `extract_features`: image paths, or callables rendering shapes scenes."""
    if args.images is not None:
        from isearle.images import list_images

        paths = list_images(args.images)
        return [str(p.relative_to(args.images)) for p in paths], paths
    from isearle.shapes.world import scene_source

    return scene_source(args.shapes, args.shapes_seed, size)


# ----------------------------------------------------------------------------------- concepts
def add_concepts_arguments(p: argparse.ArgumentParser) -> None:
    add_backbone_arguments(p)
    add_source_arguments(p)
    p.add_argument("--vocabulary", default="openimages", help="openimages, imagenet, shapes, or a text file (one concept a line)")
    p.add_argument("--top-k", type=int, default=250, help="concepts kept per image (SEARLE stores 250)")
    p.add_argument("--out", type=Path, required=True, help="JSON file: {image id: [concepts, best first]}")


def concepts_main(args: argparse.Namespace) -> int:
    from isearle.concepts import concept_bank
    from isearle.images import extract_features

    backbone = backbone_from(args)
    bank = concept_bank(backbone, args.vocabulary)
    ids, items = source_from(args, backbone.image_size)
    names = bank.top_names(extract_features(backbone, items), args.top_k)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(dict(zip(ids, names, strict=True))))
    print(f"wrote the top {args.top_k} of {len(bank.names)} concepts for {len(ids)} images to {args.out}")
    return 0


# ------------------------------------------------------------------------------------ phrases
def add_phrases_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--vocabulary", default="openimages", help="openimages, imagenet, shapes, or a text file")
    p.add_argument("--generator", choices=["lm", "offline"], default="lm",
                   help="lm: a transformers causal LM (paper: GPT-Neo 2.7B); offline: no download")
    p.add_argument("--lm-model", default="EleutherAI/gpt-neo-2.7B", help="causal LM for --generator lm")
    p.add_argument("--samples", type=int, default=256, help="phrases sampled per concept (paper: 256)")
    p.add_argument("--limit", type=int, default=None, help="only the first N concepts (quick runs)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--out", type=Path, required=True, help="JSON cache {concept: [phrases]}; resumes if it exists")


def phrases_main(args: argparse.Namespace) -> int:
    from isearle.concepts import load_vocabulary
    from isearle.phrases import LMConfig, generate_phrases, lm_generator, offline_generator

    concepts = load_vocabulary(args.vocabulary)[: args.limit]
    if args.generator == "lm":
        gen = lm_generator(LMConfig(model=args.lm_model, samples=args.samples, seed=args.seed))
    else:
        source = "shapes" if args.vocabulary == "shapes" else "generic"
        gen = offline_generator(source, min(args.samples, 16) if source == "generic" else args.samples, args.seed)
    bank = generate_phrases(concepts, gen, cache=args.out)
    kept = sum(1 for v in bank.values() if v)
    print(f"{kept} of {len(bank)} concepts kept, {sum(map(len, bank.values()))} phrases in {args.out}")
    return 0


# ---------------------------------------------------------------------------------------- oti
def add_oti_arguments(p: argparse.ArgumentParser) -> None:
    from isearle.oti import OTIConfig

    d = OTIConfig()
    add_backbone_arguments(p)
    add_source_arguments(p)
    p.add_argument("--vocabulary", default="openimages", help="concept vocabulary for the GPT loss")
    p.add_argument("--phrases", type=Path, default=None, help="phrase JSON from `isearle phrases` (none: content loss only)")
    p.add_argument("--steps", type=int, default=d.steps, help=f"optimisation steps per image (paper: {d.steps})")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="images optimised together")
    p.add_argument("--lr", type=float, default=d.lr, help="AdamW learning rate")
    p.add_argument("--gamma", type=float, default=d.gamma, help="iSEARLE noise std on text features (0: SEARLE)")
    p.add_argument("--lambda-gpt", type=float, default=d.lambda_gpt, help="weight of the GPT phrase loss")
    p.add_argument("--max-norm", type=float, default=d.max_norm,
                   help="cap on ||S*|| in units of the mean token-embedding norm (0: no cap, SEARLE)")
    p.add_argument("--seed", type=int, default=d.seed, help="seed (batch b uses seed + b)")
    p.add_argument("--phi", default=None, help="warm start from this phi (then fewer --steps suffice)")
    p.add_argument("--ray", action="store_true", help="run on Ray Data (local Ray unless --ray-address)")
    p.add_argument("--ray-address", default=None, help="Ray cluster address")
    p.add_argument("--out", type=Path, required=True, help="output folder; an interrupted run resumes there")


def oti_main(args: argparse.Namespace) -> int:
    from isearle.concepts import concept_bank
    from isearle.oti import OTIConfig, invert_images
    from isearle.phi import load_phi

    backbone = backbone_from(args)
    config = OTIConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, gamma=args.gamma,
                       lambda_gpt=args.lambda_gpt if args.phrases else 0.0, max_norm=args.max_norm, seed=args.seed)
    ids, items = source_from(args, backbone.image_size)
    bank = json.loads(args.phrases.read_text()) if args.phrases else None
    phi = load_phi(args.phi, backbone.device) if args.phi else None
    concepts = concept_bank(backbone, args.vocabulary)
    if args.ray:
        from isearle.scale import ray_oti

        ids, tokens = ray_oti(backbone, ids, items, args.out, config, concepts, bank, phi,
                              address=args.ray_address)
    else:
        ids, tokens = invert_images(backbone, ids, items, args.out, config, concepts, bank, phi)
    print(f"{len(ids)} pseudo-tokens of width {tokens.shape[1]} in {args.out}")
    return 0


# ---------------------------------------------------------------------------------- train-phi
def add_train_phi_arguments(p: argparse.ArgumentParser) -> None:
    from isearle.phi_training import PhiTrainConfig

    d = PhiTrainConfig()
    add_backbone_arguments(p)
    p.add_argument("--oti", type=Path, nargs="+", required=True,
                   help="folder(s) of `isearle oti` runs (features, concepts, tokens); several are concatenated")
    p.add_argument("--phrases", type=Path, default=None, help="phrase JSON for the GPT loss (none: distillation only)")
    p.add_argument("--epochs", type=int, default=d.epochs, help="training epochs (paper: 100)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="batch size (paper: 256)")
    p.add_argument("--lr", type=float, default=d.lr, help="AdamW learning rate")
    p.add_argument("--temperature", type=float, default=d.temperature, help="NT-Xent temperature")
    p.add_argument("--lambda-gpt", type=float, default=d.lambda_gpt, help="weight of the GPT phrase loss")
    p.add_argument("--lambda-reg", type=float, default=d.lambda_reg, help="weight of iSEARLE's token penalty")
    p.add_argument("--reg-form", choices=["norm", "knn", "none"], default=d.reg_form, help="form of the token penalty")
    p.add_argument("--reg-norm", type=float, default=d.reg_norm,
                   help="'norm' penalty target in units of the mean token-embedding norm (match OTI's --max-norm)")
    p.add_argument("--no-hard-negatives", action="store_true", help="random batches (SEARLE) instead of similar images")
    p.add_argument("--seed", type=int, default=d.seed, help="seed")
    p.add_argument("--out", type=Path, required=True, help="phi checkpoint (.safetensors + .json)")


def train_phi_main(args: argparse.Namespace) -> int:
    from isearle.oti import load_runs
    from isearle.phi import save_phi
    from isearle.phi_training import PhiTrainConfig, train_phi

    backbone = backbone_from(args)
    ids, features, tokens, concepts, oti = load_runs(args.oti)
    config = PhiTrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                            temperature=args.temperature, lambda_gpt=args.lambda_gpt,
                            lambda_reg=args.lambda_reg, reg_form=args.reg_form, reg_norm=args.reg_norm,
                            hard_negatives=not args.no_hard_negatives, seed=args.seed)
    bank = json.loads(args.phrases.read_text()) if args.phrases else None
    phi, history = train_phi(backbone, features, tokens, config, concepts, bank)
    path = save_phi(phi, args.out, {"backbone": backbone.name, "pretrained": backbone.pretrained, "oti": oti,
                                    "train": vars(config), "final_losses": history[-1] if history else {}})
    print(f"phi trained on {len(ids)} images; last epoch losses {history[-1] if history else {}}; saved {path}")
    return 0


# -------------------------------------------------------------------------------------- query
def add_query_arguments(p: argparse.ArgumentParser) -> None:
    add_backbone_arguments(p)
    p.set_defaults(model=None, pretrained=None)
    p.add_argument("--image", type=Path, help="reference image (not needed for --method text)")
    p.add_argument("--caption", required=True, help="relative caption, e.g. 'is blue instead'")
    p.add_argument("--top-k", type=int, default=10, help="number of results")
    p.add_argument("--method", choices=["phi", "oti", "image", "text", "image+text"], default="phi",
                   help="how the query is built")
    p.add_argument("--phi", default=None, help="phi: searle, searle-xl or a checkpoint (default: the gallery's)")
    p.add_argument("--steps", type=int, default=350, help="OTI steps for --method oti")
    p.add_argument("--gallery", type=Path, default=Path("gallery_index"), help="gallery index folder from `isearle index`")
    p.add_argument("--json", action="store_true", help="print a JSON list of {id, path, score}")


def query_main(args: argparse.Namespace) -> int:
    from isearle.images import open_image
    from isearle.service import load_service

    service = load_service(args.gallery, model=args.model, pretrained=args.pretrained, phi=args.phi,
                           device=args.device)
    image = open_image(args.image) if args.image else None
    hits = service.retriever.query(image, args.caption, args.top_k, args.method, service.oti_config(args.steps))
    rows = [{"id": h.id, "path": h.metadata.get("path"), "score": round(h.score, 6)} for h in hits]
    if args.json:
        print(json.dumps(rows))
    else:
        for h, r in zip(hits, rows, strict=True):
            print(f"{h.rank:3d}  {r['score']:.4f}  {r['id']}  {r['path'] or ''}")
    return 0


# ------------------------------------------------------------------------------------ inspect
def add_inspect_arguments(p: argparse.ArgumentParser) -> None:
    add_backbone_arguments(p)
    p.add_argument("--images", type=Path, required=True, help="folder of images (searched recursively)")
    p.add_argument("--method", nargs="+", choices=["phi", "oti"], default=["phi"],
                   help="how S* is made; both: also the phi-vs-OTI cosine per image")
    p.add_argument("--phi", default=None, help="phi: searle, searle-xl or a checkpoint (default: the backbone's own)")
    p.add_argument("--steps", type=int, default=None, help="OTI steps (default 350, the paper's)")
    p.add_argument("--cold", action="store_true", help="OTI from noise as in SEARLE (default: warm-started from phi, "
                   "as the demo's OTI)")
    p.add_argument("--vocabulary", default=None, help="concepts: shapes, imagenet, openimages or a text file "
                   "(default: shapes for the shapes models, else imagenet)")
    p.add_argument("--top-k", type=int, default=10, help="nearest tokens and concepts listed per image")
    p.add_argument("--json", action="store_true", help="also write report.json (the same numbers, for notebooks)")
    p.add_argument("--out", type=Path, required=True, help="report folder: index.html (static, no server)")


def inspect_main(args: argparse.Namespace) -> int:
    from isearle.report import inspect_folder

    pretrained = None if str(args.pretrained).lower() == "none" else args.pretrained
    paths = inspect_folder(args.images, args.out, args.model, pretrained, args.method, args.steps, args.phi,
                           args.device, args.vocabulary, args.top_k, args.json, warm=not args.cold)
    print("wrote " + " and ".join(str(p) for p in paths.values()))
    return 0


COMMANDS: list[tuple[str, str, str, str, str]] = [
    # name, help, module, add-arguments, main
    ("concepts", "top-k vocabulary concepts of each image (prompt-ensembled CLIP text features)",
     "isearle.cli", "add_concepts_arguments", "concepts_main"),
    ("phrases", "phrases 'a photo of {concept} that ...' for the GPT loss (LM or offline generator)",
     "isearle.cli", "add_phrases_arguments", "phrases_main"),
    ("oti", "optimisation-based textual inversion of a set of images (resumable)",
     "isearle.cli", "add_oti_arguments", "oti_main"),
    ("train-phi", "distil the textual inversion network phi from OTI tokens",
     "isearle.cli", "add_train_phi_arguments", "train_phi_main"),
    ("index", "build a FAISS gallery index from an image folder or a Hugging Face dataset",
     "isearle.index", "add_index_arguments", "index_main"),
    ("query", "composed retrieval: reference image + relative caption -> top-K gallery images",
     "isearle.cli", "add_query_arguments", "query_main"),
    ("inspect", "describe the pseudo-words of a folder of images: a static HTML report (and --json)",
     "isearle.cli", "add_inspect_arguments", "inspect_main"),
    ("eval", "evaluate on CIRR, CIRCO, FashionIQ, ImageNet-R or ShapesCIR",
     "isearle.evaluation", "add_eval_arguments", "eval_main"),
    ("train-clip", "train the tiny CLIP of the offline shapes world",
     "isearle.clip_training", "add_train_clip_arguments", "train_clip_main"),
    ("build-shapes", "generate the ShapesCIR benchmark (annotations + gallery specs)",
     "isearle.shapes.benchmark", "add_build_arguments", "build_main"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="isearle", description="iSEARLE zero-shot composed image retrieval (OTI + phi textual inversion)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text, module, add_args, main in COMMANDS:
        p = sub.add_parser(name, help=help_text, description=help_text)
        try:
            mod = importlib.import_module(module)
            getattr(mod, add_args)(p)
        except (ImportError, AttributeError) as err:  # a command whose module is not installed
            p.set_defaults(_unavailable=f"{name} is unavailable: {err}")
            continue
        p.set_defaults(_run=(module, main))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "_unavailable", None):
        print(f"error: {args._unavailable}", file=sys.stderr)
        return 2
    module, name = args._run
    run: Callable[[argparse.Namespace], int] = getattr(importlib.import_module(module), name)
    from isearle.backbone import WeightsUnavailable
    from isearle.images import BadImage

    try:
        return int(run(args) or 0)
    except (WeightsUnavailable, BadImage, FileNotFoundError, ValueError) as err:  # ArtifactError too
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: resumable commands continue where they stopped when run again", file=sys.stderr)
        return 130
    except OSError as err:  # disk full, permission denied...: the file and the reason, no traceback
        print(f"error: {err.filename or ''}{': ' if err.filename else ''}{err.strerror or err}", file=sys.stderr)
        return 1
    except Exception as err:  # a bug: one line for the user; ISEARLE_DEBUG=1 shows the traceback
        if os.environ.get("ISEARLE_DEBUG"):
            raise
        first = (str(err).strip().splitlines() or [""])[0][:200]
        print(f"error: internal error ({type(err).__name__}: {first}); run again with ISEARLE_DEBUG=1 "
              "for the traceback and report it", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
