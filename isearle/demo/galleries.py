"""The demo's galleries: one entry per backbone choice, built when missing (the offline shapes
world from ShapesCIR, a folder or a Hugging Face dataset with a real CLIP: `isearle.gallery_builds`)
and opened as a `Session`."""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import dataclass
from pathlib import Path

from isearle.defaults import DEFAULTS
from isearle.errors import NotFound
from isearle.gallery_builds import (
    build_hub_gallery,
    build_shapes_gallery,
    build_test_world,
    ensure_offline_gallery,
    index_present,
    offline_gallery_stale,
)
from isearle.paths import REPO_DIR, public_name
from isearle.service import BENCHMARK, Session, load_service

__all__ = ["BENCHMARK", "GalleryEntry", "build_shapes_gallery", "build_test_world", "ensure_offline_gallery",
           "entry_label", "hub_gallery_dir", "index_present", "offline_gallery_stale", "open_service",
           "startable_entries"]


@dataclass
class GalleryEntry:
    """One backbone choice: a gallery index folder, and how to build it when it is missing."""

    directory: Path
    model: str | None = None
    pretrained: str | None = None
    phi: str | None = None
    images: Path | None = None
    hf_dataset: str | None = None
    hf_split: str = "train"
    hf_limit: int | None = None
    label: str = ""

    @property
    def key(self) -> str:
        """The entry's name on the page and in API answers: never an absolute server path."""
        return self.label or str(public_name(self.directory))


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-").lower()[:60] or "gallery"


def hub_gallery_dir(root: Path, model: str, pretrained: str | None, source: str, limit: int | None) -> Path:
    """Where a gallery built from `source` with `model` is cached (one folder per combination)."""
    name = f"hub-{slug(model)}-{slug(str(pretrained))}-{slug(Path(source).name or source)}"
    return root / (name + (f"-{limit}" if limit else ""))


def open_service(entry: GalleryEntry, device: str | None = None, cache_size: int = 256,
                 progress: bool = True, precision: str = "fp32") -> Session:
    """The session of a gallery entry, its index built first when it has a source and none is cached."""
    backbone = None
    if not index_present(entry.directory) and (entry.images is not None or entry.hf_dataset):
        backbone = build_hub_gallery(entry.directory, entry.model or DEFAULTS.model, entry.pretrained, device,
                                     entry.images, entry.hf_dataset, entry.hf_split, entry.hf_limit, progress)
    if not index_present(entry.directory):
        raise NotFound(f"no gallery index in {entry.directory}: build one with `isearle index` "
                       f"(or `python -m isearle.demo build-gallery` for the offline world)")
    return load_service(entry.directory, phi=entry.phi, device=device, cache_size=cache_size, backbone=backbone,
                        precision=precision)


def startable_entries(args: argparse.Namespace) -> tuple[list[GalleryEntry], list[str], list[str]]:
    """(entries that can be served, problems, notices) of the app's settings: the offline world's
    gallery is built when missing, damaged or stale; an entry without index or source is a problem."""
    from isearle.demo.settings import entries_from_args

    entries, problems, notices = [], [], []
    for entry in entries_from_args(args):
        if not entry.directory.is_absolute() and not entry.directory.exists():
            entry.directory = REPO_DIR / entry.directory
        has_source = entry.images is not None or bool(entry.hf_dataset)
        if not has_source and entry.directory.resolve() == (REPO_DIR / DEFAULTS.gallery).resolve():
            ensure_offline_gallery(entry.directory, notices=notices)  # built when missing, damaged or stale
        if has_source or index_present(entry.directory):
            entries.append(entry)
        else:
            problems.append(f"no gallery index in {entry.directory}")
    return entries, problems, notices


def entry_label(entry: GalleryEntry, session: Session | None = None) -> str:
    """Dropdown label of an entry: from its session when loaded, else from its index header."""
    if session is not None:
        b = session.backbone
        world = "offline shapes world" if session.benchmark else entry.directory.name
        return f"{b.name} / {b.pretrained} · {world} ({len(session):,} images)"
    info: dict = {}
    try:
        info = json.loads((entry.directory / "index.json").read_text()).get("info", {})
    except (OSError, ValueError):
        pass
    model = info.get("model") or entry.model or "?"
    pretrained = info.get("pretrained") or entry.pretrained
    world = "offline shapes world" if info.get("benchmark") == BENCHMARK else (
        str(entry.hf_dataset or (entry.images.name if entry.images else entry.directory.name)))
    count = f" ({info['count']:,} images)" if "count" in info else ""
    return f"{model} / {pretrained} · {world}{count}"
