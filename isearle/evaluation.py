"""The standard evaluation: CIRR, CIRCO, FashionIQ, ImageNet-R domain conversion and ShapesCIR.

`evaluate` runs one benchmark end to end: load the official files (`isearle.datasets`), encode the
gallery and reference images (batched, cached on disk per backbone), build one query feature per
query with `compose_queries` (image, text, image+text, OTI or phi), rank the gallery by cosine and
compute the benchmark's metrics (`isearle.metrics`). It returns a dict that `format_table` prints
and that is written as JSON; CIRR and CIRCO (and ShapesCIR) also get test-server submission files.

Protocol choices (see `isearle.metrics` for the ranking rules):

* Reference exclusion: the reference image is removed from the ranking on CIRR (official protocol)
  and ShapesCIR; CIRCO's and FashionIQ's reference code keeps it in the gallery, and so do we by
  default, so that the papers' numbers are comparable (`exclude_reference` overrides it).
* FashionIQ: each query is "a photo of $ that {c1} and {c2}" and the reversed order, the two
  normalised features averaged and renormalised (SEARLE); text-only uses "{c1} and {c2}" likewise.
* Domain conversion: prompts "a {domain} of $" (text-only: "a {domain} of"), Pic2Word's recall
  (fraction of the class's images in that domain found in the top K).
* ShapesCIR: "R@K" is 1 when any ground truth is in the top K (it has several equivalent ones);
  "R_first@K" is CIRCO's Recall@K on the annotated target only; mAP@K as on CIRCO; "per_edit"
  is mAP@10 per edit type.
* Captions containing the placeholder "$" have it spelled out ("dollar"), so that S* stays the
  only "$" token of the prompt.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from isearle import metrics as M
from isearle.artifacts import write_text
from isearle.datasets import (
    BENCHMARKS,
    DOMAINS,
    FASHIONIQ_CATEGORIES,
    Benchmark,
    FeatureCache,
    Query,
    default_cache_dir,
    extract_features_cached,
    fashioniq_prompts,
    load_benchmarks,
)
from isearle.eval_table import TITLES, format_table, jsonable  # noqa: F401  (the evaluation's API)
from isearle.oti import OTIConfig
from isearle.phi import resolve_phi
from isearle.retrieval import DEFAULT_TEMPLATE, METHODS, compose_queries

log = logging.getLogger(__name__)

#: Whether the reference image is removed from the ranking by default (see the module docstring).
EXCLUDE_REFERENCE = {"cirr": True, "circo": False, "fashioniq": False, "imagenet-r": False, "shapes": True}
DEFAULT_SPLIT = {"cirr": "val", "circo": "val", "fashioniq": "val", "imagenet-r": "val", "shapes": "val"}
SUBMISSION_TOP = 50


@dataclass
class Ranked:
    """What one benchmark's ranking produced: ranks of the ground truths, top lists, per-query labels."""

    ranks: torch.Tensor  # [Q, T] ranks of each query's ground truths (inf: beyond the top 50, or absent)
    n_relevant: torch.Tensor  # [Q]
    top: list[list[str]]  # top-50 gallery ids per query
    subset_ranks: torch.Tensor | None = None  # CIRR Recall_subset: target rank among img_set members
    subset_top: list[list[str]] | None = None
    relevant_top: torch.Tensor | None = None  # [Q, 50] bool: is each top item a ground truth


# ---------------------------------------------------------------------------------- queries
def _safe_caption(text: str) -> str:
    return text.replace("$", " dollar ")


def _plain_text(q: Query) -> str:
    """The text of the text-only baselines: the caption, or the template without "$" (domain conversion)."""
    if q.caption or q.template is None:
        return q.caption
    return " ".join(q.template.replace("$", " ").split())


@torch.inference_mode()
def compose_benchmark_queries(backbone: Any, bench: Benchmark, method: str, ref_features: torch.Tensor,
                              ref_index: dict[str, int], *, phi: torch.nn.Module | None = None,
                              pseudo_tokens: torch.Tensor | None = None, template: str = DEFAULT_TEMPLATE,
                              batch_size: int = 256, progress: bool = True) -> torch.Tensor:
    """L2-normalised query features [Q, D] of a benchmark's queries, batched by prompt template.

    `ref_features` [R, D] (un-normalised) and `pseudo_tokens` [R, W] (OTI) are indexed by reference id
    through `ref_index`. FashionIQ queries (two captions) average the features of both caption orders.
    """
    out = torch.empty(len(bench.queries), backbone.embed_dim)
    groups: dict[str | None, list[int]] = {}
    for i, q in enumerate(bench.queries):
        groups.setdefault(q.template, []).append(i)
    bar = tqdm(total=len(bench.queries), desc=f"queries ({method})", disable=not progress, unit="q")
    for tmpl, rows in groups.items():
        prompt_template = tmpl or template
        for s in range(0, len(rows), batch_size):
            chunk = rows[s : s + batch_size]
            qs = [bench.queries[i] for i in chunk]
            refs = torch.tensor([ref_index[q.reference] for q in qs])
            feats = ref_features[refs]
            tokens = pseudo_tokens[refs] if pseudo_tokens is not None else None
            if qs[0].captions:  # FashionIQ: both orders
                orders = list(zip(*[fashioniq_prompts(q.captions) for q in qs], strict=True))
            elif method in ("text", "image+text"):
                orders = [[_plain_text(q) for q in qs]]
            else:
                orders = [[q.caption for q in qs]]
            total = None
            for captions in orders:
                f = compose_queries(backbone, method, feats, [_safe_caption(c) for c in captions],
                                    phi=phi, pseudo_tokens=tokens, template=prompt_template)
                total = f if total is None else total + f
            out[chunk] = F.normalize(total.float(), dim=-1).cpu()
            bar.update(len(chunk))
    bar.close()
    return out


def oti_cache_settings(backbone: Any, ids: Sequence[str], config: OTIConfig, *, preprocess: str, decode: str,
                       features_precision: str, phrase_id: object = None, init_tag: str | None = None) -> dict:
    """Everything besides the weights that changes the OTI tokens of an evaluation: the OTI settings
    (templates and the run's precision included), the images and how their features were made
    (preprocessing, decoding, precision), the phrase bank and the warm start."""
    from isearle.oti import oti_precision

    return {"what": "oti", "version": 2, "oti": asdict(config) | {"precision": oti_precision(backbone, config)},
            "ids": list(ids), "preprocess": preprocess, "decode": decode, "features_precision": features_precision,
            "phrases": phrase_id, "init": init_tag}


def oti_tokens(backbone: Any, ids: Sequence[str], features: torch.Tensor, config: OTIConfig, *,
               cache_root: Path | None, namespace: str, preprocess: str = "targetpad", decode: str = "searle",
               features_precision: str = "fp32", phrases: Path | None = None, vocabulary: str = "openimages",
               init: torch.Tensor | None = None, init_tag: str | None = None, progress: bool = True) -> torch.Tensor:
    """OTI pseudo-tokens [R, W] of the reference images, resumable and cached under
    ``{cache_root}/oti/{cache key}/{namespace}`` (`oti_cache_settings`; a temp folder when `cache_root` is
    None or the weights are random).

    `init` warm-starts OTI (e.g. from phi); `init_tag` names it in the cache key."""
    from isearle.keys import cache_key
    from isearle.oti import phrase_tasks
    from isearle.oti_runs import invert_dataset

    tasks = None
    phrase_id = None
    if phrases is not None:
        from isearle.concepts import concept_bank
        from isearle.phrases import load_phrase_bank
        from isearle.weights import file_digest

        bank = load_phrase_bank(phrases)
        concepts = concept_bank(backbone, vocabulary, progress=progress)
        names = concepts.top_names(features, config.top_k_concepts)
        tasks = phrase_tasks(names, bank, config.top_k_concepts, config.concept_match)
        phrase_id = [file_digest(phrases), vocabulary]
    settings = oti_cache_settings(backbone, ids, config, preprocess=preprocess, decode=decode,
                                  features_precision=features_precision, phrase_id=phrase_id,
                                  init_tag=init_tag if init is not None else None)
    key = cache_key(backbone.name, backbone.pretrained, **settings)
    if cache_root is None or key is None:
        with tempfile.TemporaryDirectory() as tmp:
            _, tokens = invert_dataset(backbone, list(ids), features, tmp, config, tasks, init, progress)
            return tokens
    out = Path(cache_root) / "oti" / key / namespace
    got_ids, tokens = invert_dataset(backbone, list(ids), features, out, config, tasks, init, progress)
    if list(got_ids) != list(ids):
        raise RuntimeError(f"OTI cache {out} holds other images: delete it and run again")
    return tokens


# ---------------------------------------------------------------------------------- ranking
def _chunk_size(n_gallery: int) -> int:
    return int(max(16, min(1024, 40_000_000 // max(n_gallery, 1))))


@torch.inference_mode()
def rank_gallery(bench: Benchmark, queries: torch.Tensor, gallery: torch.Tensor, exclude_reference: bool,
                 device: torch.device | str = "cpu", top: int = SUBMISSION_TOP, progress: bool = True) -> Ranked:
    """Score every query against the (L2-normalised) gallery in chunks; ranks, top lists, CIRR subsets."""
    pos = {g: i for i, g in enumerate(bench.gallery)}
    qs = bench.queries
    width = max([len(q.targets) for q in qs] + [1])
    targets = M.pad_indices([[pos.get(t, -1) for t in q.targets] for q in qs], width)
    refs = torch.tensor([[pos.get(q.reference, -1)] for q in qs], dtype=torch.long)
    want_ranks = bench.name != "imagenet-r"  # domain conversion needs only the top lists
    has_subset = any(q.subset for q in qs)
    gallery = gallery.to(device)
    ranks, sub_ranks, tops, sub_tops, rel_top = [], [], [], [], []
    step = _chunk_size(len(bench.gallery))
    for s in tqdm(range(0, len(qs), step), desc="ranking", disable=not progress or len(qs) <= step):
        sl = slice(s, s + step)
        scores = queries[sl].to(device) @ gallery.T
        exclude = refs[sl] if exclude_reference else None
        idx = M.top_k(scores, top, exclude).cpu()
        tops.append(idx)
        if want_ranks:  # every metric stops at K = 50: ranks within the top 50 are enough
            ranks.append(M.ranks_in_top(idx, targets[sl]))
        else:
            tsets = [set(q.targets) for q in qs[sl]]
            rel_top.append(torch.tensor([[i >= 0 and bench.gallery[i] in ts for i in row]
                                         for row, ts in zip(idx.tolist(), tsets, strict=True)], dtype=torch.bool))
        if has_subset:
            allowed = M.pad_indices([[pos.get(m, -1) for m in (q.subset or [])] for q in qs[sl]])
            sub_idx = M.top_k(scores, allowed.shape[1], refs[sl], allowed).cpu()
            sub_ranks.append(M.ranks_in_top(sub_idx, targets[sl, :1]))
            sub_tops.append(sub_idx[:, :3])

    def ids(parts: list[torch.Tensor]) -> list[list[str]]:
        return [[bench.gallery[i] for i in row if i >= 0] for row in torch.cat(parts).tolist()] if parts else []

    return Ranked(
        ranks=torch.cat(ranks) if ranks else torch.full((len(qs), width), M.INF),
        n_relevant=torch.tensor([len(q.targets) for q in qs]),
        top=ids(tops),
        subset_ranks=torch.cat(sub_ranks) if sub_ranks else None,
        subset_top=ids(sub_tops) if sub_tops else None,
        relevant_top=torch.cat(rel_top) if rel_top else None,
    )


# -------------------------------------------------------------------------------- metrics
def benchmark_metrics(name: str, parts: Sequence[tuple[Benchmark, Ranked]]) -> dict[str, Any]:
    """The metric dict of a benchmark from its ranked part(s) (several for FashionIQ)."""
    if not all(b.has_ground_truth for b, _ in parts):
        return {}
    if name == "cirr":
        b, r = parts[0]
        return M.cirr_metrics(r.ranks, r.subset_ranks[:, 0] if r.subset_ranks is not None else None)
    if name == "circo":
        b, r = parts[0]
        return M.circo_metrics(r.ranks, r.n_relevant, [q.groups for q in b.queries])
    if name == "fashioniq":
        return M.fashioniq_metrics({b.subset_name: r.ranks for b, r in parts})
    if name == "imagenet-r":
        b, r = parts[0]
        per: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for d in dict.fromkeys(q.groups[0] for q in b.queries):
            rows = [i for i, q in enumerate(b.queries) if q.groups[0] == d]
            per[d] = (r.relevant_top[rows], r.n_relevant[rows])
        return M.domain_metrics(per)
    if name == "shapes":
        b, r = parts[0]
        return M.any_gt_metrics(r.ranks, r.n_relevant, [q.groups[0] if q.groups else "all" for q in b.queries])
    raise ValueError(f"unknown benchmark {name!r}")


# ----------------------------------------------------------------------------- submissions
def _circo_id(x: str) -> int | str:
    return int(x) if x.isdigit() else x


def write_submissions(name: str, split: str, method: str, parts: Sequence[tuple[Benchmark, Ranked]],
                      out_dir: str | Path) -> list[str]:
    """Test-server files: CIRR {pairid: top-50} + "version"/"metric" (and top-3 "recall_subset"),
    CIRCO / ShapesCIR {query id: top-50 image ids}. Returns the written paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{name}_{split}_{method.replace('+', '_')}"
    written = []
    if name == "cirr":
        b, r = parts[0]
        rec = {"version": "rc2", "metric": "recall"}
        rec.update({q.id: top[:SUBMISSION_TOP] for q, top in zip(b.queries, r.top, strict=True)})
        path = out / f"{stem}_recall.json"
        write_text(path, json.dumps(rec, sort_keys=True))
        written.append(str(path))
        if r.subset_top is not None:
            sub = {"version": "rc2", "metric": "recall_subset"}
            sub.update({q.id: top[:3] for q, top in zip(b.queries, r.subset_top, strict=True)})
            path = out / f"{stem}_recall_subset.json"
            write_text(path, json.dumps(sub, sort_keys=True))
            written.append(str(path))
    elif name in ("circo", "shapes"):
        b, r = parts[0]
        conv = _circo_id if name == "circo" else str
        sub = {q.id: [conv(x) for x in top[:SUBMISSION_TOP]] for q, top in zip(b.queries, r.top, strict=True)}
        path = out / f"{stem}.json"
        write_text(path, json.dumps(sub))
        written.append(str(path))
    return written


# ---------------------------------------------------------------------------------- runner
def _check_phi(phi: torch.nn.Module, backbone: Any) -> None:
    cfg = getattr(phi, "config", None)
    if cfg is not None and (cfg.input_dim, cfg.output_dim) != (backbone.embed_dim, backbone.token_width):
        raise ValueError(f"phi maps {cfg.input_dim} -> {cfg.output_dim} but {backbone.name} needs "
                         f"{backbone.embed_dim} -> {backbone.token_width}: use the phi trained for this backbone")


def evaluate(
    backbone: Any,
    benchmark: str,
    split: str | None = None,
    method: str = "phi",
    phi: str | torch.nn.Module | None = None,
    *,
    data: str | Path | None = None,
    template: str = DEFAULT_TEMPLATE,
    limit: int | None = None,
    exclude_reference: bool | None = None,
    categories: Sequence[str] = FASHIONIQ_CATEGORIES,
    domains: Sequence[str] = DOMAINS,
    oti: OTIConfig | None = None,
    oti_phrases: str | Path | None = None,
    oti_vocabulary: str = "openimages",
    cache_dir: str | Path | None = "default",
    batch_size: int = 64,
    num_workers: int = 0,
    submission_dir: str | Path | None = None,
    preprocess: str = "targetpad",
    decode: str = "searle",
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate `method` on `benchmark`/`split`; returns metrics (percent) + "meta" (+ "submissions").

    `data`: the dataset folder (ShapesCIR: default assets/shapescir). `phi`: a module, "searle",
    "searle-xl" or a checkpoint path (method phi; for OTI, a warm start). `cache_dir`: where image
    features and OTI tokens are kept ("default": $ISEARLE_CACHE or ~/.cache/isearle; None: no disk
    cache). `submission_dir`: write test-server files there (CIRR, CIRCO, ShapesCIR). `decode`: the
    image decoding (`isearle.images`; "searle": as the authors' code). Images that cannot be read are
    skipped (a gallery image leaves the gallery, a query whose reference is unreadable is dropped) and
    listed in meta["unreadable"]; more than 1 % of them fail the run. OTI runs in `oti.precision`
    (None: the backbone's); its reference features are encoded in that precision, as SEARLE's
    oti_inversion.py encodes them under its autocast.
    """
    if benchmark not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {benchmark!r}: use one of {', '.join(BENCHMARKS)}")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: use one of {', '.join(METHODS)}")
    split = split or DEFAULT_SPLIT[benchmark]
    exclude = EXCLUDE_REFERENCE[benchmark] if exclude_reference is None else exclude_reference
    cache_root = default_cache_dir().parent if cache_dir == "default" else (Path(cache_dir) if cache_dir else None)
    started = time.perf_counter()
    phi_net, phi_name = (None, None)
    if method == "phi" or (method == "oti" and phi is not None):
        phi_net, phi_name = resolve_phi(backbone, phi, required=True)
        if phi_net is None:
            raise ValueError(f"method 'phi' needs a phi network: pass --phi (searle, searle-xl or a checkpoint); "
                             f"{backbone.name}/{backbone.pretrained} has no default")
        _check_phi(phi_net, backbone)
        phi_net = phi_net.to(backbone.device).eval()
    oti = oti or OTIConfig()
    benches = [b.limit(limit) for b in load_benchmarks(benchmark, data, split, categories=categories,
                                                       domains=domains, image_size=backbone.image_size)]
    parts: list[tuple[Benchmark, Ranked]] = []
    unreadable: dict[str, str] = {}
    dropped_queries = 0
    features_root = None if cache_root is None else cache_root / "features"
    precision = _features_precision(backbone)
    for bench in benches:
        label = f"{benchmark}{'/' + bench.subset_name if bench.subset_name else ''}"
        cache = FeatureCache.for_backbone(features_root, backbone, bench.cache_namespace, preprocess, decode)
        ids = bench.image_ids()
        bad: dict[str, str] = {}
        feats = extract_features_cached(backbone, ids, bench.images, cache, batch_size, num_workers, progress,
                                        desc=f"{label} images", decode=decode, unreadable=bad)
        if bad:
            unreadable.update(bad)
            n = len(bench.queries)
            bench = _without(bench, set(bad))
            dropped_queries += n - len(bench.queries)
        row = {i: r for r, i in enumerate(ids)}
        gallery = F.normalize(feats[[row[g] for g in bench.gallery]], dim=-1)
        ref_ids = list(dict.fromkeys(q.reference for q in bench.queries))
        ref_index = {r: j for j, r in enumerate(ref_ids)}
        ref_feats = feats[[row[r] for r in ref_ids]] if ref_ids else torch.empty(0, feats.shape[1])
        tokens = None
        if method == "oti" and ref_ids:
            init = None
            if phi_net is not None:
                with torch.inference_mode():
                    init = phi_net(ref_feats.to(backbone.device)).float().cpu()
            oti_feats, oti_feats_precision = _oti_features(backbone, oti, ref_ids, ref_feats, bench, features_root,
                                                           preprocess, decode, batch_size, num_workers, progress)
            tokens = oti_tokens(backbone, ref_ids, oti_feats, oti, cache_root=cache_root,
                                namespace=bench.cache_namespace, preprocess=preprocess, decode=decode,
                                features_precision=oti_feats_precision,
                                phrases=Path(oti_phrases) if oti_phrases else None, vocabulary=oti_vocabulary,
                                init=init, init_tag=phi_name, progress=progress)
        queries = compose_benchmark_queries(backbone, bench, method, ref_feats, ref_index, phi=phi_net,
                                            pseudo_tokens=tokens, template=template, progress=progress)
        parts.append((bench, rank_gallery(bench, queries, gallery, exclude, backbone.device, progress=progress)))

    result: dict[str, Any] = benchmark_metrics(benchmark, parts)
    if submission_dir is None and benchmark in ("cirr", "circo") and not all(b.has_ground_truth for b, _ in parts):
        submission_dir = Path("submissions")  # a test split: the server files are the only output
    if submission_dir is not None:
        result["submissions"] = write_submissions(benchmark, parts[0][0].split, method, parts, submission_dir)
    result["meta"] = {
        "benchmark": benchmark, "split": parts[0][0].split, "method": method,
        "backbone": backbone.name, "pretrained": backbone.pretrained, "preprocess": preprocess,
        "decode": decode, "precision": precision,
        "unreadable": {"count": len(unreadable), "images": sorted(unreadable), "queries_dropped": dropped_queries},
        "phi": phi_name, "template": template,
        "oti": asdict(oti) | {"phrases": str(oti_phrases) if oti_phrases else None,
                              "precision": _oti_precision(backbone, oti)} if method == "oti" else None,
        "n_queries": sum(len(b) for b, _ in parts), "gallery_size": sum(len(b.gallery) for b, _ in parts),
        "categories": [b.subset_name for b, _ in parts] if benchmark == "fashioniq" else None,
        "exclude_reference": exclude, "ground_truth": all(b.has_ground_truth for b, _ in parts),
        "limit": limit, "units": "percent", "ties": "stable (earlier gallery item first)",
        "seconds": round(time.perf_counter() - started, 2),
    }
    return result


def _features_precision(backbone: Any) -> str:
    from isearle.precision import effective_precision

    return effective_precision(getattr(backbone, "precision", "fp32"), getattr(backbone, "device", "cpu"))


def _oti_precision(backbone: Any, oti: OTIConfig) -> str:
    from isearle.oti import oti_precision

    return oti_precision(backbone, oti)


def _oti_features(backbone: Any, oti: OTIConfig, ref_ids: list[str], ref_feats: torch.Tensor, bench: Benchmark,
                  features_root: Path | None, preprocess: str, decode: str, batch_size: int, num_workers: int,
                  progress: bool) -> tuple[torch.Tensor, str]:
    """The reference features OTI inverts, and their precision: the evaluation's own when OTI runs in
    the same precision, else encoded again in OTI's (SEARLE's oti_inversion.py encodes the images
    under the autocast of its fp16 OTI), through a feature cache keyed by that precision."""
    precision = _oti_precision(backbone, oti)
    if precision == _features_precision(backbone) or not hasattr(backbone, "with_precision"):
        return ref_feats, _features_precision(backbone)
    encoder = backbone.with_precision(precision)
    cache = FeatureCache.for_backbone(features_root, encoder, bench.cache_namespace, preprocess, decode)
    feats = extract_features_cached(encoder, ref_ids, bench.images, cache, batch_size, num_workers, progress,
                                    desc=f"{bench.name} references ({precision})", decode=decode)
    return feats, precision


def _without(bench: Benchmark, bad: set[str]) -> Benchmark:
    """The benchmark without unreadable images: out of the gallery (and CIRR subsets), and without the
    queries whose reference cannot be read (SEARLE's collate_fn drops such items too)."""
    from dataclasses import replace

    queries = [replace(q, subset=[m for m in q.subset if m not in bad] if q.subset is not None else None)
               for q in bench.queries if q.reference not in bad]
    if len(queries) < len(bench.queries):
        log.warning("%s: %d queries dropped: their reference image cannot be read",
                    bench.name, len(bench.queries) - len(queries))
    return replace(bench, queries=queries, gallery=[g for g in bench.gallery if g not in bad])


#: Metric that selects phi during training (`isearle train-phi --val-every`), per benchmark.
VAL_METRIC = {"cirr": "R@1", "circo": "mAP@10", "shapes": "mAP@10"}


def phi_validator(backbone: Any, benchmark: str = "shapes", data: str | Path | None = None,
                  metric: str | None = None, cache_dir: str | Path | None = "default") -> Callable[[Any], float]:
    """phi -> its metric on `benchmark`'s val split (gallery features extracted once, then cached)."""
    if data is None and benchmark != "shapes":
        raise ValueError(f"validating on {benchmark} needs --val-data (its folder, official layout)")
    metric = metric or VAL_METRIC.get(benchmark, "R@1")

    def validate(phi: Any) -> float:
        result = evaluate(backbone, benchmark, "val", "phi", phi, data=data, cache_dir=cache_dir, progress=False)
        if metric not in result:
            raise ValueError(f"{benchmark} has no metric {metric!r}: use one of "
                             f"{', '.join(k for k in result if k not in ('meta', 'submissions'))}")
        return float(result[metric])

    return validate


def default_backbone(benchmark: str, phi: str | None, model: str | None,
                     pretrained: str | None) -> tuple[str, str | None]:
    """(model, pretrained) when not given: the official phi's backbone, the shapes model, or OpenAI B/32."""
    from isearle.phi import OFFICIAL

    if model is None:
        if phi in OFFICIAL:
            model = OFFICIAL[phi][1]
        elif phi and Path(phi).suffix == ".safetensors" and Path(phi).is_file():
            from isearle.phi import phi_settings

            info = phi_settings(phi)
            model, pretrained = info.get("backbone", "ViT-B-32"), pretrained or info.get("pretrained")
        else:
            model = "isearle-shapes" if benchmark == "shapes" else "ViT-B-32"
    if pretrained is None:
        pretrained = "isearle-shapes" if model == "isearle-shapes" else "openai"
    return model, None if str(pretrained).lower() == "none" else pretrained
