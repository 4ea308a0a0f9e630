"""The relative caption of a query, checked: cleaned as the tokenizer reads it, cut to the model's
context with a note, words outside a small model's trained vocabulary named; `CaptionError` (one
line) for an empty caption or one holding the placeholder "$".
"""

from __future__ import annotations

import functools
import html
import re
import unicodedata
from dataclasses import dataclass, field
from typing import Any

from isearle.backbone import Backbone
from isearle.errors import IsearleError
from isearle.pseudo_word import fill_template, normalize_prompt, truncated
from isearle.templates import DEFAULT_TEMPLATE

MAX_CAPTION_CHARS = 1000  # longer input is cut before tokenising (the context is far shorter anyway)


class CaptionError(IsearleError, ValueError):
    """The caption cannot be used; the message says why in one line."""


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def clean_caption(text: str | None) -> str:
    """The caption as the tokenizer will read it: HTML entities decoded, NFKC, no control characters."""
    text = text or ""
    text = "".join(ch for ch in text if not 0xD800 <= ord(ch) <= 0xDFFF)  # lone surrogates
    text = html.unescape(html.unescape(text))  # what open_clip's basic_clean does: "&#36;" is "$"
    text = unicodedata.normalize("NFKC", text)  # full-width "＄" becomes "$"
    return " ".join(_CONTROL.sub(" ", text).split())


@dataclass
class PreparedCaption:
    """A checked caption: what the user wrote (cleaned), the prompt, the part the model reads, notes."""

    caption: str
    prompt: str
    used: str
    notes: list[str] = field(default_factory=list)
    cut: bool = False


def prepare_caption(backbone: Backbone, caption: str | None, template: str = DEFAULT_TEMPLATE,
                    known_ids: set[int] | None = None) -> PreparedCaption:
    """Check and clean a relative caption; `CaptionError` for an empty one or one holding "$"."""
    text = clean_caption(caption)
    notes: list[str] = []
    if not text:
        raise CaptionError('the caption is empty: describe the change, e.g. "is blue instead"')
    if len(text) > MAX_CAPTION_CHARS:
        text = text[:MAX_CAPTION_CHARS].rsplit(" ", 1)[0]
        notes.append(f"the caption was cut to its first {MAX_CAPTION_CHARS} characters")
    try:
        prompt = fill_template(template, text)
    except ValueError as err:
        raise CaptionError(str(err)) from err
    used, cut = prompt, False
    if truncated(backbone, prompt):
        keep = backbone.context_length - 2
        ids = backbone.tokenizer.encode(normalize_prompt(prompt))[:keep]
        used, cut = backbone.tokenizer.decode(ids).strip(), True
        tail = " ".join(used.split()[-8:])
        notes.append(f"the caption is longer than the model's context ({backbone.context_length} tokens): "
                     f"it was cut at the context length, after “…{tail}”")
    if known_ids is not None:
        unknown = [w for w in dict.fromkeys(text.split()) if not set(_encode(backbone, w)) <= known_ids]
        if unknown:
            shown = ", ".join(f"“{w}”" for w in unknown[:6]) + (" …" if len(unknown) > 6 else "")
            notes.append(f"not in the vocabulary this model was trained on: {shown}")
    return PreparedCaption(text, prompt, used, notes, cut)


def _encode(backbone: Backbone, text: str) -> tuple[int, ...]:
    """Token ids of one word, remembered per tokenizer (captions repeat words; a tokenizer call is not free)."""
    return _encode_word(backbone.tokenizer, text) if hasattr(backbone.tokenizer, "encode") else \
        tuple(backbone.tokenize([text])[0].tolist())


@functools.lru_cache(maxsize=8192)
def _encode_word(tokenizer: Any, word: str) -> tuple[int, ...]:
    return tuple(tokenizer.encode(word))
