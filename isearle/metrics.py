"""Retrieval metrics of the CIR benchmarks, vectorised over queries (pure torch, no model, no I/O).

Everything goes through the *rank* (1-based) of each ground-truth item in a query's ranking:

* Ranking order: descending score; equal scores are broken by gallery position (the earlier
  gallery item ranks first), i.e. a stable sort. This is deterministic (the reference code's
  `argsort`/`topk` leave ties unspecified; exact ties do occur for duplicate gallery images) and it
  is the order `top_k` writes to submission files, so metrics and submissions always agree.
* Excluded items (the reference image in CIRR's protocol) are removed from the ranking: they take
  no position, and a ground truth that is excluded or not in the gallery gets rank `inf` (a miss).
* A subset ranking (CIRR's Recall_subset) ranks only the allowed items.

Reducers take a rank matrix [Q, T] (T ground-truth slots per query, padded with `inf`) and return
percentages (0-100, as the papers report them):

* `recall_at_k(..., mode="first")`: the first ground truth (CIRR's single target, CIRCO's
  `target_img_id`) is in the top K. `mode="any"`: at least one ground truth is in the top K.
* `map_at_k`: AP@K = sum_{i<=K} P(i) rel(i) / min(|GT|, K) (CIRCO), averaged over queries.

Ranks can come from a score matrix (`target_ranks`, `best_rank`) or from ranked id lists such as a
submission file (`ranks_from_lists`); both give the same metrics for K up to the list length.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping, Sequence

import torch

INF = float("inf")


# ------------------------------------------------------------------------------------ masks
def index_mask(indices: torch.Tensor, n: int) -> torch.Tensor:
    """Bool [Q, n] with True at the given column indices ([Q, E] long, -1 = padding)."""
    mask = torch.zeros(indices.shape[0], n + 1, dtype=torch.bool, device=indices.device)
    cols = torch.where(indices < 0, torch.full_like(indices, n), indices)
    mask.scatter_(1, cols, True)
    return mask[:, :n]


def ranking_mask(n_queries: int, n_gallery: int, exclude: torch.Tensor | None = None,
                 allowed: torch.Tensor | None = None, device: torch.device | str = "cpu") -> torch.Tensor:
    """Bool [Q, G]: which gallery items take part in each query's ranking.

    `allowed` ([Q, A] indices, -1 padded) restricts the ranking to those items (a subset);
    `exclude` ([Q, E] indices, -1 padded) removes items (e.g. the reference image).
    """
    if allowed is not None:
        valid = index_mask(allowed.to(device), n_gallery)
    else:
        valid = torch.ones(n_queries, n_gallery, dtype=torch.bool, device=device)
    if exclude is not None:
        valid &= ~index_mask(exclude.to(device), n_gallery)
    return valid


def pad_indices(rows: Sequence[Sequence[int]], width: int | None = None) -> torch.Tensor:
    """A ragged list of index lists as a [Q, W] long tensor padded with -1."""
    width = max([len(r) for r in rows] + [1]) if width is None else width
    out = torch.full((len(rows), width), -1, dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            out[i, : len(r)] = torch.as_tensor(list(r)[:width], dtype=torch.long)
    return out


# ------------------------------------------------------------------------------------ ranks
def _before(scores: torch.Tensor, item: torch.Tensor) -> torch.Tensor:
    """Bool [Q, G]: gallery items ranked before item[q] (higher score, or equal and earlier)."""
    s = scores.gather(1, item.clamp(min=0)[:, None])
    cols = torch.arange(scores.shape[1], device=scores.device)[None, :]
    return (scores > s) | ((scores == s) & (cols < item[:, None]))


def target_ranks(scores: torch.Tensor, targets: torch.Tensor, exclude: torch.Tensor | None = None,
                 allowed: torch.Tensor | None = None) -> torch.Tensor:
    """1-based ranks [Q, T] (float, `inf` = miss) of each target gallery index in each query's ranking.

    scores: [Q, G] similarities; targets: [Q, T] gallery indices, -1 = padding (rank inf).
    `exclude` / `allowed`: see `ranking_mask`. Ties: stable (earlier gallery item first).
    """
    scores = scores.float()
    q, g = scores.shape
    targets = targets.to(scores.device)
    valid = ranking_mask(q, g, exclude, allowed, scores.device)
    ranks = torch.full(targets.shape, INF, device=scores.device)
    for j in range(targets.shape[1]):
        t = targets[:, j]
        present = (t >= 0) & valid.gather(1, t.clamp(min=0)[:, None])[:, 0]
        r = (_before(scores, t) & valid).sum(1).float() + 1
        ranks[:, j] = torch.where(present, r, torch.full_like(r, INF))
    return ranks


def best_rank(scores: torch.Tensor, relevant: torch.Tensor, exclude: torch.Tensor | None = None,
              allowed: torch.Tensor | None = None) -> torch.Tensor:
    """Rank [Q] of the best-ranked relevant item (`relevant`: bool [Q, G]); inf when none is ranked.

    One pass whatever the number of relevant items: for "any ground truth in the top K" with many
    ground truths per query (domain conversion: every image of the class in the domain).
    """
    scores = scores.float()
    q, g = scores.shape
    valid = ranking_mask(q, g, exclude, allowed, scores.device)
    rel = relevant.to(scores.device) & valid
    masked = torch.where(rel, scores, torch.full_like(scores, -INF))
    top = masked.max(dim=1, keepdim=True).values
    # the earliest gallery position among the relevant items tied at the best score
    cols = torch.arange(g, device=scores.device)[None, :].expand(q, g)
    first = torch.where(rel & (masked == top), cols, torch.full_like(cols, g)).min(dim=1).values
    r = (_before(scores, first.clamp(max=g - 1)) & valid).sum(1).float() + 1
    return torch.where(rel.any(dim=1), r, torch.full_like(r, INF))


def ranks_from_lists(ranked: Sequence[Sequence[Hashable]], targets: Sequence[Sequence[Hashable]]) -> torch.Tensor:
    """Ranks [Q, T] of each query's targets in ranked id lists (e.g. a submission's top-50); inf = absent."""
    width = max([len(t) for t in targets] + [1])
    out = torch.full((len(targets), width), INF)
    for i, (lst, tgt) in enumerate(zip(ranked, targets, strict=True)):
        pos: dict[Hashable, int] = {}
        for r, item in enumerate(lst, start=1):
            pos.setdefault(item, r)
        for j, t in enumerate(tgt):
            if t in pos:
                out[i, j] = pos[t]
    return out


def top_k(scores: torch.Tensor, k: int, exclude: torch.Tensor | None = None,
          allowed: torch.Tensor | None = None) -> torch.Tensor:
    """Gallery indices [Q, k] of each query's top k in the ranking order above (-1 past the end).

    Exact under ties without sorting the whole row: the k-th best score is found with `topk`, the
    items above it plus the earliest items equal to it are taken, and only those k are sorted.
    """
    scores = scores.float()
    q, g = scores.shape
    kk = min(k, g)
    valid = ranking_mask(q, g, exclude, allowed, scores.device)
    masked = torch.where(valid, scores, torch.full_like(scores, -INF))
    if kk == 0:
        return torch.full((q, k), -1, dtype=torch.long, device=scores.device)
    threshold = masked.topk(kk, dim=1).values[:, -1:]
    above = masked > threshold
    need = kk - above.sum(1, keepdim=True)
    equal = masked == threshold
    chosen = above | (equal & (equal.cumsum(1) <= need))
    idx = chosen.nonzero()[:, 1].view(q, kk)  # exactly kk per row, in gallery order
    order = torch.sort(masked.gather(1, idx), dim=1, descending=True, stable=True).indices
    idx = idx.gather(1, order)
    idx = torch.where(valid.gather(1, idx), idx, torch.full_like(idx, -1))
    if kk < k:
        idx = torch.cat([idx, idx.new_full((q, k - kk), -1)], dim=1)
    return idx


def ranks_in_top(top: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Ranks [Q, T] of target indices within top lists [Q, K] (from `top_k`); inf when not in the top K.

    Every metric here looks at the top 50 at most, so ranks from a top-50 list give the same metrics
    as exact ranks at a fraction of the cost on a large gallery.
    """
    targets = targets.to(top.device)
    hit = (top[:, None, :] == targets[:, :, None]) & (targets[:, :, None] >= 0) & (top[:, None, :] >= 0)
    pos = hit.float().argmax(dim=-1).float() + 1
    return torch.where(hit.any(dim=-1), pos, torch.full_like(pos, INF))


# --------------------------------------------------------------------------------- reducers
def _counts(ranks: torch.Tensor, n_relevant: torch.Tensor | Sequence[int] | None) -> torch.Tensor:
    if n_relevant is None:
        return torch.isfinite(ranks).sum(1).clamp(min=1).double()  # only safe when no GT is missing
    return torch.as_tensor(n_relevant, device=ranks.device).double()


def hits_at_k(ranks: torch.Tensor, k: int, mode: str = "first") -> torch.Tensor:
    """Bool [Q]: the first ground truth ("first") or any ground truth ("any") is in the top k."""
    if mode == "first":
        return ranks[:, 0] <= k
    if mode == "any":
        return (ranks <= k).any(dim=1)
    raise ValueError(f"mode must be 'first' or 'any', not {mode!r}")


def recall_at_k(ranks: torch.Tensor, ks: Iterable[int], mode: str = "first") -> dict[int, float]:
    """{K: Recall@K in percent}; `ranks` [Q, T] or [Q]. See `hits_at_k` for `mode`."""
    ranks = ranks[:, None] if ranks.dim() == 1 else ranks
    if ranks.shape[0] == 0:
        return {k: float("nan") for k in ks}
    return {k: 100.0 * hits_at_k(ranks, k, mode).double().mean().item() for k in ks}


def average_precision_at_k(ranks: torch.Tensor, k: int,
                           n_relevant: torch.Tensor | Sequence[int] | None = None) -> torch.Tensor:
    """AP@k per query [Q] (fraction): sum_{i<=k} P(i) rel(i) / min(|GT|, k).

    `ranks` [Q, T] of distinct ground truths (inf = miss or padding); `n_relevant` = |GT| per query
    (default: the finite ranks, which undercounts ground truths absent from the gallery).
    """
    r = ranks.double().sort(dim=1).values  # ascending; the m-th relevant item sits at rank r[m-1]
    m = torch.arange(1, r.shape[1] + 1, device=r.device, dtype=r.dtype)[None, :]
    precision = torch.where(r <= k, m / r, torch.zeros_like(r))
    denom = _counts(ranks, n_relevant).clamp(max=k).clamp(min=1)
    return precision.sum(1) / denom


def map_at_k(ranks: torch.Tensor, ks: Iterable[int],
             n_relevant: torch.Tensor | Sequence[int] | None = None) -> dict[int, float]:
    """{K: mAP@K in percent}."""
    if ranks.shape[0] == 0:
        return {k: float("nan") for k in ks}
    return {k: 100.0 * average_precision_at_k(ranks, k, n_relevant).mean().item() for k in ks}


def grouped_map_at_k(ranks: torch.Tensor, groups: Sequence[Iterable[str]], k: int = 10,
                     n_relevant: torch.Tensor | Sequence[int] | None = None,
                     names: Sequence[str] | None = None) -> dict[str, float]:
    """{group: mAP@k in percent} where query q belongs to every group in groups[q] (CIRCO's aspects).

    `names` fixes the reported groups and their order (a group without queries gives nan).
    """
    ap = average_precision_at_k(ranks, k, n_relevant)
    members: dict[str, list[int]] = {}
    for q, gs in enumerate(groups):
        for g in gs:
            members.setdefault(g, []).append(q)
    keys = list(names) if names is not None else sorted(members)
    return {g: (100.0 * ap[members[g]].mean().item() if g in members else float("nan")) for g in keys}


# ------------------------------------------------------------------------------ benchmarks
#: The nine CIRCO semantic aspects, in the order of the official evaluation script.
CIRCO_ASPECTS: tuple[str, ...] = (
    "cardinality", "addition", "negation", "direct_addressing", "compare_change",
    "comparative_statement", "statement_with_conjunction", "spatial_relations_background", "viewpoint",
)


def cirr_metrics(ranks: torch.Tensor, subset_ranks: torch.Tensor | None = None) -> dict[str, float]:
    """CIRR: Recall@1/5/10/50 (reference removed) and Recall_subset@1/2/3 from the target's ranks [Q]."""
    out = {f"R@{k}": v for k, v in recall_at_k(ranks, (1, 5, 10, 50)).items()}
    if subset_ranks is not None:
        out.update({f"Rs@{k}": v for k, v in recall_at_k(subset_ranks, (1, 2, 3)).items()})
        out["avg"] = (out["R@5"] + out["Rs@1"]) / 2  # CIRR's headline "(R@5 + Rsubset@1) / 2"
    return out


def circo_metrics(ranks: torch.Tensor, n_relevant: torch.Tensor | Sequence[int],
                  aspects: Sequence[Iterable[str]] | None = None) -> dict:
    """CIRCO: mAP@5/10/25/50 over all ground truths, Recall@K of the first target, mAP@10 per aspect."""
    out: dict = {f"mAP@{k}": v for k, v in map_at_k(ranks, (5, 10, 25, 50), n_relevant).items()}
    out.update({f"R@{k}": v for k, v in recall_at_k(ranks, (5, 10, 25, 50), "first").items()})
    if aspects is not None:
        out["per_aspect"] = grouped_map_at_k(ranks, aspects, 10, n_relevant, CIRCO_ASPECTS)
    return out


def fashioniq_metrics(per_category: Mapping[str, torch.Tensor]) -> dict:
    """FashionIQ: Recall@10/50 per category (target ranks [Q] each) and their unweighted average."""
    cats = {c: {f"R@{k}": v for k, v in recall_at_k(r, (10, 50)).items()} for c, r in per_category.items()}
    out: dict = {key: sum(m[key] for m in cats.values()) / max(len(cats), 1) for key in ("R@10", "R@50")}
    out["per_category"] = cats
    return out


def any_gt_metrics(ranks: torch.Tensor, n_relevant: torch.Tensor | Sequence[int],
                   groups: Sequence[str] | None = None) -> dict:
    """ShapesCIR: R@1/5/10/50 (any ground truth in the top K), mAP@5/10/25/50, mAP@10 per group."""
    out: dict = {f"R@{k}": v for k, v in recall_at_k(ranks, (1, 5, 10, 50), "any").items()}
    out.update({f"mAP@{k}": v for k, v in map_at_k(ranks, (5, 10, 25, 50), n_relevant).items()})
    out.update({f"R_first@{k}": v for k, v in recall_at_k(ranks, (1, 5, 10, 50), "first").items()})
    if groups is not None:
        out["per_edit"] = grouped_map_at_k(ranks, [[g] for g in groups], 10, n_relevant)
    return out


def fraction_recall_at_k(relevant_top: torch.Tensor, n_relevant: torch.Tensor | Sequence[int],
                         ks: Iterable[int]) -> dict[int, float]:
    """{K: mean over queries of (#relevant in the top K) / |relevant|} in percent (Pic2Word's recall).

    `relevant_top`: bool [Q, Kmax], whether each of a query's top items is relevant. A query with no
    relevant item counts 0 (as in Pic2Word, whose queries include classes absent from a domain).
    """
    n = torch.as_tensor(n_relevant).double()
    if relevant_top.shape[0] == 0:
        return {k: float("nan") for k in ks}
    found = relevant_top.double().cumsum(dim=1)
    out = {}
    for k in ks:
        hits = found[:, min(k, found.shape[1]) - 1] if found.shape[1] else torch.zeros_like(n)
        out[k] = 100.0 * torch.where(n > 0, hits / n.clamp(min=1), torch.zeros_like(n)).mean().item()
    return out


def domain_metrics(per_domain: Mapping[str, tuple[torch.Tensor, torch.Tensor | Sequence[int]]]) -> dict:
    """Domain conversion (Pic2Word): Recall@10/50 per domain from (relevance of the top 50, |relevant|)
    per query, and the average over domains. Recall is Pic2Word's fraction of relevant images found."""
    doms = {d: {f"R@{k}": v for k, v in fraction_recall_at_k(rel, n, (10, 50)).items()}
            for d, (rel, n) in per_domain.items()}
    out: dict = {key: sum(m[key] for m in doms.values()) / max(len(doms), 1) for key in ("R@10", "R@50")}
    out["per_domain"] = doms
    return out
