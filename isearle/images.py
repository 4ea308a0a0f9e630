"""Images in: safe opening of user files, image folders, and batched feature extraction.

Every image that enters the project (an upload, a dataset file) goes through `open_image`: a
pixel limit against decompression bombs, EXIF orientation applied, any mode (palette, RGBA,
CMYK, 16-bit) converted to RGB, and one clear `BadImage` message for anything unreadable.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

MAX_PIXELS = 40_000_000  # ~ 6300 x 6300; larger uploads are refused, not decoded
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
Image.MAX_IMAGE_PIXELS = MAX_PIXELS  # PIL's own guard, also for code paths that bypass open_image


class BadImage(ValueError):
    """The input is not a usable image; the message says why in one line."""


def open_image(source: str | Path | bytes | Image.Image, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """An RGB image from a path, bytes or PIL image, or `BadImage` with a one-line reason."""
    try:
        if isinstance(source, Image.Image):
            image = source
        else:
            image = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
        w, h = image.size
        if w * h > max_pixels:
            raise BadImage(f"image too large ({w}x{h}, limit {max_pixels:,} pixels): downscale it first")
        if w == 0 or h == 0:
            raise BadImage("image is empty (0 pixels)")
        image.load()
        image = ImageOps.exif_transpose(image)
        if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
            background = Image.new("RGB", image.size, "white")
            background.paste(image.convert("RGBA"), mask=image.convert("RGBA").getchannel("A"))
            return background
        if image.mode in ("I;16", "I;16B", "I;16L", "I"):
            image = image.point(lambda v: v * (1 / 256)).convert("L")
        return image.convert("RGB")
    except BadImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:  # the warning: under -W error
        raise BadImage(f"image too large (decompression-bomb guard): {err}") from err
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise BadImage(f"not a readable image ({type(err).__name__}): upload a PNG, JPEG or WebP file") from err


def list_images(folder: str | Path) -> list[Path]:
    """Image files under `folder`, recursively, in a stable order."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)


class ImageList(Dataset):
    """(index, pixels) for a list of loaders (paths, or callables that return a PIL image)."""

    def __init__(self, items: Sequence[str | Path | Callable[[], Image.Image]], preprocess: Callable) -> None:
        self.items, self.preprocess = items, preprocess

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor]:
        item = self.items[i]
        image = item() if callable(item) else open_image(item)
        return i, self.preprocess(image)


def extract_features(backbone, items: Sequence, batch_size: int = 64, num_workers: int = 0,
                     progress: bool = True, desc: str = "features") -> torch.Tensor:
    """Un-normalised image features [N, D] of paths or image callables, batched, in order."""
    loader = DataLoader(ImageList(items, backbone.preprocess), batch_size=batch_size,
                        num_workers=num_workers, shuffle=False)
    out = torch.empty(len(items), backbone.embed_dim)
    for idx, pixels in tqdm(loader, desc=desc, disable=not progress):
        out[idx] = backbone.encode_images(pixels).cpu()
    return out
