"""Inputs of the visitor-latency bench: new uploads (a 640x480 JPEG, a 12 MP EXIF-rotated phone
JPEG), captions, and the ViT-B/32 100k world the app can serve.

Every upload is a picture no server has seen (a ShapesCIR test reference, rendered, with its own
noise), so each one is a cold query. The ViT-B/32 world: random-init ViT-B/32 weights saved as a
checkpoint (so both app processes load the same weights and cache the same concept bank), a phi of
SEARLE's shape (random), and 100k gallery vectors from bench d (`unit_vectors`, clustered) in the
index the library picks for that size. Built once and kept under the cache folder.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from bench.common import log

SMALL = (640, 480)
PHONE = (4000, 3000)  # stored landscape, EXIF orientation 6: shown as 3000x4000 portrait
ORIENTATION = 0x0112
VITB32_SIZE = 100_000


@dataclass(frozen=True)
class Upload:
    """One new picture and the captions asked about it (first with the upload, then typed)."""

    path: Path
    caption: str
    typed: str


def captions() -> tuple[list[tuple[dict, str]], list[str]]:
    """(ShapesCIR test (reference spec, relative caption) pairs, the demo's example captions)."""
    from isearle import demo as D
    from isearle.shapes.benchmark import load_benchmark

    queries, gallery = load_benchmark(split="test")
    pairs = [(gallery[q["reference_img_id"]].to_dict(), q["relative_caption"]) for q in queries]
    return pairs, list(D.SHAPES_CAPTIONS)


def _scene(spec: dict, size: int) -> Image.Image:
    from isearle import demo as D

    return D.render_spec(spec, size).convert("RGB")


def _noisy(image: Image.Image, seed: int, amount: int = 6) -> Image.Image:
    """The image with a little sensor-like noise: a distinct file, and a realistic JPEG size."""
    a = np.asarray(image, dtype=np.int16)
    noise = np.random.default_rng(seed).integers(-amount, amount + 1, a.shape, dtype=np.int16)
    return Image.fromarray(np.clip(a + noise, 0, 255).astype(np.uint8))


def small_jpeg(spec: dict, path: Path, seed: int) -> Path:
    """A 640x480 JPEG of the scene (centred on white)."""
    canvas = Image.new("RGB", SMALL, "white")
    scene = _scene(spec, SMALL[1])
    canvas.paste(scene, ((SMALL[0] - scene.width) // 2, 0))
    _noisy(canvas, seed).save(path, format="JPEG", quality=90)
    return path


def phone_jpeg(spec: dict, path: Path, seed: int) -> Path:
    """A 12 MP phone JPEG: 4000x3000 pixels stored sideways with EXIF orientation 6 (rotate 90
    degrees clockwise to show), so the upright picture is 3000x4000."""
    upright = Image.new("RGB", (PHONE[1], PHONE[0]), "white")
    scene = _scene(spec, 750).resize((PHONE[1], PHONE[1]), Image.Resampling.BILINEAR)
    upright.paste(scene, (0, (PHONE[0] - PHONE[1]) // 2))
    stored = _noisy(upright, seed).transpose(Image.Transpose.ROTATE_90)  # 90 degrees counter-clockwise
    assert stored.size == PHONE
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    stored.save(path, format="JPEG", quality=90, exif=exif)
    return path


def make_uploads(folder: Path, count: int, kind: str, start: int = 0) -> list[Upload]:
    """`count` new uploads of `kind` ("small" or "phone"), each with two captions."""
    pairs, extra = captions()
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(start, start + count):
        spec, caption = pairs[(7 * i + (0 if kind == "small" else 3)) % len(pairs)]
        typed = extra[i % len(extra)]
        if typed == caption:
            typed = extra[(i + 1) % len(extra)]
        path = folder / f"{kind}-{i:03d}.jpg"
        (small_jpeg if kind == "small" else phone_jpeg)(spec, path, seed=1000 * i + len(kind))
        out.append(Upload(path, caption, typed))
    return out


def vitb32_world(root: Path, size: int = VITB32_SIZE) -> list[str]:
    """App arguments of a ViT-B/32 world over `size` gallery vectors, built under `root` once.

    Pretrained weights cannot be had offline: the weights are random (seeded), saved as a local
    checkpoint; so is phi. Latency only: the rankings mean nothing.
    """
    import torch

    from isearle.backbone import load_backbone
    from isearle.phi import Phi, save_phi

    folder = root / f"vitb32-random-{size}"
    checkpoint, phi_path, gallery = folder / "vit-b-32-random.pt", folder / "phi.safetensors", folder / "gallery"
    done = folder / "done.json"
    if not done.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        log(f"building the ViT-B/32 world ({size:,} gallery vectors, random weights) in {folder}")
        with torch.random.fork_rng():
            torch.manual_seed(0)
            backbone = load_backbone("ViT-B-32", None, "cpu")
            phi = Phi.for_backbone(backbone.embed_dim, backbone.token_width).eval()
        torch.save(backbone.model.state_dict(), checkpoint)
        save_phi(phi, phi_path)
        _gallery(gallery, str(checkpoint), size)
        done.write_text(json.dumps({"size": size}) + "\n")
    return ["--gallery", str(gallery), "--phi", str(phi_path)]


def _gallery(out: Path, pretrained: str, size: int) -> None:
    """bench d's clustered unit vectors as a gallery embedded by ViT-B-32/`pretrained` (HNSW at 100k)."""
    from bench.bench_search import unit_vectors
    from isearle.index import GalleryIndex, IndexConfig
    from isearle.runtime import set_threads

    set_threads()
    x = unit_vectors(size)
    index = GalleryIndex.build(x, [f"{i:06d}" for i in range(size)], None, IndexConfig(),
                               {"model": "ViT-B-32", "pretrained": pretrained})
    index.save(out)
