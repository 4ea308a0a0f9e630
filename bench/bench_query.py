"""Bench c: composed-query latency of the cached `Retriever` over a 100k-image gallery.

ViT-B-32 architecture (random weights), a phi of SEARLE's shape, 100k gallery vectors (bench d's
clustered random unit vectors) in the default index for that size (HNSW) and, for comparison, in
an exact flat index. Warm: a cached reference and a new caption each time (one truncated
text-encoder pass with S* + one index search). Cold: a new 640x480 upload each time (hash,
preprocess, image encoder, phi, text encoder, search). The baseline (fp32 Retriever, full text
pass) and the default path (the reference's prompt start cached as keys/values, `--precision` per tower,
default auto: bf16 where faster and agreeing, and ONNX Runtime for warm captions where it is
installed and faster; also with 1 torch thread) are timed interleaved, 50 ms apart. Goals on 2 idle cores: warm p50 <= 12 ms, cold p50 <= 70 ms.
"""

from __future__ import annotations

import argparse
import time

if __package__ in (None, ""):
    import common  # noqa: F401  (puts the repo on sys.path when run as a script)
from bench.common import (
    SHARED,
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
    ratio,
    ratio_text,
    row,
    setup_threads,
)
from isearle.precision import add_precision_argument

GALLERY = 100_000
#: Seconds between timed calls, as between a served app's requests: worker threads of torch's OpenMP
#: and of ONNX Runtime spin for a while after a call and would slow the next side's call.
PAUSE = 0.05
SUFFIXES = ["", " and smaller", " on a white background", " but twice as big", " seen from above",
            " in the evening", " with a second one next to it", " and more colourful"]


def gallery_index(kind: str):
    """The gallery of bench d (read from run_all's cache folder when d saved it there), else built here."""
    key = f"index_{kind}_{GALLERY}"
    if key not in SHARED:
        from bench.bench_search import unit_vectors
        from isearle.index import GalleryIndex, IndexConfig

        saved = cached_index_dir(kind, GALLERY)
        if saved is not None and (saved / "index.json").is_file():
            log(f"bench c: loading bench d's {GALLERY:,}-vector {kind} gallery")
            SHARED[key] = GalleryIndex.load(saved, mmap=False)
        else:
            log(f"bench c: building the {GALLERY:,}-vector {kind} gallery")
            x = unit_vectors(GALLERY)
            SHARED[key] = GalleryIndex.build(x, [str(i) for i in range(GALLERY)], None, IndexConfig(kind=kind),
                                             {"model": "random", "pretrained": None})
    return SHARED[key]


def percentiles(times: list[float]) -> tuple[float, float]:
    return median(times) * 1e3, percentile(times, 95) * 1e3


def with_threads(n: int, fn):
    """fn run with n torch threads (restored after), set through `runtime.set_threads`."""
    import torch

    from isearle.runtime import set_threads

    def run():
        before = torch.get_num_threads()
        set_threads(n, faiss_threads=None)
        try:
            return fn()
        finally:
            set_threads(before, faiss_threads=None)

    return run


def main(argv: list[str] | None = None) -> list[Row]:
    global GALLERY  # the size gallery_index() builds or loads  # noqa: PLW0603
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--warm", type=int, default=40, help="warm queries per side (new caption each)")
    p.add_argument("--cold", type=int, default=12, help="cold queries per side (new image each)")
    p.add_argument("--gallery", type=int, default=GALLERY, help="gallery size (bench d's when run_all ran it)")
    add_precision_argument(p)
    args = parse_args(p, argv, quick={"warm": 6, "cold": 3, "gallery": 5_000})
    GALLERY = args.gallery
    threads = setup_threads()
    check_load("bench c: ")

    import numpy as np
    import torch
    from PIL import Image

    from bench.bench_text import demo_captions
    from isearle.backbone import load_backbone
    from isearle.phi import Phi
    from isearle.pseudo_word import encode_with_pseudo_tokens, fill_template
    from isearle.reference import Reference
    from isearle.retrieval import Retriever
    from isearle.tuning import tune

    torch.manual_seed(0)
    backbone = load_backbone("ViT-B-32", None, "cpu")
    phi = Phi.for_backbone(backbone.embed_dim, backbone.token_width).eval()
    captions = [c + s for s in SUFFIXES for c in demo_captions()]
    rng = np.random.default_rng(0)

    def upload() -> Image.Image:
        return Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8))

    index = gallery_index("hnsw")
    baseline = Retriever(backbone, index, phi, prefix_cache=False)  # fp32, full text pass, no prompt-start cache
    new = Retriever(backbone, index, phi)
    tune(new, args.precision)
    log(f"bench c: precision {new.precision_report()}")
    reference = upload()
    count = iter(range(10**9))

    def warm(retriever: Retriever):
        ref = reference if retriever is baseline else Reference.of(reference)  # the engine keeps one per upload
        return lambda: retriever.query(ref, f"{captions[next(count) % len(captions)]} #{next(count)}", k=10)

    sides = {"baseline": warm(baseline), "default": warm(new)}
    if threads > 1:  # a shared machine may give this process less than its quota
        sides["default, 1 thread"] = with_threads(1, warm(new))
    w = interleaved(sides, args.warm, warmup=2, pause=PAUSE)
    check_load("bench c: after warm queries: ")

    def cold(retriever: Retriever):
        return lambda: retriever.query(upload(), captions[next(count) % len(captions)], k=10)

    csides = {"baseline": cold(baseline), "default": cold(new)}
    if threads > 1:
        csides["default, 1 thread"] = with_threads(1, cold(new))
    c = interleaved(csides, args.cold, warmup=1, pause=PAUSE)
    # Where the time goes (the calls the retriever makes), fp32 vs bf16, interleaved.
    token = torch.randn(backbone.token_width) * 0.02
    prompt = fill_template("a photo of $ that {}", captions[3])
    image = upload()
    low = backbone.with_precision("bf16")
    with torch.inference_mode():
        cached = {p: Retriever(b, index, phi) for p, b in (("fp32", backbone), ("bf16", low))}
        parts = interleaved({
            "text fp32": lambda: encode_with_pseudo_tokens(backbone, [prompt], token),
            "text bf16": lambda: encode_with_pseudo_tokens(low, [prompt], token),
            "text fp32, prompt start cached": lambda: cached["fp32"].prompt_feature("ref", token, captions[3]),
            "text bf16, prompt start cached": lambda: cached["bf16"].prompt_feature("ref", token, captions[3]),
            **({"text, prompt start cached, ONNX Runtime": lambda: new.prompt_feature("ref", token, captions[3])}
               if new.text_engine is not None else {}),
            "image fp32": lambda: backbone.encode_pil([image]),
            "image bf16": lambda: low.encode_pil([image]),
            "preprocess": lambda: backbone.preprocess(image),
        }, 8, pause=PAUSE)
    query = np.asarray(torch.nn.functional.normalize(torch.randn(1, backbone.embed_dim), dim=-1))
    flat = gallery_index("flat")
    search = interleaved({"hnsw": lambda: index.search(query, 10), "flat": lambda: flat.search(query, 10)}, 30)

    case = f"ViT-B-32, {GALLERY // 1000}k gallery (HNSW), torch {threads} threads, FAISS 1"
    rows: list[Row] = []
    for label, got, goal in (("warm (cached reference, new caption)", w, 12), ("cold (new 640x480 upload)", c, 70)):
        for side, ts in got.items():
            p50, p95 = percentiles(ts)
            rows.append(row("c query", case, f"{label}, {side}: p50", p50, "ms", f"<= {goal} ms" if side == "default" else "",
                            f"p95 {p95:.1f} ms" + (f"; {new.precision_report()}" if side == "default" else "")))
        best = min((s for s in got if s != "baseline"), key=lambda s: median(got[s]))
        r = ratio(got["baseline"], got[best])
        new_p50 = median(got[best]) * 1e3
        rows.append(goal_row(
            f"{label.split(' (')[0]} query ({label.split('(')[1][:-1]}), ViT-B-32, {GALLERY // 1000}k gallery, p50",
            f"{median(got['baseline']) * 1e3:.1f} ms (fp32, {threads} threads)",
            f"{new_p50:.1f} ms (text {new.precision.precision}, images {new.image_precision.precision}, {best.replace('default', '').strip(', ') or f'{threads} threads'}); "
            f"{ratio_text(r)} faster",
            f"<= {goal} ms", "met" if new_p50 <= goal else "not met on this machine"))
    for name, ts in parts.items():
        rows.append(row("c query", case, f"part: {name}", median(ts) * 1e3, "ms"))
    for name, ts in search.items():
        rows.append(row("c query", case, f"part: search {name}", median(ts) * 1e3, "ms"))
    return rows


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


if __name__ == "__main__":
    finish(main(), "c. composed query latency")
