"""Bar charts as images for the pseudo-word panel (matplotlib's object API, thread-safe)."""

from __future__ import annotations

import threading
import warnings
from collections.abc import Sequence

import numpy as np
from PIL import Image

_PLOT_LOCK = threading.Lock()  # matplotlib's text rendering is not thread-safe


def bar_chart(labels: Sequence[str], values: Sequence[float], title: str, color: str = "#4f46e5",
              xlabel: str = "cosine similarity") -> Image.Image:
    """A horizontal bar chart as an RGB image (matplotlib's object API, no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = max(1, len(labels))
    with _PLOT_LOCK, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # missing glyphs (emoji, CJK) are drawn as boxes, not warned
        fig = Figure(figsize=(4.4, 0.9 + 0.28 * n), dpi=100)
        canvas = FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        y = np.arange(len(labels))
        ax.barh(y, list(values), color=color, height=0.7)
        ax.set_yticks(y, [str(s)[:28] for s in labels])
        ax.invert_yaxis()
        lo = min([0.0, *values])
        hi = max([0.0, *values]) or 1.0
        ax.set_xlim(lo - 0.05 * (hi - lo) if lo < 0 else 0.0, hi + 0.22 * (hi - lo))  # from 0 unless negative
        for i, v in enumerate(values):
            ax.text(v, i, f" {v:.2f}", va="center", fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.tick_params(labelsize=8)
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
        fig.tight_layout()
        canvas.draw()
        w, h = canvas.get_width_height()
        return Image.frombuffer("RGBA", (w, h), bytes(canvas.buffer_rgba())).convert("RGB")
