"""The demo's galleries: one entry per backbone choice, built when missing (the offline shapes
world from ShapesCIR, a folder or a Hugging Face dataset with a real CLIP) and opened as a service."""

from __future__ import annotations

import functools
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from isearle.backbone import Backbone, WeightsUnavailable, load_backbone
from isearle.demo.media import render_spec
from isearle.paths import public_name
from isearle.service import Service, load_service
from isearle.weights import file_digest, weights_file, weights_fingerprint

BENCHMARK = "shapescir"

log = logging.getLogger(__name__)


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


def build_shapes_gallery(out_dir: str | Path, backbone: Backbone, specs: dict[str, dict] | None = None,
                         benchmark_dir: str | Path | None = None, batch_size: int = 256,
                         progress: bool = True, benchmark: str = BENCHMARK) -> Path:
    """The offline world's gallery: every ShapesCIR gallery scene (or `specs`), embedded and indexed.

    Items keep their scene spec as metadata ({"spec": ...}), so the demo re-renders them at any size
    and the gallery ids are the benchmark's (ground truths can be marked).
    """
    from isearle.indexing import build_gallery_index

    if specs is None:
        from isearle.shapes.benchmark import BENCHMARK_DIR

        path = Path(benchmark_dir or BENCHMARK_DIR) / "gallery.json"
        if not path.is_file():
            raise FileNotFoundError(f"no ShapesCIR gallery at {path}: run `isearle build-shapes` first")
        specs = json.loads(path.read_text())
    size = backbone.image_size
    items = [(i, functools.partial(render_spec, s, size), {"spec": s}) for i, s in specs.items()]
    index = build_gallery_index(backbone, items, batch_size=batch_size, num_workers=0, progress=progress)
    index.info["benchmark"] = benchmark
    index.info["render_size"] = size
    index.info["weights"] = weights_fingerprint(backbone.pretrained)
    return index.save(out_dir)


def build_test_world(out_dir: str | Path, n: int = 300, seed: int = 7) -> dict[str, Path]:
    """A random-init stand-in for the offline world (tests, development before the weights exist).

    The tiny test CLIP is saved as a checkpoint so that every process loads the same weights; the
    gallery holds `n` random scenes with benchmark-style ids, and phi is random too.
    """
    from isearle.phi import Phi, save_phi
    from isearle.shapes.benchmark import compact
    from isearle.shapes.world import scene_specs

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = out / "tiny-test.pt"
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        backbone = load_backbone("isearle-tiny-test", None, "cpu")
        phi = Phi.for_backbone(backbone.embed_dim, backbone.token_width).eval()
    torch.save(backbone.model.state_dict(), checkpoint)
    backbone = load_backbone("isearle-tiny-test", str(checkpoint), "cpu")
    specs = {f"{i:06d}": compact(s) for i, s in enumerate(scene_specs(n, seed))}
    gallery = build_shapes_gallery(out / "gallery", backbone, specs=specs, progress=False)
    return {"gallery": gallery, "phi": save_phi(phi, out / "phi.safetensors"), "checkpoint": checkpoint}


def _build_hub_gallery(entry: GalleryEntry, backbone: Backbone, progress: bool = True) -> None:
    """Embed the entry's image folder or Hugging Face dataset into `entry.directory` (what `isearle index` does)."""
    from isearle.indexing import build_gallery_index, folder_items, hf_items

    if entry.images is not None:
        items: list = folder_items(entry.images)
        thumbs = None
    else:
        items = hf_items(str(entry.hf_dataset), entry.hf_split, limit=entry.hf_limit)
        thumbs = entry.directory
    items = items[: entry.hf_limit] if entry.hf_limit else items
    if not items:
        raise FileNotFoundError(f"no images to index in {entry.images or entry.hf_dataset}")
    log.info("building the gallery %s from %d images (%s) with %s/%s", entry.directory, len(items),
             entry.images or entry.hf_dataset, backbone.name, backbone.pretrained)
    index = build_gallery_index(backbone, items, batch_size=64, num_workers=min(2, os.cpu_count() or 1),
                                progress=progress, thumbnails=thumbs)
    index.save(entry.directory)


def index_present(directory: Path) -> bool:
    """Whether `directory` holds a gallery index."""
    return (directory / "index.json").is_file()


def open_service(entry: GalleryEntry, device: str | None = None, cache_size: int = 256,
                 progress: bool = True) -> Service:
    """The query service of a gallery entry, building its index first when it has a source and none is cached."""
    backbone = None
    if not index_present(entry.directory) and (entry.images is not None or entry.hf_dataset):
        backbone = load_backbone(entry.model or "ViT-B-32", entry.pretrained, device)
        _build_hub_gallery(entry, backbone, progress)
    if not index_present(entry.directory):
        raise FileNotFoundError(f"no gallery index in {entry.directory}: build one with `isearle index` "
                                f"(or `python -m isearle.demo build-gallery` for the offline world)")
    return load_service(entry.directory, phi=entry.phi, device=device, cache_size=cache_size, backbone=backbone)


def offline_gallery_stale(directory: Path) -> bool:
    """Whether an offline-world gallery was embedded with other weights than the bundled isearle-shapes."""
    try:
        info = json.loads((directory / "index.json").read_text()).get("info", {})
    except (OSError, ValueError):
        return False
    bundled = weights_file("isearle-shapes")
    if info.get("pretrained") != "isearle-shapes" or not info.get("weights") or bundled is None:
        return False
    return info["weights"] != file_digest(bundled)


def ensure_offline_gallery(directory: Path, progress: bool = True, notices: list[str] | None = None) -> bool:
    """Build the offline world's gallery when it is missing, damaged (`isearle.artifacts`) or was
    embedded with other shapes weights; what was wrong is appended to `notices`.

    Returns whether `directory` holds an index afterwards. Needs the benchmark and the weights.
    """
    from isearle.index import gallery_problem
    from isearle.shapes.benchmark import BENCHMARK_DIR

    present = index_present(directory)
    if present:
        problem = gallery_problem(directory)
        if problem is None and not offline_gallery_stale(directory):
            return True
        if problem is not None:
            log.warning("%s: rebuilding it", problem)
            if notices is not None:
                notices.append(f"{problem.path.name} of the offline gallery {problem.problem}: it was rebuilt")
        else:
            log.info("%s was embedded with other isearle-shapes weights: rebuilding it", directory)
    if not (BENCHMARK_DIR / "gallery.json").is_file():
        return present
    try:
        backbone = load_backbone("isearle-shapes", "isearle-shapes", "cpu")
    except WeightsUnavailable:
        return present
    log.info("building the offline world's gallery in %s (once)", directory)
    build_shapes_gallery(directory, backbone, benchmark_dir=BENCHMARK_DIR, progress=progress)
    return True
