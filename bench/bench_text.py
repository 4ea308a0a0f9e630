"""Bench a: text encoding of composed-query prompts, truncated context vs the full 77 tokens.

The causal text mask makes the end-of-text feature depend only on the positions before it, so
`isearle.pseudo_word.encode_tokens(truncate=True)` runs the transformer over the prompt's tokens
only. Prompts: "a photo of $ that <caption>" for the demo's relative captions (assets/examples.json),
one query at a time as in the demo, with a pseudo-token in place of "$". Random weights (speed only).
Goal: >= 5x on ViT-B-32 and ViT-L-14.
"""

from __future__ import annotations

import argparse
import json

if __package__ in (None, ""):
    import common  # noqa: F401  (puts the repo on sys.path when run as a script)
from bench.common import REPO, Row, log, median, print_table, row, setup_threads, timeit

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
    import torch

    from isearle.backbone import load_backbone
    from isearle.pseudo_word import encode_with_pseudo_tokens, fill_template

    torch.manual_seed(0)
    backbone = load_backbone(name, None, "cpu")
    prompts = [fill_template("a photo of $ that {}", c) for c in demo_captions()]
    lengths = [int(t.argmax()) + 1 for t in backbone.tokenize(prompts)]
    token = torch.randn(backbone.token_width) * 0.02
    times: dict[bool, list[float]] = {True: [], False: []}
    diff = 0.0
    with torch.inference_mode():
        for prompt in prompts:
            for truncate in (True, False):
                times[truncate] += timeit(
                    lambda p=prompt, t=truncate: encode_with_pseudo_tokens(backbone, [p], token, truncate=t),
                    repeat=repeat)
            a = encode_with_pseudo_tokens(backbone, [prompt], token, truncate=True)
            b = encode_with_pseudo_tokens(backbone, [prompt], token, truncate=False)
            diff = max(diff, float((a - b).abs().max() / b.abs().max()))
    full, trunc = median(times[False]) * 1e3, median(times[True]) * 1e3
    t0, per_token = cost_model(backbone, token, repeat)
    typical = sorted(lengths)[len(lengths) // 2]
    case = f"{name}, {len(prompts)} demo prompts ({min(lengths)}-{max(lengths)} tokens), batch 1"
    bound = (t0 + per_token * 77) / (t0 + per_token * typical)
    return [
        row("a text", case, "full 77-token context", full, "ms"),
        row("a text", case, "truncated context", trunc, "ms"),
        row("a text", case, "speed-up", full / trunc, "x", ">= 5x", f"max rel. feature diff {diff:.1e}"),
        row("a text", case, "fixed cost per pass t0 (fit t = t0 + c L)", t0, "ms", "",
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
    args = p.parse_args(argv)
    setup_threads()
    rows: list[Row] = []
    for name in args.models:
        log(f"bench a: {name}")
        rows += bench_model(name, args.repeat)
    return rows


if __name__ == "__main__":
    print_table(main(), "a. text encoding: truncated vs full context")
