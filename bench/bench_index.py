"""Bench e: gallery indexing throughput (images per second) of `build_gallery_index`.

ViT-B-32 architecture (random weights), 640x480 JPEG files on disk: decode, targetpad preprocess,
image encoder, FAISS add. Batch size and DataLoader worker processes vary; with --ray, the Ray Data
path (local Ray, one actor per core) too (its start-up is included: that is what a user waits for).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    import common  # noqa: F401  (puts the repo on sys.path when run as a script)
from bench.common import Row, log, print_table, row, setup_threads


def write_images(folder: Path, n: int) -> list[Path]:
    """n photo-like 640x480 JPEGs (smooth gradients + noise, so decoding costs what it does for photos)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:480, 0:640].astype(np.float32)
    paths = []
    for i in range(n):
        a, b, c = rng.uniform(0.2, 1.0, 3)
        base = np.stack([np.sin(xx / (40 * a) + i), np.cos(yy / (50 * b)), np.sin((xx + yy) / (60 * c))], -1)
        pixels = np.clip(127 + 100 * base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        path = folder / f"{i:05d}.jpg"
        Image.fromarray(pixels).save(path, quality=90)
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> list[Row]:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--ray", action="store_true", help="also time the Ray Data path")
    args = p.parse_args(argv)
    threads = setup_threads()

    import torch

    from isearle.backbone import load_backbone
    from isearle.indexing import build_gallery_index, folder_items

    torch.manual_seed(0)
    backbone = load_backbone("ViT-B-32", None, "cpu")
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="isearle-bench-") as tmp:
        folder = Path(tmp)
        log(f"bench e: writing {args.images} JPEGs")
        write_images(folder, args.images)
        items = folder_items(folder)
        build_gallery_index(backbone, items[:4], batch_size=4, progress=False)  # warm-up
        case = f"ViT-B-32, {args.images} JPEGs 640x480, torch {threads} threads"
        configs = [(1, 0), (32, 0), (32, 2)]
        for batch, workers in configs:
            log(f"bench e: batch {batch}, workers {workers}")
            t = time.perf_counter()
            index = build_gallery_index(backbone, items, batch_size=batch, num_workers=workers, progress=False)
            dt = time.perf_counter() - t
            assert len(index) == len(items)
            rows.append(row("e index", case, f"batch {batch}, {workers} DataLoader workers", len(items) / dt, "img/s",
                            "", f"{dt:.1f} s"))
        if args.ray:
            from isearle.scale import ray_build_gallery_index

            log("bench e: Ray Data path")
            t = time.perf_counter()
            index = ray_build_gallery_index(backbone, items, batch_size=32, progress=False)
            dt = time.perf_counter() - t
            rows.append(row("e index", case, "Ray Data, local, 1 actor per core, batch 32", len(items) / dt,
                            "img/s", "", f"{dt:.1f} s incl. Ray start-up"))
    return rows


if __name__ == "__main__":
    print_table(main(), "e. gallery indexing throughput")
