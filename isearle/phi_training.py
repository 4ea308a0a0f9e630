"""Training phi by distillation from OTI (SEARLE) with iSEARLE's hard negatives and token penalty.

Loss = lambda_distil * L_distil + lambda_gpt * L_gpt + lambda_reg * L_reg, where
- L_distil: symmetric NT-Xent between phi's tokens and the OTI tokens of the batch (both
  L2-normalised, temperature 0.25, 2B-2 negatives per pair);
- L_gpt: OTI's phrase loss with phi's token (a phrase about one of the image's top concepts vs the
  same phrase with "$");
- L_reg (iSEARLE; form OPEN in the paper): keeps predicted tokens where real token embeddings
  live. Form "norm": (||p|| / m - 1)^2 with m the mean norm of the vocabulary's embeddings;
  form "knn": 1 - mean cosine to the k nearest real token embeddings. Default "norm" (README).
Batches (iSEARLE): with `hard_negatives`, images are grouped by k-means on their CLIP features, so
a batch holds visually similar images whose OTI tokens are the hard negatives of L_distil.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from isearle.backbone import Backbone
from isearle.oti import PhraseTask, cosine_loss, phrase_tasks
from isearle.phi import Phi
from isearle.pseudo_word import encode_tokens, tokenize_prompts


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


def _gpt_loss(backbone: Backbone, pred: torch.Tensor, tasks: Sequence[PhraseTask], rng: random.Random,
              cache: dict[str, torch.Tensor]) -> torch.Tensor | None:
    rows = [i for i, t in enumerate(tasks) if t.phrases]
    if not rows:
        return None
    picks = [rng.randrange(len(tasks[i].phrases)) for i in rows]
    phrases = [tasks[i].phrases[c] for i, c in zip(rows, picks, strict=True)]
    missing = [p for p in dict.fromkeys(phrases) if p not in cache]
    if missing:  # phrase targets are constant: encode each once
        with torch.no_grad():
            for p, f in zip(missing, backbone.encode_texts(missing), strict=True):
                cache[p] = f
    targets = torch.stack([cache[p] for p in phrases])
    tokens = tokenize_prompts(backbone, [tasks[i].pseudo_phrases[c] for i, c in zip(rows, picks, strict=True)])
    feats = encode_tokens(backbone, tokens, pred[rows]).float()
    return cosine_loss(feats, targets)


def train_phi(
    backbone: Backbone,
    image_features: torch.Tensor,
    oti_tokens: torch.Tensor,
    config: PhiTrainConfig | None = None,
    image_concepts: Sequence[Sequence[str]] | None = None,
    phrase_bank: Mapping[str, Sequence[str]] | None = None,
    phi: Phi | None = None,
    progress: bool = True,
) -> tuple[Phi, list[dict[str, float]]]:
    """Distil phi from OTI tokens; returns phi (eval mode) and per-epoch mean losses."""
    config = config or PhiTrainConfig()
    torch.manual_seed(config.seed)
    rng, nrng = random.Random(config.seed), np.random.default_rng(config.seed)
    device = backbone.device
    phi = (phi or Phi.for_backbone(backbone.embed_dim, backbone.token_width, config.dropout)).to(device).train()
    optimizer = torch.optim.AdamW(phi.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    tasks = None
    if image_concepts is not None and phrase_bank is not None and config.lambda_gpt > 0:
        tasks = phrase_tasks(image_concepts, phrase_bank, config.top_k_concepts)
    vocab = backbone.token_embedding.weight.detach()
    features, targets = image_features.float().cpu(), oti_tokens.float().cpu()
    n, cache, history = features.shape[0], {}, []
    for _ in tqdm(range(config.epochs), desc="phi epochs", disable=not progress):
        if config.hard_negatives and n >= 2 * config.batch_size:
            batches = similar_batches(features, config.batch_size, nrng)
        else:
            perm = nrng.permutation(n)
            batches = [perm[i : i + config.batch_size] for i in range(0, n, config.batch_size)]
        sums: dict[str, float] = {"distil": 0.0, "gpt": 0.0, "reg": 0.0, "loss": 0.0}
        for idx in batches:
            if len(idx) < 2:
                continue
            idx_t = torch.as_tensor(idx)
            pred = phi(features[idx_t].to(device))
            distil = nt_xent(pred, targets[idx_t].to(device), config.temperature)
            loss = config.lambda_distil * distil
            gpt = None if tasks is None else _gpt_loss(backbone, pred, [tasks[i] for i in idx], rng, cache)
            if gpt is not None:
                loss = loss + config.lambda_gpt * gpt
            reg = token_penalty(pred, vocab, config.reg_form, config.reg_knn, config.reg_norm)
            loss = loss + config.lambda_reg * reg
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            for key, val in (("distil", distil), ("gpt", gpt), ("reg", reg), ("loss", loss)):
                sums[key] += 0.0 if val is None else float(val.detach()) / len(batches)
        history.append(sums)
    return phi.eval(), history
