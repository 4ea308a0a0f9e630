"""Bench b: OTI optimisation steps per second, SEARLE's step vs isearle's, and the phi warm start.

SEARLE's step, re-implemented faithfully (its oti_inversion loop): tokenise the step's templates,
encode them with the pseudo-tokens over the full 77-token context (content loss); tokenise the
step's GPT phrases, re-encode the real phrases without gradient and the "$" phrases with the
pseudo-tokens, again over the full context (GPT loss); loss = (L_content + 0.5 L_gpt) / 1.5; AdamW
(lr 2e-2, wd 0.01) and an EMA of 0.99. Intermediate variants add one change at a time; the last row
is `isearle.oti` itself (truncated context, phrase targets encoded once per batch, template and
phrase prompts in one fused pass). All variants draw the same prompts from the same seed and start
from the same tokens, so their loss trajectories must agree to fp32 rounding.

Warm start: on the offline shapes world (its CLIP and phi, when assets/models holds them), the
number of OTI steps from phi's token needed to reach the loss of 350 cold steps.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import random
import time
from pathlib import Path

if __package__ in (None, ""):
    import common  # noqa: F401  (puts the repo on sys.path when run as a script)
from bench.common import REPO, Row, log, median, print_table, row, setup_threads

NOUNS = [
    "dog", "cat", "car", "bicycle", "tree", "house", "chair", "table", "bird", "boat", "flower", "horse",
    "train", "cup", "book", "phone", "shoe", "dress", "shirt", "lamp", "clock", "bench", "bottle", "guitar",
    "pizza", "cake", "bus", "truck", "airplane", "umbrella",
]


def make_tasks(n: int, seed: int = 0) -> tuple[list, dict]:
    """Phrase tasks of n images: 15 concepts each, 8 offline phrases per concept (project generator)."""
    from isearle.oti import phrase_tasks
    from isearle.phrases import offline_generator

    gen = offline_generator(8, seed)
    bank = {c: gen(c) for c in NOUNS}
    rng = random.Random(seed)
    names = [rng.sample(NOUNS, 15) for _ in range(n)]
    return phrase_tasks(names, bank, 15), bank


class SearleStep:
    """SEARLE's OTI loss, computed the way its code does, on the prompts drawn by an OTIObjective."""

    def __init__(self, objective, truncate: bool = False, cache_targets: bool = False) -> None:
        self.o, self.truncate, self.cache_targets = objective, truncate, cache_targets
        self.cached: dict[tuple[int, int], object] = {}

    def loss(self, step: int, v):
        import torch

        from isearle.oti import cosine_loss
        from isearle.pseudo_word import encode_tokens, tokenize_prompts

        o, b = self.o, self.o.backbone
        cfg = o.config
        templates = [cfg.templates[i] for i in o.template_choice[step].tolist()]
        text = encode_tokens(b, tokenize_prompts(b, templates), v, truncate=self.truncate)
        content = cosine_loss(text, o.image_features)
        rows = [i for i, c in enumerate(o.phrase_choice[step]) if c >= 0]
        if not rows:
            return content
        keys = [(i, o.phrase_choice[step][i]) for i in rows]
        real = [o.tasks[i].phrases[c] for i, c in keys]
        pseudo = [o.tasks[i].pseudo_phrases[c] for i, c in keys]
        if self.cache_targets and all(k in self.cached for k in keys):
            target = torch.stack([self.cached[k] for k in keys])
        else:
            with torch.no_grad():
                target = encode_tokens(b, b.tokenize(real), truncate=self.truncate)
            if self.cache_targets:
                self.cached.update(zip(keys, target, strict=True))
        pred = encode_tokens(b, tokenize_prompts(b, pseudo), v[rows], truncate=self.truncate)
        gpt = cosine_loss(pred, target)
        return (cfg.lambda_content * content + cfg.lambda_gpt * gpt) / (cfg.lambda_content + cfg.lambda_gpt)


def optimise(loss_fn, init, config, steps: int) -> tuple[list[float], list[float]]:
    """The OTI loop of `isearle.oti.invert` around any loss: (step seconds, step losses)."""
    import torch

    v = torch.nn.Parameter(init.clone())
    ema = v.detach().clone()
    opt = torch.optim.AdamW([v], lr=config.lr, weight_decay=config.weight_decay)
    times, losses = [], []
    for step in range(steps):
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(step, v)
        loss.backward()
        opt.step()
        ema.mul_(config.ema_decay).add_(v.detach(), alpha=1 - config.ema_decay)
        times.append(time.perf_counter() - t)
        losses.append(float(loss.detach()))
    return times, losses


def bench_steps(model: str, batch: int, searle_steps: int, fast_steps: int) -> list[Row]:
    import torch

    from isearle.backbone import load_backbone
    from isearle.oti import OTIConfig, OTIObjective

    torch.manual_seed(0)
    backbone = load_backbone(model, None, "cpu")
    feats = torch.randn(batch, backbone.embed_dim, generator=torch.Generator().manual_seed(1))
    tasks, _ = make_tasks(batch)
    # gamma = 0: SEARLE has no noise; the step cost is the same with it.
    config = OTIConfig(steps=350, batch_size=batch, gamma=0.0, seed=0)
    t = time.perf_counter()
    objective = OTIObjective(backbone, feats, tasks, config, random.Random(config.seed))
    setup = time.perf_counter() - t
    n_targets = 0 if objective.phrase_targets is None else objective.phrase_targets.shape[0]
    init = torch.randn(batch, backbone.token_width, generator=torch.Generator().manual_seed(0)) * config.init_std
    phrase_len = max(int(tok.argmax()) + 1 for tok in objective.phrase_tokens)
    variants = [
        ("SEARLE step (full context, 2 passes, targets re-encoded)", SearleStep(objective).loss, searle_steps),
        ("+ truncated context", SearleStep(objective, truncate=True).loss, fast_steps),
        ("+ truncated, targets cached", SearleStep(objective, True, True).loss, fast_steps),
        ("isearle.oti (truncated, cached, fused pass)", objective.loss, fast_steps),
    ]
    results = {}
    for name, fn, steps in variants:
        log(f"bench b: {model} {name}, {steps} steps")
        times, losses = optimise(fn, init, config, steps)
        results[name] = (median(times[1:]), losses)  # the first step warms up kernels
    base_time, base_losses = results[variants[0][0]]
    case = f"{model}, batch {batch}, 15 concepts x 8 phrases/image (<= {phrase_len} tokens)"
    rows = []
    for name, _, _ in variants:
        step_s, losses = results[name]
        k = min(len(losses), len(base_losses))
        diff = max(abs(a - b) for a, b in zip(losses[:k], base_losses[:k], strict=True))
        goal = ">= 8x" if name.startswith("isearle") else ""
        rows.append(row("b OTI", case, f"{name}: steps/s", 1 / step_s, "steps/s", "",
                        f"{step_s * 1e3:.0f} ms/step"))
        if name != variants[0][0]:
            rows.append(row("b OTI", case, f"{name}: speed-up", base_time / step_s, "x", goal,
                            f"loss max |diff| over {k} steps {diff:.1e}"))
    fast_time = results[variants[-1][0]][0]
    total_fast = setup + 350 * fast_time
    rows.append(row("b OTI", case, "isearle.oti one-off target encoding (350-step draw)", setup, "s",
                    "", f"{n_targets} distinct phrase targets"))
    rows.append(row("b OTI", case, "350-step OTI incl. target encoding: speed-up", 350 * base_time / total_fast,
                    "x", "", f"{total_fast:.1f} s vs {350 * base_time:.0f} s"))
    return rows


def bench_warm_start(phi_path: Path | None = None, steps: int = 350, batch: int = 8, window: int = 10,
                     warm_steps: int = 200) -> list[Row]:
    """Steps of OTI from phi's token needed to reach the loss of `steps` cold steps (shapes world).

    The warm run stops at `warm_steps` (the answer is then "> warm_steps"); the loss compared is the
    mean over `window` steps (each step draws random templates and phrases, so single losses jitter).
    """
    import torch

    model_path = REPO / "assets" / "models" / "isearle-shapes.safetensors"
    phi_path = phi_path or REPO / "assets" / "models" / "isearle-shapes-phi.safetensors"
    case = (f"isearle-shapes CLIP + phi ({phi_path.name}), batch {batch}, held-out scenes, {steps} cold steps, "
            "phi's OTI settings")
    if not (model_path.is_file() and phi_path.is_file()):
        return [row("b OTI", case, "warm start from phi: steps to reach the cold loss", "n/a", "", "",
                    "no trained shapes CLIP/phi in assets/models (scripts/offline_world.sh)")]
    from isearle.backbone import load_backbone
    from isearle.oti import OTIConfig, invert
    from isearle.phi import load_phi
    from isearle.shapes.world import scene_source

    backbone = load_backbone("isearle-shapes", "isearle-shapes", "cpu")
    phi = load_phi(phi_path)
    _, items = scene_source(batch, 424242, backbone.image_size)
    feats = backbone.encode_pil([item() for item in items])
    # the OTI that made phi's targets: content loss only, with the gamma and norm cap phi records
    config = OTIConfig(steps=steps, batch_size=batch, seed=0, **phi.oti_settings)
    cold: list[float] = []
    t = time.perf_counter()
    invert(backbone, feats, config, history=cold)
    cold_s = time.perf_counter() - t
    with torch.inference_mode():
        init = phi(feats)
    warm: list[float] = []
    invert(backbone, feats, dataclasses.replace(config, steps=warm_steps), init=init.clone(), history=warm)

    def smooth(xs: list[float], i: int) -> float:
        part = xs[max(0, i - window + 1) : i + 1]
        return sum(part) / len(part)

    target = smooth(cold, steps - 1)
    reach = next((i + 1 for i in range(len(warm)) if smooth(warm, i) <= target), None)
    note = (f"cold loss {cold[0]:.3f} -> {target:.3f} (mean of last {window}); warm starts at {warm[0]:.3f}; "
            f"cold run {cold_s:.1f} s")
    value = reach if reach is not None else f"> {warm_steps}"
    rows = [row("b OTI", case, "warm start from phi: steps to reach the cold loss", value, "steps", "", note)]
    if reach is not None:
        rows.append(row("b OTI", case, "warm start: step reduction", steps / reach, "x", "", ""))
    return rows


def main(argv: list[str] | None = None) -> list[Row]:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="ViT-B-32")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--searle-steps", type=int, default=5, help="SEARLE steps (the first one is not timed)")
    p.add_argument("--fast-steps", type=int, default=12, help="steps of the faster variants")
    p.add_argument("--no-warm-start", action="store_true")
    p.add_argument("--phi", type=Path, default=os.environ.get("ISEARLE_BENCH_PHI"),
                   help="shapes phi for the warm start (default: assets/models/isearle-shapes-phi.safetensors)")
    args = p.parse_args(argv)
    setup_threads()
    rows = bench_steps(args.model, args.batch, args.searle_steps, args.fast_steps)
    if not args.no_warm_start:
        log("bench b: warm start (shapes world)")
        rows += bench_warm_start(args.phi)
    return rows


if __name__ == "__main__":
    print_table(main(), "b. OTI steps per second")
