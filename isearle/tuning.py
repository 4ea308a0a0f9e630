"""Query-path tuning, run once per loaded model by `service.load_service`: `--precision` per tower
and the engine of the warm text pass.

`auto` measures fp32 against bf16 (where the CPU computes bf16 natively) for the text pass and for
the image encoder separately, keeping bf16 for each only where it is faster and agrees with fp32
(cosine >= `precision.MIN_COSINE`); then, where onnxruntime is installed, it times the warm text
pass (a caption after the cached prompt start) on ONNX Runtime against PyTorch and keeps the faster
one if they agree. The ONNX graph is exported once per weights and kept on disk
(`onnx_text.OnnxText`, keyed by `keys.cache_key`), so a second start does not export it again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F
from PIL import Image

from isearle import onnx_text, prefix_cache
from isearle.backbone import Backbone
from isearle.precision import MIN_COSINE, PRECISIONS, PrecisionChoice, bf16_native
from isearle.pseudo_word import encode_with_pseudo_tokens, fill_template, tokenize_prompts
from isearle.retrieval import Retriever
from isearle.timing import median_ms

log = logging.getLogger(__name__)

#: Seconds between timed calls, as between a served app's requests (spinning worker threads of one
#: side after its call would otherwise slow the other's, e.g. PyTorch right after ONNX Runtime).
PAUSE = 0.05


def choose(requested: str, encode: Callable[[str], torch.Tensor], native: bool, repeat: int = 7,
           min_cosine: float = MIN_COSINE) -> PrecisionChoice:
    """Resolve `requested` ("auto", "fp32", "bf16") with `encode(precision) -> feature`.

    "auto" times both precisions interleaved (fp32, bf16, fp32, ...) on the same query after one
    untimed call each, and keeps bf16 only if its median is lower and cos(bf16, fp32) >= min_cosine.
    """
    if requested not in PRECISIONS:
        raise ValueError(f"unknown precision {requested!r}: use one of {', '.join(PRECISIONS)}")
    if requested != "auto":
        return PrecisionChoice(requested, f"{requested} (asked for)")
    if not native:
        return PrecisionChoice("fp32", "fp32 (auto: no native bf16 on this device)")
    ref, low = encode("fp32").float(), encode("bf16").float()  # also warms both paths up
    cosine = float(F.cosine_similarity(ref.flatten(), low.flatten(), dim=0))
    ms = median_ms({p: lambda p=p: encode(p) for p in ("fp32", "bf16")}, repeat)
    fp32_ms, bf16_ms = ms["fp32"], ms["bf16"]
    measured = f"fp32 {fp32_ms:.1f} ms, bf16 {bf16_ms:.1f} ms, cosine {cosine:.5f}"
    if cosine < min_cosine:
        pick, why = "fp32", f"bf16 disagrees with fp32 (cosine < {min_cosine})"
    elif bf16_ms >= fp32_ms:
        pick, why = "fp32", "bf16 is not faster"
    else:
        pick, why = "bf16", "bf16 is faster and agrees"
    choice = PrecisionChoice(pick, f"{pick} (auto: {why}; {measured})", fp32_ms, bf16_ms, cosine)
    log.info("precision: %s", choice)
    return choice


def tune(retriever: Retriever, requested: str, image: Image.Image | None = None) -> PrecisionChoice:
    """Encode `retriever`'s queries in fp32 or bf16; "auto" measures both (`choose`) for each tower.

    The text tower is measured on the warm path (the template with the reference's S*, phi's or
    the token of "thing" without phi, and a caption: one truncated pass), the image tower on a new
    upload (`image`, or a grey square); then ONNX Runtime for warm captions where it is available.
    Empties the retriever's caches (they hold the other precision's values). Returns the text choice.
    """
    base = retriever.backbone
    low: list[Backbone] = []

    def in_precision(p: str) -> Backbone:
        if p == "fp32":
            return base
        if not low:
            low.append(base.with_precision(p))
        return low[0]

    token, prompt = None, fill_template(retriever.template, "is blue and twice as big")
    with torch.inference_mode():
        if requested == "auto":
            image = image or Image.new("RGB", (base.image_size,) * 2, "gray")
            feats = base.encode_pil([image])
            token = (retriever.phi(feats)[0] if retriever.phi is not None else
                     base.token_embedding(base.tokenize(["thing"])[0, 1]))
        text = choose(requested, lambda p: encode_with_pseudo_tokens(in_precision(p), [prompt], token), bf16_native(base.device))
        images = choose(requested, lambda p: in_precision(p).encode_pil([image]), bf16_native(base.device))
    retriever.query_backbone, retriever.image_backbone = in_precision(text.precision), in_precision(images.precision)
    retriever.precision, retriever.image_precision = text, images
    retriever.text_engine, retriever.engine_choice = None, ""
    if requested == "auto" and retriever.prompt_start is not None and onnx_text.available(base):
        try:
            engine = onnx_text.OnnxText(base)  # exported (or read from disk) outside inference mode
        except Exception as e:  # an exporter or runtime that fails here must not stop the service
            retriever.engine_choice = f"PyTorch (ONNX Runtime unavailable: {type(e).__name__})"
            log.warning("ONNX Runtime export failed, text stays on PyTorch: %s", e)
        else:
            with torch.inference_mode():
                choose_text_engine(retriever, token, engine)
    retriever.clear()
    return text


def choose_text_engine(retriever: Retriever, token: torch.Tensor, engine: onnx_text.OnnxText,
                       repeat: int = 7) -> None:
    """Keep ONNX Runtime for the warm text pass if it is faster than the chosen PyTorch path and
    agrees with PyTorch's fp32 feature (cosine >= MIN_COSINE). Both are timed interleaved on a
    continuation of the template's prompt start, after one untimed call each, `PAUSE` apart."""
    base, qb, ids = retriever.backbone, retriever.query_backbone, retriever.prompt_start
    first = tokenize_prompts(base, [fill_template(retriever.template, "is blue")])
    later = tokenize_prompts(base, [fill_template(retriever.template, "is blue and twice as big")])
    _, exact = prefix_cache.PromptPrefix.first(base, first, token, ids)
    with qb.autocast:
        _, current = prefix_cache.PromptPrefix.first(qb, first, token, ids)
    if exact is None or current is None:
        return

    def on_torch() -> torch.Tensor:
        with qb.autocast:
            return current.encode(later)

    sides = {"torch": on_torch, "onnx": lambda: exact.encode(later, engine)}
    ref, got = exact.encode(later).float(), sides["onnx"]().float()
    cosine = float(F.cosine_similarity(ref.flatten(), got.flatten(), dim=0))
    ms = median_ms(sides, repeat, pause=PAUSE)
    torch_ms, onnx_ms = ms["torch"], ms["onnx"]
    measured = (f"PyTorch {'bf16' if qb.precision == 'bf16' else 'fp32'} {torch_ms:.1f} ms, "
                f"ONNX Runtime {onnx_ms:.1f} ms, cosine {cosine:.6f}")
    if cosine >= MIN_COSINE and onnx_ms < torch_ms:
        retriever.text_engine, retriever.query_backbone = engine, base  # ONNX continues fp32 prefixes
        retriever.engine_choice = f"ONNX Runtime fp32 (auto: faster and agrees; {measured})"
        p = retriever.precision
        retriever.precision = PrecisionChoice("fp32", f"fp32, warm captions on {retriever.engine_choice}; "
                                              f"PyTorch alone: {p}", p.fp32_ms, p.bf16_ms, p.cosine)
    else:
        why = "disagrees" if cosine < MIN_COSINE else "is not faster"
        retriever.engine_choice = f"PyTorch (auto: ONNX Runtime {why}; {measured})"
    log.info("warm text pass: %s", retriever.engine_choice)
