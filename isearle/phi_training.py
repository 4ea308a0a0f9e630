"""Training phi by distillation from OTI (SEARLE) with iSEARLE's hard negatives and token penalty.

Loss = lambda_distil * L_distil + lambda_gpt * L_gpt + lambda_reg * L_reg, where
- L_distil: symmetric NT-Xent between phi's tokens and the OTI tokens of the batch (both
  L2-normalised, temperature 0.25, 2B-2 negatives per pair);
- L_gpt: OTI's phrase loss with phi's token (a phrase about one of the image's top concepts vs the
  same phrase with "$");
- L_reg (iSEARLE; form OPEN in the paper): keeps predicted tokens where real token embeddings
  live. Form "norm": (||p|| / m - 1)^2 with m the mean norm of the vocabulary's embeddings;
  form "knn": 1 - mean cosine to the k nearest real token embeddings. Default "norm" (docs/method.md).
Batches (iSEARLE): with `hard_negatives`, images are grouped by k-means on their CLIP features, so
a batch holds visually similar images whose OTI tokens are the hard negatives of L_distil.
As in SEARLE (src/train_phi.py) the last partial batch is dropped; each image's GPT phrase is drawn
by `PhraseSampler`; with a validation function, phi is scored every `val_every` epochs and the
best-scoring weights are kept (`Selection`) beside the last.
"""

from __future__ import annotations

import copy
import logging
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from isearle.artifacts import tensors_digest
from isearle.backbone import Backbone
from isearle.oti import cosine_loss, replace_concept, usable_concepts
from isearle.phi import Phi, save_phi
from isearle.precision import compute_autocast, effective_precision, grad_scaler
from isearle.pseudo_word import encode_tokens, tokenize_prompts
from isearle.resume import digest_rows, load_state, save_state


@dataclass
class PhiTrainConfig:
    """SEARLE's phi training settings plus iSEARLE's additions."""

    epochs: int = 100
    batch_size: int = 256
    lr: float = 1e-4
    weight_decay: float = 0.01
    temperature: float = 0.25
    lambda_distil: float = 1.0
    lambda_gpt: float = 0.75
    lambda_reg: float = 0.1
    reg_form: str = "norm"  # "norm" | "knn" | "none"
    reg_knn: int = 8
    #: "norm" form: target norm in units of the mean real-token norm (match OTI's `max_norm` when capped).
    reg_norm: float = 1.0
    hard_negatives: bool = True
    top_k_concepts: int = 150
    dropout: float = 0.5
    seed: int = 0
    #: score phi with the validation function every `val_every` epochs (0: never; SEARLE: 1, on CIRR val)
    val_every: int = 0
    #: `isearle.precision.COMPUTE_PRECISIONS`: "fp16" is SEARLE's train_phi.py (fp16 autocast + GradScaler
    #: over phi, NT-Xent and the GPT loss, fp32 input features); None: the backbone's (fp16 on CUDA, fp32 on CPU).
    precision: str | None = None
    #: How a concept is found in its GPT phrases (`isearle.oti.CONCEPT_MATCHES`): "word" (ours), "substring" (SEARLE).
    concept_match: str = "word"

log = logging.getLogger(__name__)


def nt_xent(pred: torch.Tensor, target: torch.Tensor, temperature: float = 0.25) -> torch.Tensor:
    """Symmetric NT-Xent: each of the 2B tokens must pick its pair among the other 2B-1."""
    z = F.normalize(torch.cat([pred, target]), dim=-1)
    sims = z @ z.T / temperature
    sims.fill_diagonal_(float("-inf"))
    b = pred.shape[0]
    labels = torch.cat([torch.arange(b, 2 * b), torch.arange(0, b)]).to(z.device)
    return F.cross_entropy(sims, labels)


def token_penalty(pred: torch.Tensor, vocab: torch.Tensor, form: str, k: int = 8,
                  target_norm: float = 1.0) -> torch.Tensor:
    """iSEARLE's regulariser pulling predicted tokens towards the region of real token embeddings."""
    if form == "none":
        return pred.new_zeros(())
    if form == "norm":
        mean_norm = vocab.norm(dim=-1).mean() * target_norm
        return ((pred.norm(dim=-1) / mean_norm - 1) ** 2).mean()
    if form == "knn":
        sims = F.normalize(pred, dim=-1) @ F.normalize(vocab, dim=-1).T
        return 1 - sims.topk(k, dim=-1).values.mean()
    raise ValueError(f"unknown reg_form {form!r}: use norm, knn or none")


def similar_batches(features: torch.Tensor, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Batches of visually similar images: k-means clusters, shuffled within, read in order."""
    import faiss

    n = features.shape[0]
    k = max(1, n // batch_size)
    x = F.normalize(features.float(), dim=-1).numpy().astype("float32")
    km = faiss.Kmeans(x.shape[1], k, niter=20, nredo=3, seed=int(rng.integers(2**31)), verbose=False)
    km.train(x)
    _, assign = km.index.search(x, 1)
    order = np.lexsort((rng.random(n), assign[:, 0]))
    batches = [order[i : i + batch_size] for i in range(0, n, batch_size)]
    rng.shuffle(batches)
    return batches


class PhraseSampler:
    """SEARLE's GPT phrase of an image in phi training: a concept drawn uniformly from its top-k
    (redrawn while it is filtered out), then one of that concept's phrases uniformly, with every
    mention of the concept replaced by " $ " (S* takes the first "$", as in SEARLE's encoder)."""

    def __init__(self, image_concepts: Sequence[Sequence[str]], phrase_bank: Mapping[str, Sequence[str]],
                 top_k: int, match: str = "word") -> None:
        self.bank, self.usable, self.match = phrase_bank, usable_concepts(phrase_bank, match), match
        self.concepts = [list(c)[:top_k] for c in image_concepts]
        # an image none of whose top-k concepts is usable has no phrase (SEARLE would redraw forever)
        self.has_phrase = [any(c in self.usable for c in cs) for cs in self.concepts]

    def draw(self, idx: Sequence[int], rng: random.Random) -> tuple[list[int], list[str], list[str]]:
        """(batch rows with a phrase, their phrases, the phrases with " $ ") for images `idx`."""
        rows = [j for j, i in enumerate(idx) if self.has_phrase[i]]
        concepts = []
        for j in rows:
            top = self.concepts[idx[j]]
            concept = rng.choice(top)
            while concept not in self.usable:
                concept = rng.choice(top)
            concepts.append(concept)
        phrases = [rng.choice(self.bank[c]) for c in concepts]
        pseudo = [replace_concept(p, c, count=0, match=self.match) for p, c in zip(phrases, concepts, strict=True)]
        return rows, phrases, pseudo


def _encode_phrases(backbone: Backbone, phrases: Sequence[str], precision: str) -> torch.Tensor:
    """Text features of phrases under the training precision's autocast (SEARLE encodes its targets
    inside the step's autocast)."""
    with torch.no_grad(), compute_autocast(backbone.device, precision):
        return encode_tokens(backbone, backbone.tokenize(phrases)).float()


def _phrase_targets(backbone: Backbone, sampler: PhraseSampler | None, chunk: int = 256,
                    precision: str = "fp32") -> dict[str, torch.Tensor]:
    """Text features of every phrase the sampler can draw, encoded once in a fixed order: a phrase's
    feature then never depends on which others shared its batch, so a resumed run matches bit for bit."""
    if sampler is None:
        return {}
    concepts = sorted({c for cs in sampler.concepts for c in cs if c in sampler.usable})
    phrases = sorted({p for c in concepts for p in sampler.bank[c]})
    cache: dict[str, torch.Tensor] = {}
    for s in range(0, len(phrases), chunk):
        part = phrases[s : s + chunk]
        cache.update(zip(part, _encode_phrases(backbone, part, precision), strict=True))
    return cache


def _gpt_loss(backbone: Backbone, pred: torch.Tensor, sampler: PhraseSampler, idx: Sequence[int],
              rng: random.Random, cache: dict[str, torch.Tensor]) -> torch.Tensor | None:
    rows, phrases, pseudo = sampler.draw(idx, rng)
    if not rows:
        return None
    missing = [p for p in dict.fromkeys(phrases) if p not in cache]
    if missing:  # phrase targets are constant: encode each once
        for p, f in zip(missing, backbone.encode_texts(missing), strict=True):
            cache[p] = f
    targets = torch.stack([cache[p] for p in phrases])
    tokens = tokenize_prompts(backbone, pseudo, repeats=True)
    feats = encode_tokens(backbone, tokens, pred[rows]).float()
    return cosine_loss(feats, targets)


def phi_step(backbone: Backbone, phi: Phi, features: torch.Tensor, targets: torch.Tensor, idx: Sequence[int],
             config: PhiTrainConfig, sampler: PhraseSampler | None, rng: random.Random,
             cache: dict[str, torch.Tensor], vocab: torch.Tensor) -> dict[str, torch.Tensor | None]:
    """The loss of one batch `idx` (not yet back-propagated): {"distil", "gpt", "reg", "loss"}."""
    idx_t = torch.as_tensor(idx)
    pred = phi(features[idx_t].to(backbone.device))
    distil = nt_xent(pred, targets[idx_t].to(backbone.device), config.temperature)
    loss = config.lambda_distil * distil
    gpt = None if sampler is None else _gpt_loss(backbone, pred, sampler, list(idx), rng, cache)
    if gpt is not None:
        loss = loss + config.lambda_gpt * gpt
    reg = token_penalty(pred, vocab, config.reg_form, config.reg_knn, config.reg_norm)
    loss = loss + config.lambda_reg * reg
    return {"distil": distil, "gpt": gpt, "reg": reg, "loss": loss}


@dataclass
class Selection:
    """The best validated phi of a run (filled by `train_phi` when it validates)."""

    epoch: int = 0
    metric: float = float("-inf")
    state: dict[str, torch.Tensor] | None = field(default=None, repr=False)


def _batches(features: torch.Tensor, config: PhiTrainConfig, nrng: np.random.Generator) -> list[np.ndarray]:
    """One epoch's batches, the last partial one dropped (SEARLE's `drop_last=True`)."""
    n = features.shape[0]
    if config.hard_negatives and n >= 2 * config.batch_size:
        batches = similar_batches(features, config.batch_size, nrng)
    else:
        perm = nrng.permutation(n)
        batches = [perm[i : i + config.batch_size] for i in range(0, n, config.batch_size)]
    return [b for b in batches if len(b) == config.batch_size]


def train_phi(
    backbone: Backbone,
    image_features: torch.Tensor,
    oti_tokens: torch.Tensor,
    config: PhiTrainConfig | None = None,
    image_concepts: Sequence[Sequence[str]] | None = None,
    phrase_bank: Mapping[str, Sequence[str]] | None = None,
    phi: Phi | None = None,
    progress: bool = True,
    validate: Callable[[Phi], float] | None = None,
    selection: Selection | None = None,
    checkpoint: str | Path | None = None,
    records: TrainingRecords | None = None,
) -> tuple[Phi, list[dict[str, float]]]:
    """Distil phi from OTI tokens; returns phi (eval mode, last epoch) and per-epoch mean losses.

    With `validate` (phi -> metric, higher is better) and `config.val_every`, the metric is logged in
    the history ("val") and the best weights are kept in `selection`. With `checkpoint` (a file) and
    no validation, the training state is saved after every epoch (`isearle.resume`): a run killed at
    any moment continues from its last epoch and ends with the same phi. `records` writes the
    per-epoch CSV and the periodic checkpoints. The step runs in `config.precision` (or the
    backbone's): under fp16, SEARLE's autocast + GradScaler; fp32 input features in every case.
    """
    config = config or PhiTrainConfig()
    n = image_features.shape[0]
    if n < config.batch_size:
        raise ValueError(f"{n} training images but --batch-size {config.batch_size}: the last partial batch is "
                         "dropped (SEARLE), so lower --batch-size or add images")
    torch.manual_seed(config.seed)
    rng, nrng = random.Random(config.seed), np.random.default_rng(config.seed)
    device = backbone.device
    precision = effective_precision(config.precision or backbone.precision, device)
    phi = (phi or Phi.for_backbone(backbone.embed_dim, backbone.token_width, config.dropout)).to(device).train()
    optimizer = torch.optim.AdamW(phi.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    sampler = None
    if image_concepts is not None and phrase_bank is not None and config.lambda_gpt > 0:
        sampler = PhraseSampler(image_concepts, phrase_bank, config.top_k_concepts, config.concept_match)
    vocab = backbone.token_embedding.weight.detach()
    features, targets = image_features.float().cpu(), oti_tokens.float().cpu()
    scaler = grad_scaler(device, precision)
    cache, history = _phrase_targets(backbone, sampler, precision=precision), []
    start, job = 0, None
    if checkpoint is not None and validate is None:
        job = {"what": "train-phi", "config": asdict(config) | {"precision": precision}, "features": tensors_digest({"f": features}),
               "targets": tensors_digest({"t": targets}), "phi": tensors_digest(phi.state_dict()),
               "concepts": digest_rows(image_concepts),
               "phrases": digest_rows(sorted(phrase_bank.items())) if sampler is not None else None}
        resumed = load_state(checkpoint, job, phi, optimizer, rng, nrng, scaler=scaler)
        if resumed is not None:
            start, history = resumed
    for epoch in tqdm(range(start + 1, config.epochs + 1), initial=start, total=config.epochs,
                      desc="phi epochs", disable=not progress):
        batches = _batches(features, config, nrng)
        sums: dict[str, float] = {"distil": 0.0, "gpt": 0.0, "reg": 0.0, "loss": 0.0}
        for idx in batches:
            with compute_autocast(device, precision):
                losses = phi_step(backbone, phi, features, targets, idx, config, sampler, rng, cache, vocab)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(losses["loss"]).backward()
            scaler.step(optimizer)
            scaler.update()
            for key, val in losses.items():
                sums[key] += 0.0 if val is None else float(val.detach()) / len(batches)
        if validate is not None and config.val_every > 0 and epoch % config.val_every == 0:
            sums["val"] = float(validate(phi.eval()))
            phi.train().requires_grad_(True)
            log.info("phi epoch %d: validation %.4f", epoch, sums["val"])
            if selection is not None and sums["val"] > selection.metric:
                selection.epoch, selection.metric = epoch, sums["val"]
                selection.state = copy.deepcopy({k: v.detach().cpu() for k, v in phi.state_dict().items()})
        history.append(sums)
        if records is not None:
            records.write(epoch, phi, history)
        if job is not None:
            save_state(checkpoint, job, epoch, phi, optimizer, rng, nrng, history, scaler=scaler)
    return phi.eval(), history


@dataclass
class TrainingRecords:
    """What a training run leaves while it runs, as SEARLE's train_phi.py does: the per-epoch metrics
    as a CSV (rewritten atomically after every epoch: a plot reads it directly, a crash never leaves
    half a line) and phi every `save_every` epochs (`{stem}.epoch{N}.safetensors`; 0: none)."""

    out: Path
    save_every: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def csv_path(self) -> Path:
        return self.out.with_name(f"{self.out.stem}.metrics.csv")

    def checkpoint_path(self, epoch: int) -> Path:
        return self.out.with_name(f"{self.out.stem}.epoch{epoch:03d}.safetensors")

    def write(self, epoch: int, phi: Phi, history: Sequence[Mapping[str, float]]) -> None:
        import csv
        import io

        from isearle.artifacts import write_text

        columns = ["epoch", "loss", "distil", "gpt", "reg", "val"]
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(columns)
        for e, row in enumerate(history, start=1):
            writer.writerow([e] + [repr(float(row[c])) if c in row else "" for c in columns[1:]])
        write_text(self.csv_path, buf.getvalue())
        if self.save_every > 0 and epoch % self.save_every == 0:
            save_phi(copy.deepcopy(phi).cpu().eval(), self.checkpoint_path(epoch), {**self.extra, "epoch": epoch})


def last_path(out: str | Path) -> Path:
    """Where the last epoch's phi goes when `out` holds the best validated one."""
    out = Path(out).with_suffix(".safetensors")
    return out.with_name(f"{out.stem}.last.safetensors")


def save_trained(phi: Phi, out: str | Path, extra: dict, selection: Selection | None = None) -> list[Path]:
    """Save phi to `out`; after validation `out` holds the best epoch's weights and `last_path(out)` the last."""
    if selection is None or selection.state is None:
        return [save_phi(phi, out, extra)]
    last = save_phi(phi, last_path(out), {**extra, "selected": "last"})
    best = copy.deepcopy(phi).cpu()
    best.load_state_dict(selection.state)
    best_extra = {**extra, "selected": "best", "best_epoch": selection.epoch, "best_val": selection.metric}
    return [save_phi(best, out, best_extra), last]
