"""Bar charts as images for the pseudo-word panel, drawn with Pillow.

Two charts follow every search (the explanation panel); a matplotlib figure costs tens of
milliseconds each, more than the explanation's model work, while these rectangles and labels take
about a millisecond. Text uses matplotlib's bundled DejaVu Sans when it is installed (the same face
as the report's plots), else Pillow's built-in font.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

WIDTH = 440
ROW = 28  # px per bar
LABEL_CHARS = 28


@functools.lru_cache(maxsize=4)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    try:
        import matplotlib

        return ImageFont.truetype(str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"), size)
    except (ImportError, OSError):
        return ImageFont.load_default(size)


def bar_chart(labels: Sequence[str], values: Sequence[float], title: str, color: str = "#4f46e5",
              xlabel: str = "cosine similarity") -> Image.Image:
    """A horizontal bar chart as an RGB image: one bar per label (top to bottom), its value written
    after it, the zero line marked when values are negative."""
    labels = [str(s)[:LABEL_CHARS] for s in labels]
    values = [float(v) for v in values]
    small, big = _font(11), _font(13)
    height = 40 + ROW * max(1, len(labels)) + 30
    image = Image.new("RGB", (WIDTH, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((WIDTH // 2, 8), title, fill="#111111", font=big, anchor="mt")
    left = 12 + max((draw.textlength(s, font=small) for s in labels), default=0)
    left = min(left, WIDTH * 0.45)
    right = WIDTH - 48  # room for the value text
    lo, hi = min([0.0, *values]), max([0.0, *values]) or 1.0
    scale = (right - left) / (hi - lo)
    zero = left + (0.0 - lo) * scale
    top = 36
    for i, (label, value) in enumerate(zip(labels, values, strict=True)):
        y = top + i * ROW
        draw.text((left - 6, y + ROW / 2), label, fill="#333333", font=small, anchor="rm")
        x0, x1 = sorted((zero, zero + value * scale))
        draw.rectangle([x0, y + 4, max(x1, x0 + 1), y + ROW - 4], fill=color)
        draw.text((max(x1, zero) + 4, y + ROW / 2), f"{value:.2f}", fill="#333333", font=small, anchor="lm")
    bottom = top + ROW * max(1, len(labels))
    draw.line([(zero, top), (zero, bottom)], fill="#999999")
    draw.line([(left, bottom), (right, bottom)], fill="#999999")
    draw.text(((left + right) / 2, bottom + 8), xlabel, fill="#333333", font=small, anchor="mt")
    return image
