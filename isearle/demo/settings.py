"""The demo's settings: CLI flags with ISEARLE_* environment-variable defaults, declared once."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from isearle.defaults import DEFAULTS
from isearle.demo.examples import EXAMPLES_PATH
from isearle.demo.galleries import GalleryEntry, hub_gallery_dir
from isearle.precision import PRECISION_HELP, parse_precision

DEFAULT_OTI_STEPS = DEFAULTS.demo_oti_steps


@dataclass(frozen=True)
class Setting:
    """One demo setting: flag, environment variable, default, help."""

    flag: str
    env: str
    default: Any
    help: str
    type: Callable[[str], Any] = str


SETTINGS: tuple[Setting, ...] = (
    Setting("--gallery", "ISEARLE_GALLERY", DEFAULTS.gallery,
            "gallery index folder(s), comma-separated; each is a backbone choice (default: the offline world)"),
    Setting("--images", "ISEARLE_IMAGES", None, "image folder to index with --model at start-up (once: cached under --hub-cache)"),
    Setting("--hf-dataset", "ISEARLE_HF_DATASET", None, "Hugging Face dataset to index with --model at start-up (cached likewise)"),
    Setting("--hf-split", "ISEARLE_HF_SPLIT", "train", "dataset split for --hf-dataset"),
    Setting("--hf-limit", "ISEARLE_HF_LIMIT", None, "index only the first N images of the folder or dataset", int),
    Setting("--hub-cache", "ISEARLE_HUB_CACHE", DEFAULTS.gallery,
            "where galleries built from --images / --hf-dataset are kept (on a Space: /data/... for persistence)"),
    Setting("--model", "ISEARLE_MODEL", DEFAULTS.model, "open_clip backbone for --images / --hf-dataset"),
    Setting("--pretrained", "ISEARLE_PRETRAINED", DEFAULTS.pretrained, "its pretrained tag or a local checkpoint"),
    Setting("--phi", "ISEARLE_PHI", None,
            "phi of the default backbone: searle, searle-xl or a checkpoint (default: the backbone's own)"),
    Setting("--device", "ISEARLE_DEVICE", None, "cuda or cpu (default: cuda when available)"),
    Setting("--precision", "ISEARLE_PRECISION", DEFAULTS.precision, PRECISION_HELP, parse_precision),
    Setting("--host", "ISEARLE_HOST", None, "interface to listen on (default 127.0.0.1; Spaces set 0.0.0.0)"),
    Setting("--port", "ISEARLE_PORT", None, "port (default 7860, or the first free one after it)", int),
    Setting("--queue-size", "ISEARLE_QUEUE_SIZE", 64, "requests waiting at most; more are refused", int),
    Setting("--concurrency", "ISEARLE_CONCURRENCY", 2, "queries run at the same time", int),
    Setting("--cache-size", "ISEARLE_CACHE_SIZE", 256, "reference images kept in the feature/pseudo-word cache", int),
    Setting("--oti-steps", "ISEARLE_OTI_STEPS", DEFAULT_OTI_STEPS, "default OTI steps (slider start)", int),
    Setting("--examples", "ISEARLE_EXAMPLES", str(EXAMPLES_PATH), "example references and captions (JSON)"),
    Setting("--max-file-size", "ISEARLE_MAX_FILE_SIZE", "25mb", "largest upload"),
    Setting("--no-warmup", "ISEARLE_NO_WARMUP", False, "skip the warm-up query at start-up", lambda v: v.lower() in ("1", "true", "yes")),
    Setting("--panel-delay-ms", "ISEARLE_PANEL_DELAY_MS", 80, "pause between sending the results and explaining "
            "them, so the page fetches the results' thumbnails before the panel's work takes the cores", int),
)


def add_arguments(parser: argparse.ArgumentParser, environ: dict[str, str] | None = None) -> None:
    """The demo's flags; each defaults to its environment variable, then to its built-in default."""
    env = os.environ if environ is None else environ
    for s in SETTINGS:
        default = s.type(env[s.env]) if env.get(s.env) not in (None, "") else s.default
        if isinstance(s.default, bool):
            parser.add_argument(s.flag, action="store_true", default=default, help=f"{s.help} [{s.env}]")
        else:
            parser.add_argument(s.flag, type=s.type, default=default, help=f"{s.help} [{s.env}]")


def settings_table() -> str:
    """The settings as a Markdown table (README)."""
    rows = ["| flag | environment variable | default | meaning |", "|---|---|---|---|"]
    for s in SETTINGS:
        default = "off" if s.default is False else ("—" if s.default is None else f"`{s.default}`")
        if s.flag == "--examples":
            default = "`assets/examples.json`"
        rows.append(f"| `{s.flag}` | `{s.env}` | {default} | {s.help} |")
    return "\n".join(rows)


def entries_from_args(args: argparse.Namespace) -> list[GalleryEntry]:
    """Gallery entries: a source to index (first, the default) then the listed index folders."""
    entries: list[GalleryEntry] = []
    galleries = [Path(g.strip()) for g in str(args.gallery or "").split(",") if g.strip()]
    if args.images or args.hf_dataset:
        root = Path(getattr(args, "hub_cache", None) or DEFAULTS.gallery)
        source = str(args.images or args.hf_dataset)
        entries.append(GalleryEntry(hub_gallery_dir(root, args.model, args.pretrained, source, args.hf_limit),
                                    model=args.model, pretrained=args.pretrained, phi=args.phi,
                                    images=Path(args.images) if args.images else None, hf_dataset=args.hf_dataset,
                                    hf_split=args.hf_split, hf_limit=args.hf_limit))
    for g in galleries:
        entries.append(GalleryEntry(g, phi=args.phi if not entries else None))
    return entries
