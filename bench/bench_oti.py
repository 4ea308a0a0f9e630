"""Bench b: OTI optimisation steps per second, SEARLE's step vs isearle's, and the phi warm start.

SEARLE's step, re-implemented faithfully (its oti_inversion loop): tokenise the step's templates,
encode them with the pseudo-tokens over the full 77-token context (content loss); tokenise the
step's GPT phrases, re-encode the real phrases without gradient and the "$" phrases with the
pseudo-tokens, again over the full context (GPT loss); loss = (L_content + 0.5 L_gpt) / 1.5; AdamW
(lr 2e-2, wd 0.01) and an EMA of 0.99. Against it, interleaved in one process (each round: one
SEARLE step, then a few steps of every other variant in turn; the ratio is the median over rounds of
SEARLE's step / the variant's, with its spread): `isearle.oti` without its prefix cache, the baseline (truncated context, phrase
targets encoded once per batch, template and phrase prompts in one fused pass), the default
(+ keys/values of the positions before "$" cached once per prefix, suffixes packed without padding)
and that in bf16 autocast. `--all-variants` adds SEARLE + truncation and + cached targets. All draw
the same prompts from the same seed and start from the same tokens, so the fp32 loss trajectories
must agree to rounding (bf16: close).

Warm start: on the offline shapes world (its CLIP and phi, when assets/models holds them), the
number of OTI steps from phi's token needed to reach the loss of 350 cold steps.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import random
import time
from pathlib import Path

if __package__ in (None, ""):
    import common  # noqa: F401  (puts the repo on sys.path when run as a script)
from bench.common import (
    REPO,
    Row,
    check_load,
    finish,
    goal_row,
    log,
    median,
    parse_args,
    ratio,
    ratio_text,
    row,
    setup_threads,
)

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


class Stepper:
    """The OTI loop of `isearle.oti.invert` around any loss, one step per call (to interleave variants)."""

    def __init__(self, loss_fn, init, config) -> None:
        import torch

        self.loss_fn, self.config, self.step_no = loss_fn, config, 0
        self.v = torch.nn.Parameter(init.clone())
        self.ema = self.v.detach().clone()
        self.opt = torch.optim.AdamW([self.v], lr=config.lr, weight_decay=config.weight_decay)
        self.times: list[float] = []
        self.losses: list[float] = []

    def __call__(self) -> float:
        t = time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        loss = self.loss_fn(self.step_no, self.v)
        loss.backward()
        self.opt.step()
        self.ema.mul_(self.config.ema_decay).add_(self.v.detach(), alpha=1 - self.config.ema_decay)
        dt = time.perf_counter() - t
        self.times.append(dt)
        self.losses.append(float(loss.detach()))
        self.step_no += 1
        return dt


def bench_steps(model: str, batch: int, rounds: int, fast_per_round: int, full: bool = False) -> list[Row]:
    """SEARLE's step against isearle.oti's (fused pass without, then with the prefix cache; + bf16), interleaved:
    each round runs one SEARLE step, then `fast_per_round` steps of every other variant in turn."""
    import dataclasses

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
    # the same draws and phrase targets, computed without the prefix cache and in bf16
    baseline, bf16 = copy.copy(objective), copy.copy(objective)
    baseline.prefix_cache = None
    bf16.config = dataclasses.replace(config, precision="bf16")
    n_targets = 0 if objective.phrase_targets is None else objective.phrase_targets.shape[0]
    init = torch.randn(batch, backbone.token_width, generator=torch.Generator().manual_seed(0)) * config.init_std
    phrase_len = max(int(tok.argmax()) + 1 for tok in objective.phrase_tokens)
    variants = {"SEARLE step (full context, 2 passes, targets re-encoded)": SearleStep(objective).loss}
    if full:
        variants["+ truncated context"] = SearleStep(objective, truncate=True).loss
        variants["+ truncated, targets cached"] = SearleStep(objective, True, True).loss
    variants["baseline: isearle.oti fused pass (truncated, targets cached)"] = baseline.loss
    variants["default: + prefix cache, packed suffixes (fp32)"] = objective.loss
    variants["option: + prefix cache, bf16 autocast"] = bf16.loss
    steppers = {name: Stepper(fn, init, config) for name, fn in variants.items()}
    names = list(steppers)
    log(f"bench b: {model} batch {batch}: {rounds} interleaved rounds")
    per_round: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(rounds + 1):  # round 0 warms every variant up and is not counted
        for name in names:
            times = [steppers[name]() for _ in range(1 if name == names[0] else fast_per_round)]
            per_round[name].append(median(times))
    per_round = {n: ts[1:] for n, ts in per_round.items()}
    base = per_round[names[0]]
    case = f"{model}, batch {batch}, 15 concepts x 8 phrases/image (<= {phrase_len} tokens)"
    rows = []
    ratios = {}
    for name in names:
        step_s = median(per_round[name])
        rows.append(row("b OTI", case, f"{name}: ms/step", step_s * 1e3, "ms", "", f"{1 / step_s:.2f} steps/s"))
        if name == names[0]:
            continue
        ratios[name] = r = ratio(base, per_round[name])
        losses, ref = steppers[name].losses, steppers[names[0]].losses
        k = min(len(losses), len(ref))
        diff = max(abs(a - b) for a, b in zip(losses[:k], ref[:k], strict=True))
        rows.append(row("b OTI", case, f"{name}: speed-up vs SEARLE", r[0], "x", ">= 12x" if name.startswith(("default", "option")) else "",
                        f"IQR {r[1]:.1f}-{r[2]:.1f} over {len(base)} rounds; largest loss difference over {k} steps {diff:.1e}"))
    fast = median(per_round[names[-2]])
    total_fast = setup + 350 * fast
    searle_ms = median(base) * 1e3
    rows.append(row("b OTI", case, "isearle.oti one-off target encoding + prefix cache (350-step draw)", setup, "s",
                    "", f"{n_targets} distinct phrase targets, {objective.prefix_cache.distinct} distinct prefixes"))
    rows.append(row("b OTI", case, "350-step OTI incl. one-off set-up (fp32): speed-up", 350 * median(base) / total_fast,
                    "x", "", f"{total_fast:.1f} s vs {350 * median(base):.0f} s"))
    t_name, n_name, b_name = names[-3], names[-2], names[-1]
    best = max(ratios[n_name][0], ratios[b_name][0])
    rows.append(goal_row(
        f"OTI step vs SEARLE's step, {model}, batch {batch}, same losses",
        f"{ratio_text(ratios[t_name])} ({median(per_round[t_name]) * 1e3:.0f} vs {searle_ms:.0f} ms)",
        f"fp32 {ratio_text(ratios[n_name])} ({median(per_round[n_name]) * 1e3:.0f} ms); "
        f"bf16 {ratio_text(ratios[b_name])} ({median(per_round[b_name]) * 1e3:.0f} ms)",
        ">= 12x", "met" if ratios[n_name][0] >= 12 else ("met with bf16" if best >= 12 else "not met"),
        "fp32 losses equal to SEARLE's to rounding; bf16 close"))
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
    p.add_argument("--batches", type=int, nargs="+", default=[8, 32])
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds: 1 SEARLE step, then the others'")
    p.add_argument("--fast-steps", type=int, default=3, help="steps of each faster variant per round")
    p.add_argument("--all-variants", action="store_true", help="also SEARLE + truncation, + cached targets")
    p.add_argument("--no-warm-start", action="store_true")
    p.add_argument("--phi", type=Path, default=os.environ.get("ISEARLE_BENCH_PHI"),
                   help="shapes phi for the warm start (default: assets/models/isearle-shapes-phi.safetensors)")
    args = parse_args(p, argv, quick={"rounds": 1, "fast_steps": 1, "batches": [8], "no_warm_start": True})
    setup_threads()
    check_load("bench b: ")
    rows = []
    for batch in args.batches:
        rows += bench_steps(args.model, batch, args.rounds, args.fast_steps, args.all_variants)
        check_load("bench b: ")
    if not args.no_warm_start:
        log("bench b: warm start (shapes world)")
        rows += bench_warm_start(args.phi)
    return rows


if __name__ == "__main__":
    finish(main(), "b. OTI steps per second")
