"""The pseudo-word views: what S* captured, how OTI found it, and which part of a query mattered.

One set of computations over a `service.Session`, behind the demo's explanation panel, its
inspector views and `isearle inspect` (so all show the same numbers): a description of S* (norm,
nearest vocabulary tokens, nearest concepts of "a photo of S*"), its rankings with and without a caption, OTI watched step by step (the same
generator a plain run consumes, `oti.invert_steps`), phi against OTI, the blend of two
pseudo-words, each caption word's effect, and S* saved to / loaded from safetensors.
"""

from __future__ import annotations

import hashlib
import json
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open
from tqdm.auto import tqdm

from isearle.artifacts import tensors_bytes, write_bytes
from isearle.backbone import Backbone, encode_tokens
from isearle.errors import BadRequest
from isearle.oti import OTIConfig, token_norm
from isearle.paths import public_name
from isearle.pseudo_word import encode_with_pseudo_tokens, fill_template, normalize_prompt
from isearle.reference import Reference, image_key
from isearle.retrieval import Hit
from isearle.service import Session
from isearle.templates import ALONE_TEMPLATE

#: Names of the two loss curves of a watched OTI run.
WARM_CURVE, COLD_CURVE = "from phi (warm start)", "from noise N(0, 0.02)"
#: Format tag of a saved pseudo-word file.
TOKEN_FORMAT = "isearle-pseudo-word/1"


# ------------------------------------------------------------------------------ describing S*
@dataclass
class TokenView:
    """S* described: its norm (absolute and in mean token norms), nearest tokens and concepts."""

    norm: float
    relative_norm: float
    tokens: list[tuple[str, float]]
    concepts: list[tuple[str, float]]

    def as_dict(self) -> dict:
        return {"norm": round(self.norm, 6), "relative_norm": round(self.relative_norm, 6),
                "tokens": [[w, round(s, 6)] for w, s in self.tokens],
                "concepts": [[c, round(s, 6)] for c, s in self.concepts]}


@torch.inference_mode()
def token_features(backbone: Backbone, token: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
    """L2-normalised text features [N, D] of prompts holding "$", all with the pseudo-token `token`."""
    return F.normalize(encode_with_pseudo_tokens(backbone, list(prompts), token.to(backbone.device)), dim=-1)


def prompt(insp: Session, caption: str | None) -> str:
    """The query prompt of a caption ("a photo of $ that {caption}"), or S* alone for None / ""."""
    return fill_template(insp.retriever.template, caption) if caption else ALONE_TEMPLATE


def nearest_concepts(insp: Session, token: torch.Tensor, k: int = 10, feature: torch.Tensor | None = None
                     ) -> list[tuple[str, float]]:
    """The k concepts whose prompt-ensembled features are closest to "a photo of S*" (cosine);
    `feature`: that prompt's normalised feature when already computed."""
    feat = (token_features(insp.backbone, token, [ALONE_TEMPLATE])[0] if feature is None else feature).float().cpu()
    sims = insp.bank.features.float() @ feat
    top = sims.topk(min(k, len(insp.bank.names)))
    return [(insp.bank.names[i], float(s)) for s, i in zip(top.values.tolist(), top.indices.tolist(), strict=True)]


def describe(insp: Session, token: torch.Tensor, k: int = 10, trained_only: bool | None = None,
             alone: torch.Tensor | None = None) -> TokenView:
    """Norm, nearest vocabulary tokens (the trained ones of a small model unless not `trained_only`;
    None: the session's choice) and nearest concepts of one pseudo-token (`alone`: the normalised
    feature of "a photo of S*" when already computed)."""
    norm = float(token.float().norm())
    return TokenView(norm, norm / token_norm(insp.backbone), insp.table.nearest(token, k, insp.allowed(trained_only)),
                     nearest_concepts(insp, token, k, alone))


@torch.inference_mode()
def describe_with_caption(insp: Session, token: torch.Tensor, caption: str, k: int = 10,
                          trained_only: bool | None = None) -> TokenView:
    """`describe`, with the caption's own feature (the text-only query) computed in the same text
    pass as "a photo of S*" and left in the query path's cache: at batch 1 a pass costs what
    reading the weights costs, so two rows cost about one."""
    retriever, backbone = insp.retriever, insp.backbone
    if retriever.texts.get(caption) is not None or retriever.query_backbone is not backbone:
        return describe(insp, token, k, trained_only)
    tokens = backbone.tokenize([normalize_prompt(ALONE_TEMPLATE), caption])
    feats = F.normalize(encode_tokens(backbone, tokens, token.to(backbone.device)).float(), dim=-1)
    retriever.texts.put(caption, feats[1])
    return describe(insp, token, k, trained_only, feats[0])


# ---------------------------------------------------------------------------------- rankings
def rank_features(insp: Session, features: torch.Tensor, k: int, exclude: Sequence[str] = ()
                  ) -> list[list[Hit]]:
    """Top-k gallery hits of each query row (one batched FAISS search)."""
    index = insp.retriever.index
    rows = index.search(features.float().cpu().numpy(), k, exclude_ids=list(exclude) or None)
    return [[Hit(r + 1, i, float(s), index.metadata.get(i, {})) for r, (i, s) in enumerate(row)] for row in rows]


def rank(insp: Session, token: torch.Tensor, caption: str | None, k: int = 10,
         exclude: Sequence[str] = ()) -> list[Hit]:
    """The gallery's top-k for "a photo of S* that {caption}" (S* alone for no caption)."""
    # the query path's backbone (bf16 copy under --precision bf16/auto): ranks exactly as a search does
    query = token_features(insp.retriever.query_backbone, token, [prompt(insp, caption)])
    return rank_features(insp, query, k, exclude)[0]


def overlap(a: Sequence[Hit], b: Sequence[Hit], k: int | None = None) -> float:
    """Fraction of the first k ids of `a` that are also in the first k of `b` (overlap@k)."""
    k = k or max(len(a), 1)
    ids = {h.id for h in b[:k]}
    return sum(1 for h in a[:k] if h.id in ids) / k


# ----------------------------------------------------------------------------- watching OTI
@dataclass
class OTIFrame:
    """One update of a watched OTI run: loss curves so far and the current S* described."""

    step: int
    steps: int
    losses: dict[str, list[float]]
    view: TokenView
    hits: list[Hit]
    token: torch.Tensor

    @property
    def done(self) -> bool:
        return self.step == self.steps


def watch_oti(insp: Session, image: Reference | Image.Image, caption: str | None, oti: OTIConfig, every: int = 10,
              k: int = 5, exclude: Sequence[str] = (), warm: bool = True) -> Iterator[OTIFrame]:
    """OTI of one image, a frame every `every` steps (and at step 0 and the last step).

    With `warm` and a phi, the run shown is the one the query path makes (warm-started from phi,
    `Retriever.oti_steps`: it ends with the very S* of a plain OTI query and leaves it in the
    cache), and a run from noise is optimised alongside as a second loss curve. Without, the run
    from noise is the one shown.
    """
    retriever = insp.retriever
    has_phi = retriever.phi is not None
    if warm and has_phi:
        runs = {WARM_CURVE: retriever.oti_steps(image, oti), COLD_CURVE: retriever.oti_steps(image, oti, warm=False)}
    else:  # without phi, the query path's own run starts from noise: that one (it fills the cache)
        runs = {COLD_CURVE: retriever.oti_steps(image, oti, warm=not has_phi)}
    losses: dict[str, list[float]] = {name: [] for name in runs}
    every = max(1, int(every))
    for states in zip(*runs.values(), strict=True):
        for name, state in zip(runs, states, strict=True):
            if state.step > 0:
                losses[name].append(float(state.loss))
        shown = states[0]
        if shown.step % every == 0 or shown.step == oti.steps:
            token = shown.token[0].detach().clone()
            yield OTIFrame(shown.step, oti.steps, {n: list(v) for n, v in losses.items()}, describe(insp, token),
                           rank(insp, token, caption, k, exclude), token)


# ---------------------------------------------------------------------------- phi vs OTI
@dataclass
class Comparison:
    """phi's and OTI's S* of one reference side by side."""

    cosine: float
    phi: TokenView
    oti: TokenView
    phi_hits: list[Hit]
    oti_hits: list[Hit]
    overlap: float


def pseudo_tokens(insp: Session, image: Reference | Image.Image, methods: Sequence[str], oti: OTIConfig,
                  warm: bool = True) -> dict[str, torch.Tensor]:
    """S* of an image per method ("phi", "oti"), through the query path's cache.

    `warm=False`: OTI from noise N(0, init_std) as in SEARLE, not warm-started from phi (not cached).
    """
    out = {}
    for m in methods:
        if m == "oti" and not warm and insp.retriever.phi is not None:
            last = deque(insp.retriever.oti_steps(image, oti, warm=False), maxlen=1)[0]
            out[m] = last.token[0].detach().clone()
        else:
            out[m] = insp.retriever.pseudo_token(image, m, oti)
    return out


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.float().flatten(), b.float().flatten(), dim=0))


def compare(insp: Session, image: Reference | Image.Image, caption: str | None, oti: OTIConfig, k: int = 10,
            exclude: Sequence[str] = ()) -> Comparison:
    """phi against OTI for one reference: cosine, descriptions, rankings and their overlap@k."""
    if insp.retriever.phi is None:
        raise BadRequest("no phi network is loaded for this backbone: phi and OTI cannot be compared")
    tokens = pseudo_tokens(insp, image, ("phi", "oti"), oti)
    hits = {m: rank(insp, t, caption, k, exclude) for m, t in tokens.items()}
    return Comparison(cosine(tokens["phi"], tokens["oti"]), describe(insp, tokens["phi"]),
                      describe(insp, tokens["oti"]), hits["phi"], hits["oti"], overlap(hits["phi"], hits["oti"], k))


# ---------------------------------------------------------------------------------- blending
def blend(a: torch.Tensor, b: torch.Tensor, alpha: float) -> torch.Tensor:
    """(1 - alpha) a + alpha b, rescaled to the interpolated norm (1 - alpha)|a| + alpha|b|.

    Mixing two directions shortens the plain average (down to 0 for opposite tokens), a norm no
    trained S* has; the rescaling keeps the blend between the two references' norms, and alpha 0
    and 1 give exactly a and b.
    """
    alpha = float(alpha)
    if not 0.0 <= alpha <= 1.0:
        raise BadRequest(f"the blend weight must be in [0, 1], not {alpha}")
    if alpha == 0.0:
        return a.clone()
    if alpha == 1.0:
        return b.clone()
    mix = (1 - alpha) * a.float() + alpha * b.float()
    target = (1 - alpha) * a.float().norm() + alpha * b.float().norm()
    return mix * (target / mix.norm().clamp_min(1e-12))


# ------------------------------------------------------------------------ which words mattered
@dataclass
class WordEffect:
    """What dropping one caption word does to the query.

    `change` is 1 - cos(query, query without the word); `top1_rank` the rank of the current top-1
    in the new ranking (None: beyond the depth searched); `overlap` the new top-k's overlap@k.
    """

    word: str
    position: int | None
    change: float
    top1_rank: int | None
    overlap: float




def drop_word(caption: str, word: str) -> str:
    """The caption without every standalone occurrence of `word` (case-insensitive); unchanged if absent."""
    kept = [w for w in caption.split() if w.lower() != word.lower()]
    return " ".join(kept)


def word_effects(insp: Session, token: torch.Tensor, caption: str, k: int = 10, exclude: Sequence[str] = (),
                 words: Sequence[str] | None = None, depth: int = 100) -> tuple[list[Hit], list[WordEffect]]:
    """(the query's top-k, each word's effect): caption words one at a time, or the given `words`.

    Without `words` each position of the caption is dropped in turn; a given word is dropped
    wherever it stands (one that is not in the caption leaves the query exactly as it is). All
    variants are encoded in one text-encoder pass and ranked in one batched search of `depth`.
    """
    caption = " ".join(caption.split())
    if not caption:
        raise BadRequest('the caption is empty: describe the change, e.g. "is blue instead"')
    parts = caption.split()
    if words:
        variants = [(w, None, drop_word(caption, w)) for w in words]
    else:
        variants = [(w, i, " ".join(parts[:i] + parts[i + 1:])) for i, w in enumerate(parts)]
    prompts = [prompt(insp, caption)] + [fill_template(insp.retriever.template, v) for _, _, v in variants]
    feats = token_features(insp.retriever.query_backbone, token, prompts)
    depth = max(k, min(depth, len(insp.retriever.index)))
    rankings = rank_features(insp, feats, depth, exclude)
    base = rankings[0][:k]
    top1 = base[0].id if base else None
    effects = []
    for (word, pos, _), feat, hits in zip(variants, feats[1:], rankings[1:], strict=True):
        where = next((h.rank for h in hits if h.id == top1), None)
        effects.append(WordEffect(word, pos, float(1 - (feat @ feats[0]).clamp(-1, 1)), where, overlap(base, hits, k)))
    return base, effects


# --------------------------------------------------------------------------- S* as a file
@dataclass
class PseudoWord:
    """A saved S* and what made it."""

    token: torch.Tensor
    metadata: dict[str, Any] = field(default_factory=dict)


def token_metadata(insp: Session, image: Reference | Image.Image, method: str, oti: OTIConfig) -> dict[str, Any]:
    """What made an image's S*: backbone, method, its settings (OTI config or phi), the image hash and,
    for a gallery item, its id. Files are named as `paths.public_name` shows them (no server paths)."""
    b = insp.backbone
    phi = public_name(insp.phi_name)
    settings: dict[str, Any] = asdict(oti) if method == "oti" else {"phi": phi}
    if method == "oti":
        settings["templates"] = len(oti.templates)
        settings["warm_start"] = "phi" if insp.retriever.phi is not None else None
        settings["phi"] = phi
    meta = {"model": b.name, "pretrained": public_name(b.pretrained) or "None", "method": method,
            "token_width": b.token_width, "image_hash": image_hash(image), "settings": settings}
    if isinstance(image, Reference) and image.item_id is not None:
        meta["reference_id"] = image.item_id
    return meta


def image_hash(image: Reference | Image.Image) -> str:
    """The content hash of a reference's pixels (a gallery item's too, whose cache key is its id)."""
    if isinstance(image, Reference) and image.item_id is None:
        return image.key
    return image_key(image.image if isinstance(image, Reference) else image)


def token_digest(token: torch.Tensor) -> str:
    """A short hash of S*'s float32 values: two runs made the same pseudo-word iff their digests agree."""
    return hashlib.blake2b(token.detach().float().cpu().contiguous().numpy().tobytes(), digest_size=8).hexdigest()


def save_token(path: str | Path, token: torch.Tensor, metadata: dict[str, Any]) -> Path:
    """S* as safetensors ("pseudo_word" [width]) with its metadata as JSON strings."""
    path = Path(path)
    meta = {"format": TOKEN_FORMAT, **{k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}}
    write_bytes(path, tensors_bytes({"pseudo_word": token.detach().float().cpu().contiguous()}, meta))
    return path


def load_token(path: str | Path, backbone: Backbone | None = None) -> PseudoWord:
    """A saved S*; with `backbone`, refused (ValueError, one line) unless it was made for that model."""
    path = Path(path)
    try:
        with safe_open(str(path), "pt") as f:
            raw = f.metadata() or {}
            token = f.get_tensor("pseudo_word")
    except Exception as err:  # safetensors raises several types for a damaged or foreign file
        raise BadRequest(f"{path.name} is not a pseudo-word file ({type(err).__name__}): "
                         "download one from the inspector or save one with isearle.explain.save_token") from None
    meta: dict[str, Any] = {}
    for key, value in raw.items():
        try:
            meta[key] = json.loads(value)
        except ValueError:
            meta[key] = value
    if token.dim() != 1:
        raise BadRequest(f"{path.name} holds a tensor of shape {tuple(token.shape)}, not one pseudo-word")
    if backbone is not None:
        made_for = (meta.get("model"), meta.get("pretrained"))
        if made_for != (backbone.name, public_name(backbone.pretrained) or "None") or token.shape[0] != backbone.token_width:
            raise BadRequest(f"{path.name} was made for {made_for[0]}/{made_for[1]} (width {token.shape[0]}), "
                             f"not {backbone.name}/{backbone.pretrained}: choose that backbone")
    return PseudoWord(token, meta)


# ------------------------------------------------------------------------ batch inspection
@dataclass
class ImageRecord:
    """One image of a batch inspection: its S* per method described, and phi-vs-OTI cosine."""

    path: str
    image_hash: str
    views: dict[str, TokenView]
    cosine: float | None = None
    thumbnail: Image.Image | None = None

    def as_dict(self) -> dict:
        return {"path": self.path, "image_hash": self.image_hash, "phi_oti_cosine": self.cosine,
                **{m: v.as_dict() for m, v in self.views.items()}}


def check_methods(insp: Session, methods: Sequence[str]) -> list[str]:
    """The methods of a batch inspection (phi, oti), deduplicated; BadRequest for an unknown or unavailable one."""
    methods = list(dict.fromkeys(methods))
    bad = [m for m in methods if m not in ("phi", "oti")]
    if bad or not methods:
        raise BadRequest(f"unknown method {bad[0] if bad else None!r}: use phi, oti or both")
    if "phi" in methods and insp.retriever.phi is None:
        raise BadRequest("no phi network for this backbone: pass --phi, or inspect with --method oti")
    return methods


def inspect_images(insp: Session, paths: Sequence[str | Path], methods: Sequence[str], oti: OTIConfig,
                   k: int = 10, warm: bool = True, thumbnail: int = 96, progress: bool = True) -> list[ImageRecord]:
    """Each image's S* by each method (OTI warm-started from phi unless not `warm`), described."""
    methods = check_methods(insp, methods)
    records = []
    for path in tqdm(list(paths), desc="inspect", disable=not progress):
        ref = insp.reference(path)
        tokens = pseudo_tokens(insp, ref, methods, oti, warm)
        thumb = ref.image.copy()
        thumb.thumbnail((thumbnail, thumbnail))
        cos = cosine(tokens["phi"], tokens["oti"]) if len(tokens) == 2 else None
        records.append(ImageRecord(str(path), ref.key, {m: describe(insp, t, k) for m, t in tokens.items()},
                                   cos, thumb))
    return records


def summarise(records: Sequence[ImageRecord]) -> dict[str, Any]:
    """Over a batch: per method the norms (mean, std, min, max), and the phi-vs-OTI cosines."""
    def stats(values: Sequence[float]) -> dict[str, float]:
        t = torch.tensor(list(values), dtype=torch.float64)
        if t.numel() == 0:
            return {}
        return {"n": int(t.numel()), "mean": float(t.mean()), "std": float(t.std(unbiased=False)),
                "min": float(t.min()), "max": float(t.max())}

    methods = list(dict.fromkeys(m for r in records for m in r.views))
    out: dict[str, Any] = {"images": len(records),
                           "norm": {m: stats([r.views[m].norm for r in records if m in r.views]) for m in methods},
                           "relative_norm": {m: stats([r.views[m].relative_norm for r in records if m in r.views])
                                             for m in methods}}
    cosines = [r.cosine for r in records if r.cosine is not None]
    if cosines:
        out["phi_oti_cosine"] = stats(cosines)
    return out
