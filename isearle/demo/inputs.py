"""Checking what a user gives the demo: the reference image (upload) and the relative caption.

Bad input raises `BadImage` / `CaptionError` with a one-line reason; conversions (transparency,
16-bit, EXIF turns, animation) and cut captions come back as notes to show.
"""

from __future__ import annotations

import html
import re
import unicodedata
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from isearle.backbone import Backbone
from isearle.images import BadImage, open_image
from isearle.pseudo_word import fill_template, normalize_prompt, truncated
from isearle.retrieval import DEFAULT_TEMPLATE

MAX_CAPTION_CHARS = 1000  # longer input is cut before tokenising (the context is far shorter anyway)
MAX_UPLOAD_BYTES = 25 * 1024 * 1024
MIN_SIDE = 32  # px: below this a reference holds too little to invert (it is upscaled to the model's input)


class CaptionError(ValueError):
    """The caption cannot be used; the message says why in one line."""


# ------------------------------------------------------------------------------------ inputs
_MODE_NOTES = {
    "RGBA": "the image has transparency: transparent areas were filled with white",
    "LA": "the image has transparency: transparent areas were filled with white",
    "PA": "the palette image has transparency: transparent areas were filled with white",
    "P": "palette image converted to RGB",
    "CMYK": "CMYK image converted to RGB",
    "1": "1-bit black-and-white image converted to RGB",
    "I;16": "16-bit image scaled to 8 bits per channel",
    "I;16B": "16-bit image scaled to 8 bits per channel",
    "I;16L": "16-bit image scaled to 8 bits per channel",
    "I": "32-bit integer image scaled to 8 bits per channel",
    "F": "floating-point image converted to RGB",
    "YCbCr": "YCbCr image converted to RGB",
    "LAB": "Lab image converted to RGB",
}


def load_reference(source: str | Path | bytes | Image.Image, max_bytes: int = MAX_UPLOAD_BYTES
                   ) -> tuple[Image.Image, list[str]]:
    """An RGB reference image and notes on what was converted, or `BadImage` with a one-line reason."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise BadImage("the uploaded file is gone: upload the image again")
        size = path.stat().st_size
        if size == 0:
            raise BadImage("the file is empty (0 bytes): upload a PNG, JPEG or WebP image")
        if size > max_bytes:
            raise BadImage(f"the file is too large ({size / 2**20:.1f} MB, limit {max_bytes / 2**20:.0f} MB)")
    notes: list[str] = []
    header = _peek(source)
    image = open_image(source)
    if header:
        mode, orientation, frames, transparent = header
        if mode == "P" and transparent:
            mode = "PA"
        if mode in _MODE_NOTES:
            notes.append(_MODE_NOTES[mode])
        if orientation not in (None, 1):
            notes.append("EXIF orientation applied: the image was turned the way the camera recorded it")
        if frames > 1:
            notes.append(f"animated image: only the first of its {frames} frames was used")
    if min(image.size) < MIN_SIDE:
        notes.append(f"the image is only {image.width}×{image.height} px: results mean little below "
                     f"{MIN_SIDE} px a side; use a larger image")
    return image, notes


def _peek(source: Any) -> tuple[str, int | None, int, bool] | None:
    """(mode, EXIF orientation, frames, palette transparency) from the header, None if unreadable."""
    if isinstance(source, Image.Image):
        return source.mode, None, 1, "transparency" in source.info
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import io

            with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as im:
                try:
                    orientation = im.getexif().get(274)
                except Exception:  # a broken EXIF block is ignored, as open_image does
                    orientation = None
                return im.mode, orientation, int(getattr(im, "n_frames", 1) or 1), "transparency" in im.info
    except Exception:  # open_image gives the one-line reason
        return None


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


def _encode(backbone: Backbone, text: str) -> list[int]:
    tok = backbone.tokenizer
    return list(tok.encode(text)) if hasattr(tok, "encode") else backbone.tokenize([text])[0].tolist()
