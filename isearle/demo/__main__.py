"""`python -m isearle.demo build-gallery | make-examples | settings`: helpers of the Gradio demo."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from isearle.defaults import DEFAULTS
from isearle.demo.examples import EXAMPLES_PATH, make_examples
from isearle.demo.settings import settings_table
from isearle.gallery_builds import build_offline_gallery
from isearle.paths import REPO_DIR


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m isearle.demo build-gallery | make-examples | settings`."""
    p = argparse.ArgumentParser(prog="python -m isearle.demo", description="helpers of the Gradio demo")
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build-gallery", help="embed the ShapesCIR gallery into gallery_index/ (offline world)")
    b.add_argument("--out", type=Path, default=REPO_DIR / DEFAULTS.gallery)
    b.add_argument("--model", default="isearle-shapes")
    b.add_argument("--pretrained", default="isearle-shapes")
    b.add_argument("--benchmark", type=Path, default=None, help="ShapesCIR folder (default assets/shapescir)")
    e = sub.add_parser("make-examples", help="write assets/examples.json from the ShapesCIR val split")
    e.add_argument("--benchmark", type=Path, default=None)
    e.add_argument("--out", type=Path, default=EXAMPLES_PATH)
    e.add_argument("--n", type=int, default=12)
    sub.add_parser("settings", help="print the settings table (Markdown)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.cmd == "build-gallery":
        pretrained = None if args.pretrained == "none" else args.pretrained
        out = build_offline_gallery(args.out, args.model, pretrained, args.benchmark)
        print(f"offline gallery written to {out}")
    elif args.cmd == "make-examples":
        print(f"wrote {make_examples(args.benchmark, args.out, args.n)}")
    else:
        print(settings_table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
