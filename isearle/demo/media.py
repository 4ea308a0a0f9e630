"""The thumbnail and reference PNG files the app serves (the pictures come from `isearle.gallery_items`)."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from PIL import Image

from isearle.gallery_items import REFERENCE_SIZE, THUMB_SIZE, gallery_image, item_spec, render_spec

log = logging.getLogger(__name__)

__all__ = ["REFERENCE_SIZE", "THUMB_SIZE", "ThumbnailCache", "gallery_image", "item_spec", "render_spec"]


class ThumbnailCache:
    """PNG files of gallery items at display size, written once under a served folder.

    A thumbnail is a cache entry, redrawn whenever it is missing or damaged: it is written to a
    temporary name and renamed (a concurrent request never serves half a file) but not fsynced
    (an fsync per new result cost more than the query), and a file checked once is not checked
    again by this process.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._checked: set[Path] = set()

    def path(self, gallery_key: str, index: Any, item_id: str, size: int = THUMB_SIZE) -> str:
        """A result thumbnail: the item fit in a `size` square (its caption is drawn below it by the page)."""
        name = hashlib.blake2b(f"{gallery_key}\0{item_id}".encode(), digest_size=10).hexdigest()
        out = self.root / f"{size}px" / f"{name}.png"
        if not self._present(out):
            image = gallery_image(index, item_id, size, supersample=2)  # 2x: enough at thumbnail size
            canvas = Image.new("RGB", (size, size), "white")
            canvas.paste(image, ((size - image.width) // 2, (size - image.height) // 2))
            _write_png(canvas, out, compress_level=1)  # written once, read locally: speed over size
        return str(out)

    def save(self, image: Image.Image, name: str) -> str:
        out = self.root / "refs" / f"{name}.png"
        if not self._present(out):
            _write_png(image, out)
        return str(out)

    def _present(self, path: Path) -> bool:
        if path in self._checked and path.is_file():
            return True
        if _intact(path):
            self._checked.add(path)
            return True
        self._checked.discard(path)
        return False


def _write_png(image: Image.Image, path: Path, **options: Any) -> None:
    """`image` as a PNG at `path`: written to a temporary name beside it, then renamed into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, format="PNG", **options)
        os.replace(name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(name)
        raise


def _intact(path: Path) -> bool:
    """Whether a cached thumbnail exists and decodes (a damaged one is logged and written again)."""
    if not path.is_file():
        return False
    try:
        with Image.open(path) as image:
            image.verify()
    except Exception as err:  # PIL raises many types for a damaged file
        log.warning("thumbnail %s is damaged (%s): writing it again", path, type(err).__name__)
        return False
    return True
