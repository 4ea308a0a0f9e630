"""Bench f: OpenMP's wait policy (the default, spinning briefly between parallel regions, vs PASSIVE).

The policy is read once, when torch loads OpenMP, so one process cannot time both: each round runs
one child process per policy, alternating (default, PASSIVE, default, ...), and each child times a
ViT-B-32 truncated text pass (a composed-query prompt, batch 1) and an image pass (one 224x224
image), fp32, 2 torch threads, with a 50 ms pause before each call as between a served app's
queries. Ratios are medians of the per-round ratios. Random weights (speed only).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

if __package__ in (None, ""):
    import common  # noqa: F401  (puts the repo on sys.path when run as a script)
from bench.common import (
    REPO,
    Row,
    check_load,
    finish,
    interleaved,
    log,
    median,
    parse_args,
    ratio,
    row,
)

POLICIES = {"default": None, "PASSIVE": "PASSIVE"}


def child(calls: int) -> dict[str, float]:
    """Median seconds of a text pass and an image pass in this process (its policy is the environment's)."""

    import torch

    from bench.bench_text import demo_captions
    from isearle.backbone import load_backbone
    from isearle.pseudo_word import encode_with_pseudo_tokens, fill_template
    from isearle.runtime import set_threads

    set_threads()
    torch.manual_seed(0)
    backbone = load_backbone("ViT-B-32", None, "cpu")
    prompt = fill_template("a photo of $ that {}", demo_captions()[3])
    token, pixels = torch.randn(backbone.token_width) * 0.02, torch.randn(1, 3, 224, 224)
    sides = {"text": lambda: encode_with_pseudo_tokens(backbone, [prompt], token),
             "image": lambda: backbone.encode_images(pixels)}
    with torch.inference_mode():
        times = interleaved(sides, calls, warmup=1, pause=0.05)
    return {k: median(v) for k, v in times.items()}


def run_child(policy: str | None, calls: int) -> dict[str, float]:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if policy:
        env["OMP_WAIT_POLICY"] = policy
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    out = subprocess.run([sys.executable, "-m", "bench.bench_openmp", "--child", str(calls)], cwd=REPO, env=env,
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> list[Row]:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--rounds", type=int, default=3, help="child processes per policy, alternating")
    p.add_argument("--calls", type=int, default=15, help="timed calls of each pass per child")
    p.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parse_args(p, argv, quick={"rounds": 1, "calls": 2})
    if args.child:
        print(json.dumps(child(args.child)))
        return []
    check_load("bench f: ")
    got: dict[str, dict[str, list[float]]] = {name: {"text": [], "image": []} for name in POLICIES}
    for r in range(args.rounds):
        for name, policy in POLICIES.items():
            for part, seconds in run_child(policy, args.calls).items():
                got[name][part].append(seconds)
        log(f"bench f: round {r + 1}/{args.rounds} done")
    case = "ViT-B-32 fp32, batch 1, 2 torch threads, 50 ms between calls"
    rows: list[Row] = []
    for part, what in (("text", "truncated text pass"), ("image", "image pass")):
        for name in POLICIES:
            rows.append(row("f OpenMP", case, f"{what}, {name} wait policy: p50", median(got[name][part]) * 1e3, "ms"))
        r = ratio(got["PASSIVE"][part], got["default"][part])
        rows.append(row("f OpenMP", case, f"{what}: default policy speed-up over PASSIVE", r[0], "x",
                        note=f"IQR {r[1]:.2f}-{r[2]:.2f} over {args.rounds} process pairs"))
    return rows


if __name__ == "__main__":
    rows = main()
    if rows:
        finish(rows, "f. OpenMP wait policy")
