"""Gallery items as pictures: re-rendered from a shapes scene spec or read from their file, and
the thumbnail / reference PNG files the app serves."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from isearle.artifacts import atomic_path
from isearle.images import BadImage, open_image

log = logging.getLogger(__name__)

THUMB_SIZE = 160  # result thumbnails (px)
REFERENCE_SIZE = 256  # a gallery item shown as the reference (px)


def item_spec(metadata: dict) -> dict | None:
    """The shapes scene spec of a gallery item (its "spec": the offline gallery, `isearle index --shapes`)."""
    value = metadata.get("spec")
    return value if isinstance(value, dict) and "objects" in value else None


def render_spec(spec: dict, size: int, supersample: int = 4) -> Image.Image:
    """A shapes scene dict rendered at `size` px (4x supersampling, as the gallery was embedded)."""
    from isearle.shapes.world import SceneSpec, render

    return render(SceneSpec.from_dict(spec), size, supersample=supersample)


def _placeholder(size: int, text: str = "no preview") -> Image.Image:
    image = Image.new("RGB", (size, size), (230, 230, 230))
    ImageDraw.Draw(image).text((8, size // 2 - 6), text, fill=(90, 90, 90))
    return image


def gallery_image(index: Any, item_id: str, size: int | None, supersample: int = 4) -> Image.Image:
    """A gallery item as an RGB image: re-rendered from its spec at `size`, or its file (fit in `size`)."""
    meta = index.metadata.get(item_id, {})
    spec = item_spec(meta)
    if spec is not None:
        return render_spec(spec, size or REFERENCE_SIZE, supersample)
    path = index.path_of(item_id) if hasattr(index, "path_of") else meta.get("path")
    if path is None:
        return _placeholder(size or THUMB_SIZE)
    try:
        image = open_image(path)
    except BadImage:
        return _placeholder(size or THUMB_SIZE, "unreadable")
    if size is not None:
        image.thumbnail((size, size))
    return image


class ThumbnailCache:
    """PNG files of gallery items at display size, written once under a served folder."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, gallery_key: str, index: Any, item_id: str, size: int = THUMB_SIZE) -> str:
        """A result thumbnail: the item fit in `size`, over a white band that the caption label covers."""
        name = hashlib.blake2b(f"{gallery_key}\0{item_id}".encode(), digest_size=10).hexdigest()
        out = self.root / str(size) / f"{name}.png"
        if not _intact(out):
            image = gallery_image(index, item_id, size, supersample=2)  # 2x: enough at thumbnail size
            canvas = Image.new("RGB", (size, size + size // 5), "white")
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
