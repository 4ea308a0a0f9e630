"""Composed queries: reference image + relative caption -> query feature -> ranked gallery.

`compose_queries` is the batched form used by the evaluation; `Retriever` is the cached
interactive path of the CLI and the demo: reference features and pseudo-words are kept by image
content hash (bounded LRU), so a new caption for a seen image costs one text-encoder pass and one
index search.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from isearle import onnx_text, prefix_cache
from isearle.backbone import Backbone
from isearle.errors import BadRequest
from isearle.oti import OTIConfig, OTIStep, invert_steps
from isearle.phi import Phi
from isearle.precision import PrecisionChoice
from isearle.pseudo_word import encode_with_pseudo_tokens, fill_template, normalize_prompt, tokenize_prompts
from isearle.reference import Reference, image_key
from isearle.templates import DEFAULT_TEMPLATE

log = logging.getLogger(__name__)

METHODS = ("image", "text", "image+text", "oti", "phi")


@torch.inference_mode()
def compose_queries(
    backbone: Backbone,
    method: str,
    ref_features: torch.Tensor,
    captions: Sequence[str],
    *,
    phi: Phi | None = None,
    pseudo_tokens: torch.Tensor | None = None,
    template: str = DEFAULT_TEMPLATE,
) -> torch.Tensor:
    """L2-normalised query features [N, D] for method in METHODS.

    image: the reference feature; text: the caption alone; image+text: the sum of both normalised
    features; oti / phi: the template with S* (given `pseudo_tokens`, or phi's prediction).
    """
    if method not in METHODS:
        raise BadRequest(f"unknown method {method!r}: use one of {', '.join(METHODS)}")
    ref = ref_features.to(backbone.device).float()
    if method == "image":
        return F.normalize(ref, dim=-1)
    if method in ("text", "image+text"):
        text = F.normalize(backbone.encode_texts(list(captions)), dim=-1)
        return text if method == "text" else F.normalize(text + F.normalize(ref, dim=-1), dim=-1)
    if method == "phi":
        if phi is None:
            raise BadRequest("method 'phi' needs a phi network (--phi)")
        pseudo_tokens = phi.to(backbone.device)(ref)
    if pseudo_tokens is None:
        raise BadRequest("method 'oti' needs the OTI pseudo-tokens of the references")
    prompts = [fill_template(template, c) for c in captions]
    return F.normalize(encode_with_pseudo_tokens(backbone, prompts, pseudo_tokens.to(backbone.device)), dim=-1)


def rank(index: Any, query: torch.Tensor, k: int = 10, exclude: Sequence[str] = ()) -> list[Hit]:
    """The top-k gallery hits of a normalised query feature [D], best first (ids in `exclude` left out)."""
    rows = index.search(query.float().cpu().numpy()[None], k, exclude_ids=list(exclude) or None)[0]
    return [Hit(r + 1, i, float(s), index.metadata.get(i, {})) for r, (i, s) in enumerate(rows)]


class LRUCache:
    """A bounded, thread-safe least-recently-used map (a cache, so module state it may hold)."""

    def __init__(self, size: int = 256) -> None:
        self.size, self._data, self._lock = size, OrderedDict(), threading.Lock()

    def get(self, key: Hashable) -> Any:
        with self._lock:
            if key not in self._data:
                return None
            self._data.move_to_end(key)
            return self._data[key]

    def put(self, key: Hashable, value: Any) -> None:
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            while len(self._data) > self.size:
                self._data.popitem(last=False)

    def pop(self, key: Hashable) -> None:
        with self._lock:
            self._data.pop(key, None)

    def __len__(self) -> int:
        return len(self._data)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()


@dataclass
class Hit:
    """One ranked gallery item."""

    rank: int
    id: str
    score: float
    metadata: dict


#: What the query path takes as a reference: a `Reference` (decoded and hashed once per request) or a
#: PIL image (hashed here).
ReferenceLike = Reference | Image.Image


class Retriever:
    """Cached composed retrieval over a gallery index (CLI `query` and the demo).

    Captions and pseudo-word prompts are encoded by `query_backbone`, new images by
    `image_backbone` (each the backbone itself, or its bf16 copy: `tuning.tune`); OTI always
    optimises with the fp32 `backbone`. A reference's prompt start ("<sot> a photo of S* that") is
    kept as keys/values (`prefix_cache.PromptPrefix`), so a new caption for it runs the text
    transformer on the caption's tokens only. Every cache is keyed by the reference's content key.
    """

    def __init__(self, backbone: Backbone, index: Any, phi: Phi | None = None,
                 template: str = DEFAULT_TEMPLATE, cache_size: int = 256, prefix_cache: bool = True) -> None:
        self.backbone, self.index, self.template = backbone, index, template
        self.prefix_cache = prefix_cache  # keep each reference's prompt start (False: the full pass each time)
        head = template.split("{}")[0] if "{}" in template else ""
        ids = backbone.tokenize([normalize_prompt(head)])[0] if prefix_cache and "$" in head else None
        #: token ids of the template's start up to its caption slot, "$" included (<sot> a photo of $ that);
        #: None where "$" follows the caption or the cache is off
        self.prompt_start = None if ids is None else ids[: int(ids.argmax())]
        self.query_backbone = self.image_backbone = backbone
        self.text_engine: onnx_text.OnnxText | None = None  # runs warm captions instead of PyTorch (tuning)
        self.engine_choice = ""
        self.precision: PrecisionChoice = PrecisionChoice("fp32", "fp32 (default)")  # of the text pass
        self.image_precision: PrecisionChoice = PrecisionChoice("fp32", "fp32 (default)")
        self.phi = phi.to(backbone.device).eval() if phi is not None else None
        self.features = LRUCache(cache_size)  # image key -> un-normalised image feature [D]
        self.tokens = LRUCache(cache_size)  # (image key, method, steps) -> pseudo-token [W]
        self.texts = LRUCache(4 * cache_size)  # caption -> normalised text feature [D]
        self.queries = LRUCache(4 * cache_size)  # (image key, method, steps, caption) -> query feature [D]
        self.prefixes = LRUCache(cache_size)  # (image key, method, steps) -> PromptPrefix of its S*

    def clear(self) -> None:
        """Forget every cached value (after the query path changed precision or engine)."""
        for cache in (self.features, self.tokens, self.texts, self.queries, self.prefixes):
            cache.clear()

    def precision_report(self) -> str:
        """What the query path runs in, per tower, and why (the app's /info)."""
        text = str(self.precision)
        if self.engine_choice and self.text_engine is None:
            text += f"; warm captions on {self.engine_choice}"
        if text == str(self.image_precision):
            return text
        return f"text {text}; images {self.image_precision}"

    @staticmethod
    def reference(image: ReferenceLike) -> Reference:
        """`image` as a `Reference` (a PIL image is hashed here: once per call of the query path)."""
        return image if isinstance(image, Reference) else Reference(image, image_key(image))

    def image_features(self, image: ReferenceLike) -> tuple[str, torch.Tensor]:
        """(content key, un-normalised image feature [D]) of a reference, cached."""
        ref = self.reference(image)
        feats = self.features.get(ref.key)
        if feats is None:
            feats = self.image_backbone.encode_pil([ref.image])[0]
            self.features.put(ref.key, feats)
        return ref.key, feats

    def pseudo_token(self, image: ReferenceLike, method: str = "phi", oti: OTIConfig | None = None,
                     progress: bool = False) -> torch.Tensor:
        """S* of a reference by phi or OTI (warm-started from phi when there is one), cached."""
        ref = self.reference(image)
        oti = oti or OTIConfig(batch_size=1)
        token = self.tokens.get(self._token_key(ref.key, method, oti))
        if token is not None:
            return token
        if method == "phi":
            token = self.phi_token(ref)
            if token is None:
                raise BadRequest("no phi network is loaded: choose OTI or load a phi checkpoint")
            self.tokens.put(self._token_key(ref.key, method, oti), token)
        elif method == "oti":
            with tqdm(total=oti.steps, desc="OTI", leave=False, disable=not progress) as bar:
                for state in self.oti_steps(ref, oti):  # step 0 (the start) is no step: the bar counts `steps`
                    token = state.token
                    bar.update(1 if state.step > 0 else 0)
            token = token[0].detach()  # oti_steps cached it
        else:
            raise BadRequest(f"no pseudo-word for method {method!r}")
        return token

    @staticmethod
    def _token_key(key: str, method: str, oti: OTIConfig | None) -> tuple[str, str, int]:
        """Cache key of a pseudo-token: one per image, method and (for OTI) step count."""
        return key, method, ((oti or OTIConfig(batch_size=1)).steps if method == "oti" else 0)

    def cached(self, image: ReferenceLike | None, caption: str, method: str = "phi", oti: OTIConfig | None = None) -> str:
        """What a query would reuse: "query" (its feature), "reference" (the image's S*) or ""."""
        key = self.reference(image).key if image is not None else ""
        if self.queries.get(self._token_key(key, method, oti) + (caption,)) is not None:
            return "query"
        if image is not None and self.tokens.get(self._token_key(key, method, oti)) is not None:
            return "reference"
        return ""

    @torch.inference_mode()
    def phi_token(self, image: ReferenceLike) -> torch.Tensor | None:
        """phi's S* [token_width] of a reference, None when no phi is loaded."""
        if self.phi is None:
            return None
        return self.phi(self.image_features(image)[1][None])[0]

    def oti_steps(self, image: ReferenceLike, oti: OTIConfig | None = None, warm: bool = True) -> Iterator[OTIStep]:
        """OTI of one reference step by step (`oti.invert_steps`), warm-started from phi when there is one.

        The run `pseudo_token` does, watchable: a warm run that is consumed to its end leaves its
        S* in the cache, so the next query with these settings reuses it. `warm=False` starts from
        N(0, init_std) instead (a run for comparison, not cached).
        """
        ref = self.reference(image)
        key, feats = self.image_features(ref)
        oti = oti or OTIConfig(batch_size=1)
        init = self.phi_token(ref) if warm else None
        init = None if init is None else init[None].clone()
        with torch.inference_mode(False):
            feats = feats[None].clone()
        state = None
        for state in invert_steps(self.backbone, feats, oti, init=init):
            yield state
        if warm and state is not None:
            self.tokens.put(self._token_key(key, "oti", oti), state.token[0].detach().clone())
            self.prefixes.pop(self._token_key(key, "oti", oti))  # it held the previous S*

    def text_feature(self, caption: str) -> torch.Tensor:
        """The normalised feature [D] of a caption alone (the "text" method), cached."""
        feat = self.texts.get(caption)
        if feat is None:
            feat = F.normalize(self.query_backbone.encode_texts([caption]), dim=-1)[0]
            self.texts.put(caption, feat)
        return feat

    @torch.inference_mode()
    def query_feature(self, image: ReferenceLike | None, caption: str, method: str = "phi",
                      oti: OTIConfig | None = None, progress: bool = False) -> torch.Tensor:
        """The normalised query feature [D] of one (reference, caption) pair (cached: a repeat skips the encoders)."""
        if method == "text":
            return self.text_feature(caption)
        if image is None:
            raise BadRequest("this method needs a reference image")
        ref = self.reference(image)  # hashed at most once per query
        qkey = self._token_key(ref.key, method, oti) + (caption,)
        feature = self.queries.get(qkey)
        if feature is None:
            feature = self._compose(ref, caption, method, oti, progress)
            self.queries.put(qkey, feature)
        return feature

    def _compose(self, ref: Reference, caption: str, method: str, oti: OTIConfig | None,
                 progress: bool) -> torch.Tensor:
        _, feats = self.image_features(ref)
        if method == "image":
            return F.normalize(feats, dim=-1)
        if method == "image+text":
            return F.normalize(F.normalize(feats, dim=-1) + self.text_feature(caption), dim=-1)
        token = self.pseudo_token(ref, method, oti, progress)
        return F.normalize(self.prompt_feature(self._token_key(ref.key, method, oti), token, caption), dim=-1)

    def prompt_feature(self, token_key: Hashable, token: torch.Tensor, caption: str) -> torch.Tensor:
        """Un-normalised feature [D] of the template with S* = `token` and `caption`: the caption's
        tokens run on the cached keys/values of the prompt's start (the full pass where the model or
        the template does not allow it; same feature up to fp32 rounding)."""
        qb = self.query_backbone
        prompt = fill_template(self.template, caption)
        tokens = tokenize_prompts(qb, [prompt])
        prefix = self.prefixes.get(token_key)
        with qb.autocast:
            feature = prefix.encode(tokens, self.text_engine) if prefix is not None else None
            if feature is None and self.prompt_start is not None and prefix_cache.supported(qb):
                # the reference's first query: one full pass that keeps the prompt's start
                feature, prefix = prefix_cache.PromptPrefix.first(qb, tokens, token, self.prompt_start)
                if prefix is not None:
                    self.prefixes.put(token_key, prefix)
            if feature is None:
                return encode_with_pseudo_tokens(qb, [prompt], token)[0]
        return feature.float()[0]

    def search(self, query: torch.Tensor, k: int = 10, exclude: Sequence[str] = ()) -> list[Hit]:
        return rank(self.index, query, k, exclude)

    def query(self, image: ReferenceLike | None, caption: str, k: int = 10, method: str = "phi",
              oti: OTIConfig | None = None, exclude: Sequence[str] = (), progress: bool = False) -> list[Hit]:
        """Top-k gallery hits for a composed query."""
        return self.search(self.query_feature(image, caption, method, oti, progress), k, exclude)

    def warm_up(self, make_image: Callable[[], Image.Image] | None = None) -> None:
        """Run one query of each kind so the first user request does not pay for lazy init."""
        image = make_image() if make_image else Image.new("RGB", (self.backbone.image_size,) * 2, "gray")
        method = "phi" if self.phi is not None else "image+text"
        self.query(image, "is blue", k=1, method=method)
