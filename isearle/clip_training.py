"""Contrastive training of a CLIP from scratch: the tiny CLIP of the offline shapes world.

The trainer is generic (a map-style dataset of (image, caption[, description of its "$"]), open_clip's ClipLoss,
AdamW with warmup + cosine, tqdm, resumable checkpoints of tensors only). The shapes dataset
pre-renders scenes into a uint8 cache and draws a fresh caption from the world's grammar every time
an image is used; a share of captions holds one composite word "$", fed to the text tower as the
mean embedding of a description's words, so that one token can stand for a scene (the role of S* in
"a photo of $ that {edit}"). `evaluate_zero_shot` measures text-to-image R@1 over held-out scenes and
`export_weights` writes the fp16 safetensors that `load_backbone("isearle-shapes", "isearle-shapes")` loads.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
from open_clip.loss import ClipLoss
from safetensors.torch import save_file
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from isearle.artifacts import atomic_path, load_tensors, write_json
from isearle.backbone import (
    Backbone,
    build_preprocess,
    encode_tokens,
    register_model_configs,
)
from isearle.paths import ASSETS_DIR, REPO_DIR
from isearle.precision import compute_autocast, grad_scaler
from isearle.resume import load_state, save_state
from isearle.runtime import set_threads

MODEL_NAME = "isearle-shapes"
EXPORT_PATH = ASSETS_DIR / "models" / "isearle-shapes.safetensors"
#: Held-out scene stream for zero-shot evaluation (training uses `TrainConfig.seed`, never this).
EVAL_SEED = 987_654

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Settings of `train_tiny_clip` (defaults: the run that produced the bundled weights)."""

    model: str = MODEL_NAME
    steps: int = 4000
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup: int = 60
    #: Wall-clock budget: the schedule's progress is max(step/steps, minutes/budget), so the
    #: cosine decays fully even when shared cores run slower than planned (0: steps only).
    time_budget_min: float = 60.0
    n_scenes: int = 50_000
    seed: int = 0
    threads: int = 0
    out_dir: str = str(REPO_DIR / "runs" / "clip")
    checkpoint_every: int = 50
    eval_every: int = 200
    eval_scenes: int = 1000
    log_every: int = 10
    resume: bool = False
    export: str = str(EXPORT_PATH)
    #: Caption forms (full, partial, clause, edit); edit captions teach "a photo of X that {edit}".
    caption_weights: tuple[float, float, float, float] = (0.25, 0.1, 0.25, 0.4)
    #: `isearle.precision.COMPUTE_PRECISIONS`: "bf16": autocast of the forward pass (faster on
    #: AVX512-BF16 CPUs); "fp32": none; "fp16": fp16 autocast + GradScaler (on CPU where torch supports it).
    precision: str = "bf16"
    #: Share of captions whose subject is one composite word "$" fed as the mean of its words'
    #: embeddings, so that one token can stand for a scene (docs/offline-world.md; 0: off).
    composite: float = 0.3
    extra: dict[str, Any] = field(default_factory=dict)


# -------------------------------------------------------------------------------- datasets
def to_pixels(images: torch.Tensor | np.ndarray, mean: Sequence[float] = open_clip.OPENAI_DATASET_MEAN,
              std: Sequence[float] = open_clip.OPENAI_DATASET_STD) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> normalised float [B, 3, H, W] (open_clip's default normalisation)."""
    x = torch.as_tensor(images).permute(0, 3, 1, 2).float().div_(255)
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    return (x - m) / s


def render_cache(specs: Sequence, size: int, progress: bool = True) -> np.ndarray:
    """uint8 [N, size, size, 3] of rendered scenes."""
    from isearle.shapes.world import render

    out = np.empty((len(specs), size, size, 3), dtype=np.uint8)
    for i, spec in enumerate(tqdm(specs, desc="render", disable=not progress, mininterval=2)):
        out[i] = np.asarray(render(spec, size))
    return out


class ShapesCaptions(Dataset):
    """Pre-rendered shapes scenes; each access draws a caption from the grammar, seeded by (seed, step, index).

    With `composite` > 0, that share of captions holds one composite word "$" (see
    `world.composite_caption`); its description comes with the caption and the trainer feeds it as one vector.
    """

    def __init__(self, n: int, seed: int, size: int, context_length: int,
                 caption_weights: Sequence[float] = (0.3, 0.15, 0.3, 0.25), progress: bool = True,
                 composite: float = 0.0) -> None:
        from isearle.shapes.world import scene_specs

        self.specs = scene_specs(n, seed)
        self.images = render_cache(self.specs, size, progress)
        self.seed, self.step = seed, 0
        self.context_length = context_length
        self.caption_weights = tuple(caption_weights)
        self.composite = composite
        self._bpe = open_clip.tokenizer.SimpleTokenizer()  # the BPE of every open_clip CLIP config

    def __len__(self) -> int:
        return len(self.specs)

    def set_step(self, step: int) -> None:
        self.step = step

    def _fits(self, text: str) -> bool:
        return self._bpe is None or len(self._bpe.encode(text)) + 2 <= self.context_length

    def caption(self, i: int) -> tuple[str, str]:
        """(caption, the description its composite word "$" stands for, or "" when it has none)."""
        from isearle.shapes.captions import caption, composite_caption

        rng = random.Random((self.seed * 100_003 + self.step) * 1_000_003 + i)
        if self.composite and rng.random() < self.composite:
            for _ in range(8):
                text, subject = composite_caption(self.specs[i], rng)
                if self._fits(text) and self._fits(subject):
                    return text, subject
        for _ in range(8):  # a caption cut by the context would state a different scene
            text = caption(self.specs[i], rng, self.caption_weights)
            if self._fits(text):
                return text, ""
        return "a photo of " + " and ".join(f"a {o.colour} {o.shape}" for o in self.specs[i].objects), ""

    def __getitem__(self, i: int) -> tuple[np.ndarray, str, str]:
        return self.images[i], *self.caption(i)

    def batch(self, indices: Sequence[int]) -> tuple[torch.Tensor, list[str], list[str]]:
        texts, subjects = zip(*(self.caption(int(i)) for i in indices), strict=True)
        return to_pixels(self.images[np.asarray(indices)]), list(texts), list(subjects)


def _batch(dataset: Dataset, indices: Sequence[int]) -> tuple[torch.Tensor, list[str], list[str]]:
    """(images, captions, composite descriptions) of a batch; "" where a caption has no "$"."""
    if hasattr(dataset, "batch"):
        return dataset.batch(indices)
    items = [dataset[int(i)] for i in indices]
    images = torch.stack([torch.as_tensor(item[0]) for item in items])
    return images, [item[1] for item in items], [item[2] if len(item) > 2 else "" for item in items]


def composite_words(token_embedding: torch.nn.Embedding, ids: torch.Tensor, sot_id: int) -> torch.Tensor:
    """[B, width]: the mean input embedding of each row's words (start/end/padding left out; 0 for none).

    One vector that carries every word of a description, the input the text tower learns to read as
    a composite word; SOT and EOT are the two largest ids of CLIP's BPE, padding is 0.
    """
    keep = ((ids > 0) & (ids < sot_id)).unsqueeze(-1).to(token_embedding.weight.dtype)
    return (token_embedding(ids) * keep).sum(dim=1) / keep.sum(dim=1).clamp(min=1)


# -------------------------------------------------------------------------------- training
def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """open_clip's convention: no decay on gains, biases, embeddings and the logit scale."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name \
            or "embedding" in name or "token" in name
        (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_at(progress: float, step: int, config: TrainConfig) -> float:
    """Linear warmup over `warmup` steps, then cosine to 0 over the run's progress in [0, 1]."""
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    return 0.5 * config.lr * (1 + math.cos(math.pi * min(1.0, progress)))


#: What a training state belongs to: any run of the same model in the same folder (`--resume`).
def _job(config: TrainConfig) -> dict[str, Any]:
    return {"what": "train-clip", "model": config.model}


def save_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, meta: dict[str, Any],
                    config: TrainConfig, scaler: torch.amp.GradScaler | None = None) -> None:
    """Model, optimizer, loss-scale and RNG states with the run's metadata: one verified file, written atomically."""
    save_state(path, _job(config), int(meta["step"]), model, optimizer, extra=meta, scaler=scaler)


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    config: TrainConfig, scaler: torch.amp.GradScaler | None = None) -> dict[str, Any] | None:
    """The metadata of a saved run, its states restored into `model`, `optimizer` and `scaler` (None: start over)."""
    resumed = load_state(path, _job(config), model, optimizer, scaler=scaler)
    return None if resumed is None else resumed[1]


def train_clip(model: torch.nn.Module, dataset: Dataset, tokenizer, config: TrainConfig,
               progress: bool = True, eval_fn=None) -> dict[str, Any]:
    """Contrastive training of `model` on `dataset` (image tensor, caption); resumable from out_dir/last.safetensors.

    Returns the run's metadata: steps done, minutes, final loss, history of (step, loss, lr, eval).
    """
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = out / "last.safetensors"
    optimizer = torch.optim.AdamW(_param_groups(model, config.weight_decay), lr=config.lr,
                                  betas=(0.9, 0.98), eps=1e-6)
    loss_fn = ClipLoss()
    text_backbone = backbone_from_model(model, config.model)  # the text path of the query (exact, shorter)
    meta: dict[str, Any] = {"step": 0, "minutes": 0.0, "history": [], "config": asdict(config)}
    scaler = grad_scaler(next(model.parameters()).device, config.precision)
    resumed = load_checkpoint(ckpt, model, optimizer, config, scaler) if config.resume else None
    if resumed is not None:
        meta = resumed
        log.info("resumed from %s at step %d (%.1f min)", ckpt, meta["step"], meta["minutes"])
    model.train()
    start_step, start_min, t0 = meta["step"], meta["minutes"], time.time()
    bar = tqdm(total=config.steps, initial=start_step, desc="train-clip", disable=not progress,
               mininterval=5, dynamic_ncols=False)
    step, smooth = start_step, meta.get("smooth")
    while step < config.steps:
        minutes = start_min + (time.time() - t0) / 60
        prog = step / config.steps
        if config.time_budget_min > 0:
            prog = max(prog, minutes / config.time_budget_min)
        if prog >= 1.0:
            break
        lr = lr_at(prog, step, config)
        for g in optimizer.param_groups:
            g["lr"] = lr
        gen = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
        idx = torch.randint(len(dataset), (config.batch_size,), generator=gen).tolist()
        if hasattr(dataset, "set_step"):
            dataset.set_step(step)
        images, texts, subjects = _batch(dataset, idx)
        with compute_autocast(images.device, config.precision):
            img_f = model.encode_image(images, normalize=True)
            words = composite_words(model.token_embedding, tokenizer(subjects), tokenizer.sot_token_id) \
                if any(subjects) else None
            txt_f = torch.nn.functional.normalize(encode_tokens(text_backbone, tokenizer(texts), words), dim=-1)
        loss = loss_fn(img_f.float(), txt_f.float(), model.logit_scale.exp().float())
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(optimizer)
        scaler.update()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        step += 1
        smooth = loss.item() if smooth is None else 0.95 * smooth + 0.05 * loss.item()
        bar.update(1)
        bar.set_postfix(loss=f"{smooth:.3f}", lr=f"{lr:.2e}", min=f"{minutes:.1f}", refresh=False)
        meta["step"], meta["minutes"], meta["smooth"] = step, start_min + (time.time() - t0) / 60, smooth
        if step % config.log_every == 0:
            meta["history"].append({"step": step, "loss": round(smooth, 4), "batch_loss": round(loss.item(), 4),
                                    "lr": lr, "minutes": round(meta["minutes"], 2)})
        if eval_fn is not None and config.eval_every and step % config.eval_every == 0:
            model.eval()
            r = eval_fn(model)
            model.train()
            meta["history"].append({"step": step, "eval": r})
            log.info("step %d: %s", step, r)
        if step % config.checkpoint_every == 0 or step >= config.steps:
            save_checkpoint(ckpt, model, optimizer, meta, config, scaler)
    bar.close()
    meta["final_loss"] = smooth
    save_checkpoint(ckpt, model, optimizer, meta, config, scaler)
    model.eval()
    return meta


# ------------------------------------------------------------------------------ evaluation
def backbone_from_model(model: torch.nn.Module, name: str = MODEL_NAME, device: str = "cpu") -> Backbone:
    """Wrap a model being trained as an inference `Backbone` (same preprocessing as load_backbone)."""
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else int(size)
    return Backbone(model=model, preprocess=build_preprocess("targetpad", size, open_clip.OPENAI_DATASET_MEAN,
                                                             open_clip.OPENAI_DATASET_STD),
                    tokenizer=open_clip.get_tokenizer(name), name=name, pretrained=None, device=torch.device(device))


@torch.no_grad()
def evaluate_zero_shot(backbone: Backbone, n: int = 1000, seed: int = EVAL_SEED,
                       forms: Sequence[str] = ("full", "clause", "edit")) -> dict[str, float]:
    """Text-to-image R@1 over `n` held-out scenes, per caption form.

    "full": a full description; "clause": "a photo of {partial} that {rest}"; "edit": a description
    of another scene plus the edit that leads to this one. A hit is a top-1 image whose scene is the
    caption's (same attributes: a duplicate scene counts too); "full_strict" needs the exact image.
    """
    from isearle.shapes.captions import clause_caption, describe, edit_caption
    from isearle.shapes.world import render, scene_specs

    specs = scene_specs(n, seed)
    sigs = [s.signature() for s in specs]
    pixels = torch.stack([backbone.preprocess(render(s, backbone.image_size)) for s in specs])
    img = torch.nn.functional.normalize(torch.cat([backbone.encode_images(pixels[i:i + 250])
                                                   for i in range(0, n, 250)]), dim=-1)
    makers = {"full": lambda s, r: "a photo of " + describe(s, r, p_background=1.0),
              "clause": clause_caption, "edit": edit_caption}
    out: dict[str, float] = {}
    for form in forms:
        rng = random.Random(seed * 10 + sorted(makers).index(form))
        texts = [makers[form](s, rng) for s in specs]
        txt = torch.nn.functional.normalize(torch.cat([backbone.encode_texts(texts[i:i + 250])
                                                       for i in range(0, n, 250)]), dim=-1)
        top = (txt @ img.T).argmax(dim=1).tolist()
        out[form] = round(sum(sigs[t] == sigs[i] for i, t in enumerate(top)) / n, 4)
        if form == "full":
            out["full_strict"] = round(sum(t == i for i, t in enumerate(top)) / n, 4)
    return out


# ---------------------------------------------------------------------------------- export
def export_weights(model: torch.nn.Module, path: str | Path = EXPORT_PATH, stats: dict[str, Any] | None = None) -> Path:
    """fp16 safetensors of the model (what the "isearle-shapes" tag loads) and a JSON sidecar of stats."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt", "model": MODEL_NAME})
    if stats is not None:
        write_json(path.with_suffix(".json"), stats, indent=2)
    return path


def load_exported(model: torch.nn.Module, path: str | Path = EXPORT_PATH) -> torch.nn.Module:
    tensors, _ = load_tensors(path, "clip-weights", "export it again with `isearle train-clip`")
    state = {k: v.float() for k, v in tensors.items()}
    model.load_state_dict(state)
    return model


def train_tiny_clip(config: TrainConfig, progress: bool = True) -> Path:
    """Train the shapes CLIP (resumable), measure zero-shot R@1, export fp16 weights; returns the weights path."""
    threads = set_threads(config.threads, faiss_threads=None)
    register_model_configs()
    torch.manual_seed(config.seed)
    model, _, _ = open_clip.create_model_and_transforms(config.model, pretrained=None)
    tokenizer = open_clip.get_tokenizer(config.model)
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else int(size)
    ctx = model.positional_embedding.shape[0]
    t = time.time()
    data = ShapesCaptions(config.n_scenes, config.seed, size, ctx, config.caption_weights, progress,
                          composite=config.composite)
    log.info("rendered %d training scenes in %.0f s; %d threads", len(data), time.time() - t, threads)

    def eval_fn(m: torch.nn.Module) -> dict[str, float]:
        return evaluate_zero_shot(backbone_from_model(m, config.model), n=config.eval_scenes)

    meta = train_clip(model, data, tokenizer, config, progress, eval_fn if config.eval_every else None)
    r = evaluate_zero_shot(backbone_from_model(model, config.model), n=config.eval_scenes)
    stats = {"model": config.model, "steps": meta["step"], "minutes": round(meta["minutes"], 1),
             "batch_size": config.batch_size, "samples_seen": meta["step"] * config.batch_size,
             "final_loss": meta.get("final_loss"), "zero_shot_r1": r,
             "eval": f"text-to-image R@1 over {config.eval_scenes} held-out scenes (seed {EVAL_SEED})",
             "config": asdict(config), "threads": threads}
    path = export_weights(model, config.export, stats)
    log.info(json.dumps({k: stats[k] for k in ("steps", "minutes", "final_loss", "zero_shot_r1")}))
    log.info("exported %s (%.1f MiB)", path, path.stat().st_size / 2**20)
    return path


# ------------------------------------------------------------------------------------- CLI
