"""`isearle inspect`: the pseudo-words of a folder of images, as a static HTML report (and JSON)."""

from __future__ import annotations

import argparse
from pathlib import Path

from isearle.cli.common import add_backbone_arguments
from isearle.defaults import DEFAULTS


def add_inspect_arguments(p: argparse.ArgumentParser) -> None:
    add_backbone_arguments(p)
    p.add_argument("--images", type=Path, required=True, help="folder of images (searched recursively)")
    p.add_argument("--method", nargs="+", choices=["phi", "oti"], default=["phi"],
                   help="how S* is made; both: also the phi-vs-OTI cosine per image")
    p.add_argument("--phi", default=None, help="phi: searle, searle-xl or a checkpoint (default: the backbone's own)")
    p.add_argument("--steps", type=int, default=None, help=f"OTI steps (default {DEFAULTS.oti_steps}, the paper's)")
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
