"""Bench a: text encoding of composed-query prompts: full 77 tokens, truncated fp32, truncated bf16.

The causal text mask makes the end-of-text feature depend only on the positions before it, so
`isearle.pseudo_word.encode_tokens(truncate=True)` runs the transformer over the prompt's tokens
only. Prompts: "a photo of $ that <caption>" for the demo's relative captions (assets/examples.json),
one query at a time as in the demo, with a pseudo-token in place of "$". Random weights (speed only).
The three are timed interleaved (full, fp32, bf16, full, ...); ratios are medians of paired ratios.
bf16 uses the backbone's bf16 weights copy (`Backbone.with_precision`), as the query path does.
"""

from __future__ import annotations

import argparse
import json

if __package__ in (None, ""):
    import common  # noqa: F401  (puts the repo on sys.path when run as a script)
from bench.common import (
    REPO,
    Row,
    check_load,
    finish,
    interleaved,
    median,
    parse_args,
    ratio,
    row,
    setup_threads,
    timeit,
)

FALLBACK_CAPTIONS = [
    "is blue instead", "has two dogs on a beach", "make the cross orange",
    "shows the same car but at night with the lights on", "is a drawing of it",
]


def demo_captions(limit: int = 8) -> list[str]:
    """Relative captions of the demo's examples (assets/examples.json), else a fixed list."""
    path = REPO / "assets" / "examples.json"
    try:
        refs = json.loads(path.read_text())["references"]
        caps = [r["relative_caption"] for r in refs if r.get("relative_caption")]
    except (OSError, KeyError, ValueError, TypeError):
        caps = []
    return (caps or FALLBACK_CAPTIONS)[:limit]


def bench_model(name: str, repeat: int) -> list[Row]:
    """Full 77-token context, truncated fp32 (the baseline) and truncated with the bf16 weights copy,
    timed interleaved on every demo prompt."""
    import torch

    from isearle.backbone import load_backbone
    from isearle.pseudo_word import encode_with_pseudo_tokens, fill_template

    torch.manual_seed(0)
    backbone = load_backbone(name, None, "cpu")
    low = backbone.with_precision("bf16")
    prompts = [fill_template("a photo of $ that {}", c) for c in demo_captions()]
    lengths = [int(t.argmax()) + 1 for t in backbone.tokenize(prompts)]
    token = torch.randn(backbone.token_width) * 0.02
    times: dict[str, list[float]] = {"full": [], "fp32": [], "bf16": []}
    diff, cos = 0.0, 1.0
    with torch.inference_mode():
        for prompt in prompts:
            got = interleaved({
                "full": lambda p=prompt: encode_with_pseudo_tokens(backbone, [p], token, truncate=False),
                "fp32": lambda p=prompt: encode_with_pseudo_tokens(backbone, [p], token),
                "bf16": lambda p=prompt: encode_with_pseudo_tokens(low, [p], token),
            }, repeat)
            for k, ts in got.items():
                times[k] += ts
            a = encode_with_pseudo_tokens(backbone, [prompt], token, truncate=True)
            b = encode_with_pseudo_tokens(backbone, [prompt], token, truncate=False)
            c = encode_with_pseudo_tokens(low, [prompt], token)
            diff = max(diff, float((a - b).abs().max() / b.abs().max()))
            cos = min(cos, float(torch.nn.functional.cosine_similarity(a, c)))
    full, trunc, bf16 = (median(times[k]) * 1e3 for k in ("full", "fp32", "bf16"))
    t0, per_token = cost_model(backbone, token, repeat)
    typical = sorted(lengths)[len(lengths) // 2]
    case = f"{name}, {len(prompts)} demo prompts ({min(lengths)}-{max(lengths)} tokens), batch 1"
    bound = (t0 + per_token * 77) / (t0 + per_token * typical)
    r_trunc, r_bf16 = ratio(times["full"], times["fp32"]), ratio(times["fp32"], times["bf16"])
    return [
        row("a text", case, "full 77-token context, fp32", full, "ms"),
        row("a text", case, "truncated context, fp32 (baseline)", trunc, "ms"),
        row("a text", case, "truncated, bf16 weights", bf16, "ms", "", f"min cosine to fp32 {cos:.5f}"),
        row("a text", case, "speed-up of truncation (fp32)", r_trunc[0], "x", "",
            f"IQR {r_trunc[1]:.2f}-{r_trunc[2]:.2f}; max rel. feature diff {diff:.1e}"),
        row("a text", case, "speed-up of bf16 (truncated)", r_bf16[0], "x", "", f"IQR {r_bf16[1]:.2f}-{r_bf16[2]:.2f}"),
        row("a text", case, "fixed cost per pass t0 (fit t = t0 + c L, fp32)", t0, "ms", "",
            f"c = {per_token:.2f} ms/token; bound t(77)/t({typical}) = {bound:.1f}x"),
    ]


def cost_model(backbone, token, repeat: int, lengths: tuple[int, ...] = (8, 16, 32, 48, 77)) -> tuple[float, float]:
    """Least-squares fit of the encoder time over the sequence length L: t = t0 + c L (ms).

    t0 is what does not shrink with the prompt (reading every weight once, per-op dispatch):
    it bounds the speed-up of truncation at t(77) / t(L).
    """
    import numpy as np
    import torch

    from isearle.pseudo_word import encode_tokens

    gen = torch.Generator().manual_seed(0)
    ts = []
    for n in lengths:
        ids = torch.zeros(1, backbone.context_length, dtype=torch.long)
        ids[0, :n] = torch.randint(300, 40000, (n,), generator=gen)
        ids[0, 0], ids[0, 4], ids[0, n - 1] = 49406, backbone.placeholder_id, 49407
        with torch.inference_mode():
            ts.append(median(timeit(lambda ids=ids: encode_tokens(backbone, ids, token), repeat=repeat * 2)) * 1e3)
    c, t0 = np.polyfit(np.array(lengths, float), np.array(ts), 1)
    return float(t0), float(c)


def main(argv: list[str] | None = None) -> list[Row]:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--models", nargs="+", default=["ViT-B-32", "ViT-L-14"])
    p.add_argument("--repeat", type=int, default=3, help="timed calls per prompt and mode")
    args = parse_args(p, argv, quick={"repeat": 2, "models": ["ViT-B-32"]})
    setup_threads()
    rows: list[Row] = []
    for name in args.models:
        check_load(f"bench a: {name}: ")
        rows += bench_model(name, args.repeat)
    return rows


if __name__ == "__main__":
    finish(main(), "a. text encoding: truncated vs full context")
