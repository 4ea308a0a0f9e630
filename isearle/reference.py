"""One reference image per request: decoded once (a large JPEG straight to about the model's input
scale), hashed once, and resolved once (a gallery item or not).

Search, explanation and the inspector views all take the same `Reference`, so no step decodes the
upload again or hashes its pixels again; the query caches are keyed by `Reference.key`.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from isearle.images import BadImage, open_image

__all__ = ["DECODE_SCALE", "MAX_UPLOAD_BYTES", "MIN_DECODE", "BadImage", "Reference", "image_key", "item_key", "load_reference"]

MAX_UPLOAD_BYTES = 25 * 1024 * 1024
#: A reference is decoded and reduced to at least this many times the model's input size (short
#: side): enough for the model's own resize (a downscale still), and far fewer pixels to decode,
#: turn and hash than a 12-megapixel photo (a 4000x3000 JPEG for a 224-px model: decoded at 1/8).
DECODE_SCALE = 1.5
#: ... and never below this many pixels: pictures up to this size (the demo's 256-px gallery
#: pictures, a 640x480 photo) are decoded as they are, so their content key does not depend on the model.
MIN_DECODE = 256
MIN_SIDE = 32  # px: below this a reference holds too little to invert (it is upscaled to the model's input)

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


def image_key(image: Image.Image) -> str:
    """Content hash of an image's pixels (same picture, same key, whatever its file name)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{image.mode}{image.size}".encode())
    h.update(image.tobytes())
    return h.hexdigest()


@dataclass(frozen=True)
class Reference:
    """A reference image ready for every query step: its pixels, their content key, notes on what
    decoding changed, and the gallery item it is (None for a new upload).

    A gallery item's `image` is the item's own pixels as the gallery embedded them, and its key
    names the item (`item_key`), so nothing of it is hashed again.
    """

    image: Image.Image
    key: str
    notes: tuple[str, ...] = ()
    item_id: str | None = None

    @classmethod
    def of(cls, image: Image.Image) -> Reference:
        """A reference of a decoded image (hashed here, once)."""
        return cls(image, image_key(image))

    @property
    def exclude(self) -> list[str]:
        """Gallery ids to leave out of the rankings: the reference itself when it is a gallery item."""
        return [self.item_id] if self.item_id else []


def item_key(gallery: str, item_id: str) -> str:
    """The cache key of a gallery item used as a reference (its pixels are fixed by the gallery)."""
    return f"item:{gallery}:{item_id}"


def load_reference(source: str | Path | bytes | Image.Image, size: int | None = None,
                   max_bytes: int = MAX_UPLOAD_BYTES) -> tuple[Image.Image, list[str]]:
    """An RGB reference image and notes on what was converted, or `BadImage` with a one-line reason.

    With `size` (the model's input size), a JPEG is decoded at the smallest 1/2, 1/4 or 1/8 scale
    whose short side stays >= max(DECODE_SCALE * size, MIN_DECODE) (the DCT does the downscaling), and any larger
    image is reduced by an integer box filter to that scale, before anything else reads its pixels.
    """
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise BadImage(f"the image file {path.name} is gone: upload it again (or check the path)")
        nbytes = path.stat().st_size
        if nbytes == 0:
            raise BadImage("the file is empty (0 bytes): upload a PNG, JPEG or WebP image")
        if nbytes > max_bytes:
            raise BadImage(f"the file is too large ({nbytes / 2**20:.1f} MB, limit {max_bytes / 2**20:.0f} MB)")
    notes: list[str] = []
    header = _peek(source)
    target = max(int(DECODE_SCALE * size), MIN_DECODE) if size else None
    image = open_image(source, draft=target if not isinstance(source, Image.Image) else None)
    if target:
        factor = min(image.size) // target
        if factor >= 2:
            image = image.reduce(factor)
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
            with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as im:
                try:
                    orientation = im.getexif().get(274)
                except Exception:  # a broken EXIF block is ignored, as open_image does
                    orientation = None
                return im.mode, orientation, int(getattr(im, "n_frames", 1) or 1), "transparency" in im.info
    except Exception:  # open_image gives the one-line reason
        return None
