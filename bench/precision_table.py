"""The ShapesCIR test table with bf16 queries against fp32 (the accuracy side of `--precision`).

    python bench/precision_table.py [--limit N] [--methods image text image+text phi [oti]]

The shipped offline-world CLIP and phi, `isearle.evaluation.evaluate` on the ShapesCIR test split:
fp32 (the reference); "bf16 queries": what the app does with --precision bf16 over a gallery
indexed in fp32: the reference images and the captions / pseudo-word prompts encoded by the bf16
weights copy, the gallery features fp32; "bf16 text": only the text side in bf16 (a warm query of a
reference encoded in fp32); "bf16 all": gallery in bf16 too (a gallery indexed in bf16).
R@1 and mAP@10 (percent) with their differences to fp32; the goal is a difference of at most 0.5 points.
"""

from __future__ import annotations

import argparse
import tempfile

if __package__ in (None, ""):
    import common  # noqa: F401  (puts the repo on sys.path when run as a script)
from bench.common import (
    Row,
    check_load,
    finish,
    log,
    parse_args,
    row,
    setup_threads,
)

METRICS = ("R@1", "mAP@10")


def bf16_queries(backbone, low, method: str, phi, limit: int | None, ref_cache: str, low_cache: str,
                 exclude: bool) -> dict:
    """Metrics with references and text in bf16 (`low`) over the fp32 gallery (cached features)."""
    import torch.nn.functional as F

    from isearle.datasets import FeatureCache, extract_features_cached, load_benchmarks
    from isearle.evaluation import benchmark_metrics, compose_benchmark_queries, rank_gallery, resolve_phi

    bench = load_benchmarks("shapes", None, "test", image_size=backbone.image_size)[0].limit(limit)
    ids = bench.image_ids()

    def features(b, root: str):
        cache = FeatureCache.for_backbone(f"{root}/features", b, bench.cache_namespace)
        return extract_features_cached(b, ids, bench.images, cache, progress=False)

    row = {i: r for r, i in enumerate(ids)}
    gallery = F.normalize(features(backbone, ref_cache)[[row[g] for g in bench.gallery]], dim=-1)
    ref_ids = list(dict.fromkeys(q.reference for q in bench.queries))
    ref_feats = features(low, low_cache)[[row[r] for r in ref_ids]]
    phi_net = resolve_phi(low, phi)[0] if phi else None
    queries = compose_benchmark_queries(low, bench, method, ref_feats, {r: j for j, r in enumerate(ref_ids)},
                                        phi=phi_net, progress=False)
    return benchmark_metrics("shapes", [(bench, rank_gallery(bench, queries, gallery, exclude, progress=False))])


def main(argv: list[str] | None = None) -> list[Row]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--limit", type=int, default=None, help="first N test queries (default: all)")
    p.add_argument("--methods", nargs="+", default=["image", "text", "image+text", "phi"])
    args = parse_args(p, argv, quick={"limit": 16, "methods": ["image+text", "phi"]})
    setup_threads()
    check_load("precision table: ")

    from isearle.backbone import load_backbone
    from isearle.evaluation import evaluate
    from isearle.oti import OTIConfig
    from isearle.paths import ASSETS_DIR

    backbone = load_backbone("isearle-shapes", "isearle-shapes", "cpu")
    low = backbone.with_precision("bf16")
    phi = str(ASSETS_DIR / "models" / "isearle-shapes-phi.safetensors")
    rows: list[Row] = []
    worst = 0.0
    with tempfile.TemporaryDirectory() as cache, tempfile.TemporaryDirectory() as low_cache:
        for method in args.methods:
            kw = dict(phi=phi if method == "phi" else None, limit=args.limit, num_workers=0, progress=False,
                      oti=OTIConfig(max_norm=2.0, batch_size=64))
            log(f"precision table: {method}")
            ref = evaluate(backbone, "shapes", "test", method, cache_dir=cache, **kw)
            variants = {
                "bf16 queries": bf16_queries(backbone, low, method, kw["phi"], args.limit, cache, low_cache,
                                             ref["meta"]["exclude_reference"]),
                "bf16 text": evaluate(low, "shapes", "test", method, cache_dir=cache, **kw),  # fp32 images
                "bf16 all": evaluate(low, "shapes", "test", method, cache_dir=low_cache, **kw),
            }
            n = ref["meta"]["n_queries"]
            for m in METRICS:
                diffs = {k: v[m] - ref[m] for k, v in variants.items()}
                worst = max(worst, abs(diffs["bf16 queries"]))
                rows.append(row("precision", f"ShapesCIR test ({n} queries), {method}", m, ref[m], "",
                                "bf16 queries: within 0.5",
                                "; ".join(f"{k} {variants[k][m]:.2f} ({d:+.2f})" for k, d in diffs.items())))
    rows.append(row("precision", "ShapesCIR test", "largest difference, bf16 queries vs fp32", worst, "points", "<= 0.5",
                    "met" if worst <= 0.5 else "not met"))
    return rows


if __name__ == "__main__":
    finish(main(), "ShapesCIR test table: bf16 queries vs fp32")
