"""The thumbnail and reference PNG files the app serves (the pictures come from `isearle.gallery_items`)."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

from PIL import Image

from isearle.artifacts import atomic_path
from isearle.gallery_items import REFERENCE_SIZE, THUMB_SIZE, gallery_image, item_spec, render_spec

log = logging.getLogger(__name__)

__all__ = ["REFERENCE_SIZE", "THUMB_SIZE", "ThumbnailCache", "gallery_image", "item_spec", "render_spec"]


class ThumbnailCache:
    """PNG files of gallery items at display size, written once under a served folder."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, gallery_key: str, index: Any, item_id: str, size: int = THUMB_SIZE) -> str:
        """A result thumbnail: the item fit in a `size` square (its caption is drawn below it by the page)."""
        name = hashlib.blake2b(f"{gallery_key}\0{item_id}".encode(), digest_size=10).hexdigest()
        out = self.root / f"{size}px" / f"{name}.png"
        if not _intact(out):
            image = gallery_image(index, item_id, size, supersample=2)  # 2x: enough at thumbnail size
            canvas = Image.new("RGB", (size, size), "white")
            canvas.paste(image, ((size - image.width) // 2, (size - image.height) // 2))
            with atomic_path(out) as tmp:  # concurrent requests never serve a half-written file
                canvas.save(tmp, format="PNG", compress_level=1)  # written once, read locally: speed over size
        return str(out)

    def save(self, image: Image.Image, name: str) -> str:
        out = self.root / "refs" / f"{name}.png"
        if not _intact(out):
            with atomic_path(out) as tmp:
                image.save(tmp, format="PNG")
        return str(out)


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
