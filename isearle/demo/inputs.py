"""Checking what a user gives the demo: the reference image (upload) and the relative caption.

Bad input raises `BadImage` / `CaptionError` with a one-line reason; conversions (transparency,
16-bit, EXIF turns, animation) and cut captions come back as notes to show. The checks are the
library's (`isearle.reference`, `isearle.captions`), named here for the app.
"""

from isearle.captions import MAX_CAPTION_CHARS, CaptionError, PreparedCaption, clean_caption, prepare_caption
from isearle.reference import MAX_UPLOAD_BYTES, load_reference

__all__ = ["MAX_CAPTION_CHARS", "MAX_UPLOAD_BYTES", "CaptionError", "PreparedCaption", "clean_caption",
           "load_reference", "prepare_caption"]
