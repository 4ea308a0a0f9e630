"""Composed queries: reference image + relative caption -> query feature -> ranked gallery.

`compose_queries` is the batched form used by the evaluation; `Retriever` is the cached
interactive path of the CLI and the demo: reference features and pseudo-words are kept by image
content hash (bounded LRU), so a new caption for a seen image costs one text-encoder pass and one
index search.
"""

from __future__ import annotations

import hashlib
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
from isearle.oti import OTIConfig, OTIStep, invert_steps
from isearle.phi import Phi
from isearle.precision import MIN_COSINE, PrecisionChoice, bf16_native, choose, median_ms
from isearle.pseudo_word import encode_with_pseudo_tokens, fill_template, normalize_prompt, tokenize_prompts

log = logging.getLogger(__name__)

METHODS = ("image", "text", "image+text", "oti", "phi")
DEFAULT_TEMPLATE = "a photo of $ that {}"


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
        raise ValueError(f"unknown method {method!r}: use one of {', '.join(METHODS)}")
    ref = ref_features.to(backbone.device).float()
    if method == "image":
        return F.normalize(ref, dim=-1)
    if method in ("text", "image+text"):
        text = F.normalize(backbone.encode_texts(list(captions)), dim=-1)
        return text if method == "text" else F.normalize(text + F.normalize(ref, dim=-1), dim=-1)
    if method == "phi":
        if phi is None:
            raise ValueError("method 'phi' needs a phi network (--phi)")
        pseudo_tokens = phi.to(backbone.device)(ref)
    if pseudo_tokens is None:
        raise ValueError("method 'oti' needs the OTI pseudo-tokens of the references")
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


def image_key(image: Image.Image) -> str:
    """Content hash of an image's pixels (same picture, same key, whatever its file name)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{image.mode}{image.size}".encode())
    h.update(image.tobytes())
    return h.hexdigest()


@dataclass
class Hit:
    """One ranked gallery item."""

    rank: int
    id: str
    score: float
    metadata: dict


class Retriever:
    """Cached composed retrieval over a gallery index (CLI `query` and the demo).

    Captions and pseudo-word prompts are encoded by `query_backbone`, new images by
    `image_backbone` (each the backbone itself, or its bf16 copy after `set_precision`); OTI
    always optimises with the fp32 `backbone`. A reference's prompt start ("<sot> a photo of S*
    that") is kept as keys/values (`prefix_cache.PromptPrefix`), so a new caption for it runs the
    text transformer on the caption's tokens only.
    """

    def __init__(self, backbone: Backbone, index: Any, phi: Phi | None = None,
                 template: str = DEFAULT_TEMPLATE, cache_size: int = 256, precision: str = "fp32",
                 prefix_cache: bool = True) -> None:
        self.backbone, self.index, self.template = backbone, index, template
        self.prefix_cache = prefix_cache  # keep each reference's prompt start (False: the full pass each time)
        head = template.split("{}")[0] if "{}" in template else ""
        ids = backbone.tokenize([normalize_prompt(head)])[0] if prefix_cache and "$" in head else None
        #: token ids of the template's start up to its caption slot, "$" included (<sot> a photo of $ that);
        #: None where "$" follows the caption or the cache is off
        self.prompt_start = None if ids is None else ids[: int(ids.argmax())]
        self.query_backbone = self.image_backbone = backbone
        self.text_engine: onnx_text.OnnxText | None = None  # runs warm captions instead of PyTorch (set_precision)
        self.engine_choice = ""
        self.precision: PrecisionChoice = PrecisionChoice("fp32", "fp32 (default)")  # of the text pass
        self.image_precision: PrecisionChoice = PrecisionChoice("fp32", "fp32 (default)")
        self.phi = phi.to(backbone.device).eval() if phi is not None else None
        self.features = LRUCache(cache_size)  # image key -> un-normalised image feature [D]
        self.tokens = LRUCache(cache_size)  # (image key, method, steps) -> pseudo-token [W]
        self.texts = LRUCache(4 * cache_size)  # caption -> normalised text feature [D]
        self.queries = LRUCache(4 * cache_size)  # (image key, method, steps, caption) -> query feature [D]
        self.prefixes = LRUCache(cache_size)  # (image key, method, steps) -> PromptPrefix of its S*
        if precision != "fp32":
            self.set_precision(precision)

    def set_precision(self, requested: str, image: Image.Image | None = None) -> PrecisionChoice:
        """Encode queries in fp32 or bf16; "auto" measures both (`precision.choose`) for each tower.

        The text tower is measured on the warm path (the template with the reference's S*, phi's or
        the token of "thing" without phi, and a caption: one truncated pass), the image tower on
        a new upload; each keeps bf16 only where it is faster and agrees. Returns the text choice.
        """
        low: list[Backbone] = []

        def in_precision(p: str) -> Backbone:
            if p == "fp32":
                return self.backbone
            if not low:
                low.append(self.backbone.with_precision(p))
            return low[0]

        def encode_text(p: str) -> torch.Tensor:
            return encode_with_pseudo_tokens(in_precision(p), [prompt], token)

        def encode_image(p: str) -> torch.Tensor:
            return in_precision(p).encode_pil([image])

        native = bf16_native(self.backbone.device)
        with torch.inference_mode():
            if requested == "auto":
                image = image or Image.new("RGB", (self.backbone.image_size,) * 2, "gray")
                feats = self.backbone.encode_pil([image])
                token = (self.phi(feats)[0] if self.phi is not None else
                         self.backbone.token_embedding(self.backbone.tokenize(["thing"])[0, 1]))
                prompt = fill_template(self.template, "is blue and twice as big")
            text = choose(requested, encode_text, native)
            images = choose(requested, encode_image, native)
        self.query_backbone, self.image_backbone = in_precision(text.precision), in_precision(images.precision)
        self.precision, self.image_precision = text, images
        self.text_engine, self.engine_choice = None, ""
        if requested == "auto" and self.prefix_cache and onnx_text.available(self.backbone):
            try:
                engine = onnx_text.OnnxText(self.backbone)  # exported outside inference mode
            except Exception as e:  # an exporter or runtime that fails here must not stop the service
                self.engine_choice = f"PyTorch (ONNX Runtime unavailable: {type(e).__name__})"
                log.warning("ONNX Runtime export failed, text stays on PyTorch: %s", e)
            else:
                with torch.inference_mode():
                    self._choose_text_engine(token, engine)
        for cache in (self.features, self.tokens, self.texts, self.queries, self.prefixes):  # of the other precision
            cache.clear()
        return text

    def _choose_text_engine(self, token: torch.Tensor, engine: onnx_text.OnnxText, repeat: int = 7) -> None:
        """Keep ONNX Runtime for the warm text pass if it is faster than the chosen PyTorch path and
        agrees with PyTorch's fp32 feature (cosine >= MIN_COSINE). Both are timed interleaved on a
        continuation of the template's prompt start, after one untimed call each, each call after a
        50 ms pause as between requests (the threads of one still spinning after its call would
        otherwise slow the other's: measured 18.9 -> 38.8 ms for PyTorch right after ONNX Runtime)."""
        first = tokenize_prompts(self.backbone, [fill_template(self.template, "is blue")])
        later = tokenize_prompts(self.backbone, [fill_template(self.template, "is blue and twice as big")])
        qb, ids = self.query_backbone, self.prompt_start
        if ids is None:
            return
        _, exact = prefix_cache.PromptPrefix.first(self.backbone, first, token, ids)
        with qb.autocast:
            _, current = prefix_cache.PromptPrefix.first(qb, first, token, ids)
        if exact is None or current is None:
            return
        sides = {"torch": lambda: self._encode_on(qb, current, later), "onnx": lambda: exact.encode(later, engine)}
        ref, got = exact.encode(later).float(), sides["onnx"]().float()
        cosine = float(F.cosine_similarity(ref.flatten(), got.flatten(), dim=0))
        ms = median_ms(sides, repeat, pause=0.05)
        torch_ms, onnx_ms = ms["torch"], ms["onnx"]
        measured = f"PyTorch {'bf16' if qb.precision == 'bf16' else 'fp32'} {torch_ms:.1f} ms, ONNX Runtime {onnx_ms:.1f} ms, cosine {cosine:.6f}"
        if cosine >= MIN_COSINE and onnx_ms < torch_ms:
            self.text_engine, self.query_backbone = engine, self.backbone  # ONNX continues fp32 prefixes
            self.engine_choice = f"ONNX Runtime fp32 (auto: faster and agrees; {measured})"
            self.precision = PrecisionChoice("fp32", f"fp32, warm captions on {self.engine_choice}; "
                                             f"PyTorch alone: {self.precision}",
                                             self.precision.fp32_ms, self.precision.bf16_ms, self.precision.cosine)
        else:
            self.engine_choice = f"PyTorch (auto: ONNX Runtime {'disagrees' if cosine < MIN_COSINE else 'is not faster'}; {measured})"
        log.info("warm text pass: %s", self.engine_choice)

    @staticmethod
    def _encode_on(qb: Backbone, prefix: prefix_cache.PromptPrefix, tokens: torch.Tensor) -> torch.Tensor:
        with qb.autocast:
            return prefix.encode(tokens)

    def precision_report(self) -> str:
        """What the query path runs in, per tower, and why (the app's /info)."""
        text = str(self.precision)
        if self.engine_choice and self.text_engine is None:
            text += f"; warm captions on {self.engine_choice}"
        if text == str(self.image_precision):
            return text
        return f"text {text}; images {self.image_precision}"

    def image_features(self, image: Image.Image, key: str | None = None) -> tuple[str, torch.Tensor]:
        """(content key, un-normalised image feature [D]) of an image, cached; `key` if already hashed."""
        key = key or image_key(image)
        feats = self.features.get(key)
        if feats is None:
            feats = self.image_backbone.encode_pil([image])[0]
            self.features.put(key, feats)
        return key, feats

    def pseudo_token(self, image: Image.Image, method: str = "phi", oti: OTIConfig | None = None,
                     progress: bool = False, key: str | None = None) -> torch.Tensor:
        """S* of an image by phi or OTI (warm-started from phi when there is one), cached."""
        key, _ = self.image_features(image, key)
        oti = oti or OTIConfig(batch_size=1)
        token = self.tokens.get(self._token_key(key, method, oti))
        if token is not None:
            return token
        if method == "phi":
            token = self.phi_token(image, key)
            if token is None:
                raise ValueError("no phi network is loaded: choose OTI or load a phi checkpoint")
            self.tokens.put(self._token_key(key, method, oti), token)
        elif method == "oti":
            for state in tqdm(self.oti_steps(image, oti, key=key), total=oti.steps + 1, desc="OTI", leave=False,
                              disable=not progress):
                token = state.token
            token = token[0].detach()  # oti_steps cached it
        else:
            raise ValueError(f"no pseudo-word for method {method!r}")
        return token

    @staticmethod
    def _token_key(key: str, method: str, oti: OTIConfig | None) -> tuple[str, str, int]:
        """Cache key of a pseudo-token: one per image, method and (for OTI) step count."""
        return key, method, ((oti or OTIConfig(batch_size=1)).steps if method == "oti" else 0)

    def cached(self, image: Image.Image | None, caption: str, method: str = "phi",
               oti: OTIConfig | None = None) -> str:
        """What a query would reuse: "query" (its feature), "reference" (the image's S*) or ""."""
        key = image_key(image) if image is not None else ""
        if self.queries.get(self._token_key(key, method, oti) + (caption,)) is not None:
            return "query"
        if image is not None and self.tokens.get(self._token_key(key, method, oti)) is not None:
            return "reference"
        return ""

    @torch.inference_mode()
    def phi_token(self, image: Image.Image, key: str | None = None) -> torch.Tensor | None:
        """phi's S* [token_width] of an image, None when no phi is loaded."""
        if self.phi is None:
            return None
        return self.phi(self.image_features(image, key)[1][None])[0]

    def oti_steps(self, image: Image.Image, oti: OTIConfig | None = None, warm: bool = True,
                  key: str | None = None) -> Iterator[OTIStep]:
        """OTI of one image step by step (`oti.invert_steps`), warm-started from phi when there is one.

        The run `pseudo_token` does, watchable: a warm run that is consumed to its end leaves its
        S* in the cache, so the next query with these settings reuses it. `warm=False` starts from
        N(0, init_std) instead (a run for comparison, not cached).
        """
        key, feats = self.image_features(image, key)
        oti = oti or OTIConfig(batch_size=1)
        init = self.phi_token(image, key) if warm else None
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
        feat = self.texts.get(caption)
        if feat is None:
            feat = F.normalize(self.query_backbone.encode_texts([caption]), dim=-1)[0]
            self.texts.put(caption, feat)
        return feat

    @torch.inference_mode()
    def query_feature(self, image: Image.Image | None, caption: str, method: str = "phi",
                      oti: OTIConfig | None = None, progress: bool = False) -> torch.Tensor:
        """The normalised query feature [D] of one (reference, caption) pair (cached: a repeat skips the encoders)."""
        if method == "text":
            return self.text_feature(caption)
        if image is None:
            raise ValueError("this method needs a reference image")
        key = image_key(image)  # hashed once per query
        qkey = self._token_key(key, method, oti) + (caption,)
        feature = self.queries.get(qkey)
        if feature is None:
            feature = self._compose(image, key, caption, method, oti, progress)
            self.queries.put(qkey, feature)
        return feature

    def _compose(self, image: Image.Image, key: str, caption: str, method: str, oti: OTIConfig | None,
                 progress: bool) -> torch.Tensor:
        _, feats = self.image_features(image, key)
        if method == "image":
            return F.normalize(feats, dim=-1)
        if method == "image+text":
            return F.normalize(F.normalize(feats, dim=-1) + self.text_feature(caption), dim=-1)
        token = self.pseudo_token(image, method, oti, progress, key)
        return F.normalize(self.prompt_feature(self._token_key(key, method, oti), token, caption), dim=-1)

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

    def query(self, image: Image.Image | None, caption: str, k: int = 10, method: str = "phi",
              oti: OTIConfig | None = None, exclude: Sequence[str] = (), progress: bool = False) -> list[Hit]:
        """Top-k gallery hits for a composed query."""
        return self.search(self.query_feature(image, caption, method, oti, progress), k, exclude)

    def warm_up(self, make_image: Callable[[], Image.Image] | None = None) -> None:
        """Run one query of each kind so the first user request does not pay for lazy init."""
        image = make_image() if make_image else Image.new("RGB", (self.backbone.image_size,) * 2, "gray")
        method = "phi" if self.phi is not None else "image+text"
        self.query(image, "is blue", k=1, method=method)
