"""Gallery items as pictures: re-rendered from a shapes scene spec, or read from their file.

A reference picked from a gallery is encoded from these pixels (exactly as the gallery was embedded),
and the demo's thumbnails are drawn from them.
"""

from __future__ import annotations

from typing import Any

from PIL import Image, ImageDraw

from isearle.images import BadImage, open_image

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
