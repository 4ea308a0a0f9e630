"""Gallery indexes the demo and the tests build when they are missing: the offline shapes world
(every ShapesCIR gallery scene, embedded by the bundled tiny CLIP), its random-init stand-in, and
a real CLIP's gallery of an image folder or a Hugging Face dataset."""

from __future__ import annotations

import functools
import json
import logging
import os
from pathlib import Path

import torch

from isearle.backbone import Backbone, WeightsUnavailable, load_backbone
from isearle.errors import NotFound
from isearle.gallery_items import render_spec
from isearle.service import BENCHMARK, OFFLINE_REBUILD
from isearle.weights import file_digest, weights_file, weights_fingerprint

log = logging.getLogger(__name__)


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
            raise NotFound(f"no ShapesCIR gallery at {path}: run `isearle build-shapes` first")
        specs = json.loads(path.read_text())
    size = backbone.image_size
    items = [(i, functools.partial(render_spec, s, size), {"spec": s}) for i, s in specs.items()]
    index = build_gallery_index(backbone, items, batch_size=batch_size, num_workers=0, progress=progress)
    index.info["benchmark"] = benchmark
    index.info["rebuild"] = OFFLINE_REBUILD
    index.info["render_size"] = size
    index.info["weights"] = weights_fingerprint(backbone.pretrained)
    return index.save(out_dir)


def build_offline_gallery(out_dir: str | Path, model: str = "isearle-shapes", pretrained: str | None = "isearle-shapes",
                          benchmark_dir: str | Path | None = None, device: str = "cpu") -> Path:
    """The offline world's gallery embedded by `model` (the bundled tiny CLIP by default)."""
    from isearle.shapes.benchmark import BENCHMARK_DIR

    backbone = load_backbone(model, pretrained, device)
    return build_shapes_gallery(out_dir, backbone, benchmark_dir=benchmark_dir or BENCHMARK_DIR)


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


def build_hub_gallery(directory: Path, model: str, pretrained: str | None, device: str | None = None,
                      images: Path | None = None, hf_dataset: str | None = None, hf_split: str = "train",
                      hf_limit: int | None = None, progress: bool = True) -> Backbone:
    """Embed an image folder or a Hugging Face dataset into `directory` with `model` (what `isearle
    index` does); returns the loaded backbone."""
    from isearle.indexing import build_gallery_index, folder_items, hf_items

    backbone = load_backbone(model, pretrained, device)
    if images is not None:
        items: list = folder_items(images)
        thumbs = None
    else:
        items = hf_items(str(hf_dataset), hf_split, limit=hf_limit)
        thumbs = directory
    items = items[: hf_limit] if hf_limit else items
    if not items:
        raise NotFound(f"no images to index in {images or hf_dataset}")
    log.info("building the gallery %s from %d images (%s) with %s/%s", directory, len(items),
             images or hf_dataset, backbone.name, backbone.pretrained)
    index = build_gallery_index(backbone, items, batch_size=64, num_workers=min(2, os.cpu_count() or 1),
                                progress=progress, thumbnails=thumbs)
    index.save(directory)
    return backbone


def index_present(directory: Path) -> bool:
    """Whether `directory` holds a gallery index."""
    return (directory / "index.json").is_file()


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
