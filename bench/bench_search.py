"""Bench d: gallery search at 100k and 1M vectors: flat (exact) vs HNSW vs IVF-PQ (+ SQ8) vs IVF-SQ8.

Random unit vectors in 512-d (ViT-B/32's feature size). "clustered" (default): points drawn around
1,000 random centres (cosine ~0.7 to their centre), queries from the same mixture: like image
features, neighbourhoods exist. "uniform": i.i.d. uniform on the sphere, the worst case for any
approximate index (every point is nearly equidistant from a query; recall collapses).
Every index is a `GalleryIndex` (string ids and all), saved and re-opened memory-mapped.
Latency: one query at a time, one FAISS thread (the service's setting), p50 over `--queries`, the
kinds interleaved (each query runs on every index in turn, so all see the same load).
Recall@10 against exact search over 200 queries. Bytes per vector: the saved index file / N.
HNSW at 1M takes many minutes to build on 2 cores; it runs only with --hnsw-1m.
"""

from __future__ import annotations

import argparse
import gc
import shutil
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    import common  # noqa: F401  (puts the repo on sys.path when run as a script)
from bench.common import (
    Row,
    cached_index_dir,
    check_load,
    finish,
    goal_row,
    interleaved,
    log,
    median,
    parse_args,
    percentile,
    row,
    setup_threads,
)

DIM = 512


def unit_vectors(n: int, dim: int = DIM, seed: int = 0, data: str = "clustered", clusters: int = 1000):
    """n random unit vectors, uniform or around `clusters` random centres (the same for every seed)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    centres = None
    if data == "clustered":
        c = np.random.default_rng(12345).standard_normal((clusters, dim), dtype=np.float32)
        centres = c / np.linalg.norm(c, axis=1, keepdims=True)
    x = np.empty((n, dim), np.float32)
    for s in range(0, n, 100_000):  # chunked: no float64 temporaries the size of the gallery
        part = rng.standard_normal((min(100_000, n - s), dim), dtype=np.float32)
        if centres is not None:
            part = centres[rng.integers(0, clusters, len(part))] + part / np.sqrt(dim)
        x[s : s + len(part)] = part / np.linalg.norm(part, axis=1, keepdims=True)
    return x


def recall_at_10(index, queries, truth) -> float:
    import faiss

    faiss.omp_set_num_threads(1)
    got = index.search(queries, 10)
    hits = [len({int(i) for i, _ in g} & set(t.tolist())) for g, t in zip(got, truth, strict=True)]
    return sum(hits) / (10 * len(hits))


LABELS = {"flat": "flat (exact)", "hnsw": "HNSW32 efSearch 64", "ivfpq": "IVF-PQ64 nprobe 16 + SQ8 re-rank x8",
          "ivfsq": "IVF-SQ8 nprobe 16"}


def bench_size(n: int, n_queries: int, kinds: list[str], workdir: Path, data: str) -> list[Row]:
    """Build, save and re-open (memory-mapped) each kind; then time single queries interleaved
    across the kinds (query i on every index in turn) and measure recall@10 against flat."""
    import faiss
    import torch

    from isearle.index import GalleryIndex, IndexConfig

    check_load(f"bench d: {n:,} random unit vectors ({data}): ")
    x = unit_vectors(n, data=data)
    queries = unit_vectors(200, seed=1, data=data)
    ids = [str(i) for i in range(n)]
    configs = {
        "flat": IndexConfig(kind="flat"),
        "hnsw": IndexConfig(kind="hnsw", hnsw_m=32, hnsw_ef_search=64),
        "ivfpq": IndexConfig(kind="ivfpq", pq_m=64, ivf_nprobe=16, refine="SQ8", refine_k_factor=8),
        "ivfsq": IndexConfig(kind="ivfsq", ivf_nprobe=16),
    }
    case = f"{n:,} x {DIM}-d, {data}"
    built: dict[str, tuple[float, float, float]] = {}
    truth = None
    indexes = {}
    for kind in ["flat", *[k for k in kinds if k != "flat"]]:
        log(f"bench d: {n:,} {kind} build")
        faiss.omp_set_num_threads(torch.get_num_threads())  # building: all cores
        t = time.perf_counter()
        index = GalleryIndex.build(x, ids, None, configs[kind], {"model": "random", "pretrained": None})
        build_s = time.perf_counter() - t
        if kind == "flat":
            _, truth = index.faiss_index.search(queries, 10)  # exact ground truth (batched)
        directory = workdir / f"{kind}_{n}"
        index.save(directory)
        keep = cached_index_dir(kind, n)
        if keep is not None and kind in ("flat", "hnsw") and n <= 200_000 and data == "clustered":
            shutil.copytree(directory, keep, dirs_exist_ok=True)  # bench c reuses the 100k gallery
        del index
        gc.collect()
        t = time.perf_counter()
        indexes[kind] = GalleryIndex.load(directory, mmap=True)
        built[kind] = (build_s, time.perf_counter() - t, (directory / "index.faiss").stat().st_size / n)
    del x
    gc.collect()
    faiss.omp_set_num_threads(1)
    for index in indexes.values():  # every query once, untimed: the timed ones see the pages a served
        for q in queries:  # gallery keeps warm (the first touch of a memory-mapped list is a page fault)
            index.search(q, 10)

    def searcher(index):
        count = iter(range(10**9))
        return lambda: index.search(queries[next(count) % len(queries)], 10)

    times = interleaved({kind: searcher(index) for kind, index in indexes.items()}, n_queries, warmup=0)
    rows: list[Row] = []
    results = {}
    for kind, index in indexes.items():
        build_s, load_s, per = built[kind]
        p50, p95 = median(times[kind]) * 1e3, percentile(times[kind], 95) * 1e3
        rec = recall_at_10(index, queries, truth)
        results[kind] = (p50, rec, build_s, per)
        note = f"build {build_s:.1f} s, mmap load {load_s * 1e3:.0f} ms, p95 {p95:.2f} ms"
        rows.append(row("d search", case, f"{LABELS[kind]}: p50 latency", p50, "ms", "", note))
        rows.append(row("d search", case, f"{LABELS[kind]}: recall@10", rec, "", "", "vs exact search"))
        rows.append(row("d search", case, f"{LABELS[kind]}: bytes/vector", per, "B", "", "index file / N"))
    # Cheap extra operating points: search parameters only.
    for kind, param, value, label in (("hnsw", "hnsw_ef_search", 256, "HNSW32 efSearch 256"),
                                      ("ivfpq", "ivf_nprobe", 64, "IVF-PQ64 nprobe 64 + SQ8 re-rank x8"),
                                      ("ivfsq", "ivf_nprobe", 8, "IVF-SQ8 nprobe 8")):
        if kind in indexes:
            setattr(indexes[kind].config, param, value)
            indexes[kind].apply_search_params()
            rows.append(row("d search", case, f"{label}: recall@10", recall_at_10(indexes[kind], queries, truth),
                            "", "", f"p50 {latency_ms(indexes[kind], queries, n_queries)[0]:.2f} ms"))
    if n >= 1_000_000 and "ivfsq" in results:
        fl, pq, sq = results["flat"], results.get("ivfpq"), results["ivfsq"]
        met = sq[0] <= 5 and sq[1] >= 0.95 and sq[2] <= 300 and sq[3] <= 1024
        rows.append(goal_row(
            f"{n // 1_000_000}M x {DIM}-d gallery search ({data})",
            f"flat {fl[0]:.1f} ms" + (f"; IVF-PQ {pq[0]:.2f} ms at recall@10 {pq[1]:.2f}" if pq else ""),
            f"IVF-SQ8 (nprobe 16) {sq[0]:.2f} ms at recall@10 {sq[1]:.3f}; build {sq[2]:.0f} s; {sq[3]:.0f} B/vector",
            "p50 <= 5 ms at recall@10 >= 0.95, build <= 5 min on 2 cores, <= 1 KB/vector",
            "met" if met else "not met on this machine", "single queries interleaved across the indexes, 1 FAISS thread"))
    del indexes
    gc.collect()
    return rows


def latency_ms(index, queries, n: int) -> tuple[float, float]:
    times = []
    for q in queries[:n]:
        t = time.perf_counter()
        index.search(q, 10)
        times.append(time.perf_counter() - t)
    times = times[2:] if len(times) > 4 else times  # first calls touch cold pages
    return median(times) * 1e3, percentile(times, 95) * 1e3


def main(argv: list[str] | None = None) -> list[Row]:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--queries", type=int, default=30, help="single queries timed per index")
    p.add_argument("--hnsw-1m", action="store_true", help="also build HNSW above 200k vectors (slow)")
    p.add_argument("--data", choices=["clustered", "uniform"], default="clustered")
    args = parse_args(p, argv, quick={"sizes": [10_000], "queries": 10})
    setup_threads()
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="isearle-bench-") as tmp:
        for n in args.sizes:
            kinds = ["flat", "ivfpq", "ivfsq"] + (["hnsw"] if n <= 200_000 or args.hnsw_1m else [])
            rows += bench_size(n, args.queries, kinds, Path(tmp), args.data)
            if "hnsw" not in kinds:
                rows.append(row("d search", f"{n:,} x {DIM}-d, {args.data}", "HNSW32", "skipped", "", "",
                                "build too slow for the 10-minute budget on 2 cores (--hnsw-1m)"))
    return rows


if __name__ == "__main__":
    finish(main(), "d. search: flat vs HNSW vs IVF-PQ vs IVF-SQ8")
