"""Argument groups shared by several commands, each declared once, and what they turn into."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from isearle.defaults import DEFAULTS

DEFAULT_MODEL, DEFAULT_PRETRAINED = DEFAULTS.model, DEFAULTS.pretrained


def add_backbone_arguments(p: argparse.ArgumentParser) -> None:
    """--model / --pretrained / --device, shared by every command that loads CLIP."""
    p.add_argument("--model", default=DEFAULT_MODEL, help="open_clip model name (e.g. ViT-B-32, ViT-L-14, isearle-shapes)")
    p.add_argument("--pretrained", default=DEFAULT_PRETRAINED,
                   help="pretrained tag (openai, isearle-shapes), a local checkpoint, or 'none' for random init")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")


def backbone_from(args: argparse.Namespace) -> Any:
    """The backbone of --model / --pretrained / --device ('none': random init)."""
    from isearle.backbone import load_backbone

    pretrained = None if str(args.pretrained).lower() == "none" else args.pretrained
    return load_backbone(args.model, pretrained, args.device)


def add_source_arguments(p: argparse.ArgumentParser) -> None:
    """Where images come from: a folder, or scenes rendered from the offline shapes world."""
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--images", type=Path, help="folder of images (searched recursively)")
    g.add_argument("--shapes", type=int, metavar="N", help="render N unlabeled scenes of the offline shapes world")
    p.add_argument("--shapes-seed", type=int, default=1000, help="seed of the rendered shapes scenes")


def source_from(args: argparse.Namespace, size: int) -> tuple[list[str], list]:
    """(ids, items) for `extract_features`: image paths, or callables rendering shapes scenes."""
    if args.images is not None:
        from isearle.images import list_images

        paths = list_images(args.images)
        return [str(p.relative_to(args.images)) for p in paths], paths
    from isearle.shapes.world import scene_source

    return scene_source(args.shapes, args.shapes_seed, size)


def add_preset_argument(p: argparse.ArgumentParser) -> None:
    """--preset: SEARLE's recipe or iSEARLE's (the default); options given explicitly override it."""
    from isearle.presets import DEFAULT_PRESET, PRESETS

    p.add_argument("--preset", choices=list(PRESETS), default=DEFAULT_PRESET,
                   help="recipe: searle (the authors' code) or isearle (docs/faithfulness.md); options given override it")


def add_oti_arguments(p: argparse.ArgumentParser, prefix: str = "") -> None:
    """OTI's settings as flags (`isearle oti`: --steps ...; `isearle eval`: --oti-steps ...); unset ones
    come from `--preset` (`isearle.presets`)."""
    from isearle.oti import OTIConfig
    from isearle.presets import TEMPLATE_SETS

    d, f = OTIConfig(), f"--{prefix}"
    add_preset_argument(p)
    p.add_argument(f"{f}vocabulary", default="openimages", help="concept vocabulary for the GPT loss")
    p.add_argument(f"{f}phrases", type=Path, default=None,
                   help="phrase JSON from `isearle phrases` for the GPT loss (none: content loss only)")
    p.add_argument(f"{f}steps", type=int, default=None, help=f"OTI steps per image (paper: {d.steps})")
    p.add_argument(f"{f}batch-size", type=int, default=None, help=f"images inverted together ({d.batch_size})")
    p.add_argument(f"{f}lr", type=float, default=None, help=f"OTI AdamW learning rate ({d.lr})")
    p.add_argument(f"{f}gamma", type=float, default=None, help="iSEARLE noise std on text features (default: the preset's)")
    p.add_argument(f"{f}lambda-gpt", type=float, default=None, help=f"weight of the GPT phrase loss ({d.lambda_gpt})")
    p.add_argument(f"{f}max-norm", type=float, default=None,
                   help="cap on ||S*|| in units of the mean token-embedding norm (0: no cap, SEARLE)")
    p.add_argument(f"{f}templates", choices=TEMPLATE_SETS, default=None,
                   help="content templates: searle (PALAVRA's 24, default) or shapes (the shapes world's)")
    p.add_argument(f"{f}seed", type=int, default=None, help="OTI seed (batch b uses seed + b)")
    from isearle.precision import COMPUTE_PRECISION_HELP, add_compute_precision_argument

    add_compute_precision_argument(p, f"{f}precision", help="OTI's " + COMPUTE_PRECISION_HELP.replace(
        "default: fp16 on CUDA, fp32 on CPU", "default: the preset's (searle: fp16 on CUDA, fp32 on CPU) or the backbone's"))


def add_decode_argument(p: argparse.ArgumentParser, default: str | None = None) -> None:
    """--decode searle|robust (`isearle.images`); None: the preset's."""
    from isearle.images import DECODE_HELP, DECODES

    p.add_argument("--decode", choices=DECODES, default=default,
                   help=DECODE_HELP + (f" (default {default})" if default else " (default: the preset's)"))


def decode_from(args: argparse.Namespace) -> str:
    """The decoding of --decode, else of --preset (searle -> searle, isearle -> robust)."""
    from isearle.presets import preset

    given = getattr(args, "decode", None)
    return given or preset(getattr(args, "preset", "isearle")).decode


def oti_config_from(args: argparse.Namespace, prefix: str = "", device: Any = None) -> Any:
    """The `OTIConfig` of `--preset` and `add_oti_arguments`' flags (no GPT loss without phrases); the
    precision: the flag's, else the preset's on `device` (searle: fp16 on CUDA), else the backbone's."""
    from isearle.presets import oti_templates, preset

    a = {k[len(prefix):]: v for k, v in vars(args).items() if k.startswith(prefix)}
    recipe = preset(args.preset)
    precision = a.get("precision") or (recipe.precision(device) if device is not None else None)
    return recipe.oti_config(
        steps=a["steps"], batch_size=a["batch_size"], lr=a["lr"], gamma=a["gamma"],
        lambda_gpt=a["lambda_gpt"] if a["phrases"] else 0.0, max_norm=a["max_norm"], seed=a["seed"],
        templates=oti_templates(a["templates"]) if a["templates"] else None, precision=precision)
