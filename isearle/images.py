"""Images in: safe opening of user files, image folders, and the one batched embedding loop.

Every image that enters the project (an upload, a dataset file) goes through `open_image`, with a
pixel limit against decompression bombs and one clear `BadImage` message for anything unreadable,
in one of two named decodings (`DECODES`):

* "robust" (uploads, the demo's galleries): EXIF orientation applied, transparent images composited
  on white, any mode (palette, RGBA, CMYK, 16-bit) converted to RGB before preprocessing;
* "searle" (benchmarks and dataset runs, as SEARLE's src/datasets.py and data_utils.py do): plain
  `PIL.Image.open`, no EXIF transpose, no compositing; the mode is kept and the preprocessing's
  `convert("RGB")` comes last, after targetpad, resize and crop; truncated files are decoded as far
  as they go (SEARLE's `ImageFile.LOAD_TRUNCATED_IMAGES = True`).

A dataset run skips files it cannot read, names them in the log and in its metadata, and fails
only when more than `MAX_UNREADABLE` of them are bad (`check_unreadable`).
"""

from __future__ import annotations

import contextlib
import io
import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from isearle.errors import IsearleError

log = logging.getLogger(__name__)

MAX_PIXELS = 40_000_000  # ~ 6300 x 6300; larger uploads are refused, not decoded
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
Image.MAX_IMAGE_PIXELS = MAX_PIXELS  # PIL's own guard, also for code paths that bypass open_image
#: The two decodings (module docstring): "searle" for benchmarks and dataset runs, "robust" for uploads.
DECODES = ("searle", "robust")
DECODE_HELP = ("image decoding: searle (plain PIL.Image.open, RGB conversion last, truncated files read as far "
               "as they go: SEARLE's code) or robust (EXIF orientation, transparency on white, RGB first)")
#: A dataset run fails when more than this share of its images cannot be read (else they are skipped).
MAX_UNREADABLE = 0.01
_truncated_lock = threading.Lock()


class BadImage(IsearleError, ValueError):
    """The input is not a usable image; the message says why in one line."""


class UnreadableImages(IsearleError):
    """Too many images of a dataset run cannot be read; the message names some and says what to do."""


@contextlib.contextmanager
def _load_truncated(enabled: bool) -> Iterator[None]:
    """PIL's `ImageFile.LOAD_TRUNCATED_IMAGES` for the duration of a load (SEARLE sets it for the whole
    process; here only the "searle" decoding sees it, so uploads keep failing loudly)."""
    if not enabled:
        yield
        return
    with _truncated_lock:
        before = ImageFile.LOAD_TRUNCATED_IMAGES
        ImageFile.LOAD_TRUNCATED_IMAGES = True
        try:
            yield
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = before


def open_image(source: str | Path | bytes | Image.Image, max_pixels: int = MAX_PIXELS,
               draft: int | None = None, decode: str = "robust") -> Image.Image:
    """An image from a path, bytes or PIL image, or `BadImage` with a one-line reason.

    `decode` (module docstring): "robust" returns RGB; "searle" returns the file as PIL decodes it,
    in its own mode (the preprocessing converts to RGB last, as SEARLE's does).
    `draft` ("robust" only): decode a JPEG at the smallest 1/2, 1/4 or 1/8 scale whose sides stay
    >= `draft` pixels (PIL's draft mode: the DCT does the downscaling, several times less decoding
    work). The model then resizes from that instead of the full image: features differ slightly
    (cosine ~0.999)."""
    if decode not in DECODES:
        raise ValueError(f"unknown decoding {decode!r}: use one of {', '.join(DECODES)}")
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
        if decode == "searle":
            with _load_truncated(True):
                image.load()
            return image
        if draft and image.format == "JPEG":
            image.draft("RGB", (draft, draft))
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
        raise BadImage(f"not a readable image ({type(err).__name__}): use a PNG, JPEG or WebP file") from err


def list_images(folder: str | Path) -> list[Path]:
    """Image files under `folder`, recursively, in a stable order."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)


ImageSource = str | Path | bytes | Image.Image | Callable[[], Image.Image]


def load_item(item: ImageSource, draft: int | None = None, decode: str = "robust") -> Image.Image:
    """An image from a path, bytes, a PIL image, or a callable returning one (rendered scene, dataset row),
    in the `decode` decoding; JPEG data decoded in draft mode at >= `draft` pixels when given (`open_image`)."""
    return open_image(item() if callable(item) else item, draft=draft, decode=decode)


def check_unreadable(bad: Sequence[tuple[str, str]], total: int, what: str = "images",
                     max_share: float | None = None) -> None:
    """Log the unreadable images of a dataset run (count and names); `UnreadableImages` when more than
    `max_share` (default `MAX_UNREADABLE`) of `total` are bad."""
    if not bad:
        return
    max_share = MAX_UNREADABLE if max_share is None else max_share
    names = ", ".join(str(name) for name, _ in bad[:10]) + (", ..." if len(bad) > 10 else "")
    if len(bad) > max_share * total:
        raise UnreadableImages(f"{len(bad)} of {total} {what} cannot be read (more than {max_share:.0%}), e.g. "
                               f"{names} ({bad[0][1]}): check the dataset files")
    log.warning("skipped %d of %d %s that cannot be read: %s", len(bad), total, what, names)


def thumbnail_jpeg(image: Image.Image, size: int = 256) -> bytes:
    """A JPEG thumbnail (fit in `size` px, quality 90) of an image, for items that have no file."""
    thumb = image.copy()
    thumb.thumbnail((size, size))
    buf = io.BytesIO()
    thumb.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


class ImageList(Dataset):
    """(row, pixels or None, error) for a list of image sources.

    An unreadable image raises `BadImage`, or with `skip_unreadable` gives (row, None, reason).
    `on_image(row, source, image)` sees every image read (e.g. to write its thumbnail); it must be
    picklable when DataLoader workers run it.
    """

    def __init__(self, items: Sequence[ImageSource], preprocess: Callable, skip_unreadable: bool = False,
                 on_image: Callable[[int, ImageSource, Image.Image], None] | None = None,
                 draft: int | None = None, decode: str = "robust") -> None:
        self.items, self.preprocess = items, preprocess
        self.skip_unreadable, self.on_image, self.draft, self.decode = skip_unreadable, on_image, draft, decode

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, row: int) -> tuple[int, torch.Tensor | None, str]:
        try:
            image = load_item(self.items[row], self.draft, self.decode)
            if self.on_image is not None:
                self.on_image(row, self.items[row], image)
            pixels = self.preprocess(image)
        except BadImage as err:
            if not self.skip_unreadable:
                raise
            return row, None, str(err)
        except OSError as err:  # a file that opened but fails to decode
            if not self.skip_unreadable:
                raise BadImage(f"not a readable image ({type(err).__name__}): {err}") from err
            return row, None, f"not a readable image ({type(err).__name__})"
        return row, pixels, ""


def collate(batch: list[tuple[int, torch.Tensor | None, str]]
            ) -> tuple[list[int], torch.Tensor | None, list[tuple[int, str]]]:
    """(rows read, their pixels stacked or None, [(row, reason)] of unreadable ones)."""
    good = [(r, p) for r, p, _ in batch if p is not None]
    bad = [(r, e) for r, _, e in batch if e]
    return [r for r, _ in good], torch.stack([p for _, p in good]) if good else None, bad


def embed_images(backbone: Any, items: Sequence[ImageSource], batch_size: int = 64, num_workers: int = 0,
                 progress: bool = True, desc: str = "features", skip_unreadable: bool = False,
                 on_image: Callable[[int, ImageSource, Image.Image], None] | None = None,
                 batches: Sequence[Sequence[int]] | None = None, draft: int | None = None,
                 decode: str = "robust") -> Iterator[tuple[list[int], torch.Tensor | None, list[tuple[int, str]]]]:
    """The one image-embedding loop: batches of (rows, un-normalised features [n, D] on CPU or None,
    unreadable (row, reason)), in order. Decoding and preprocessing run in `num_workers` DataLoader
    processes while the model encodes; a progress bar counts images. `batches` (lists of rows)
    replaces consecutive batches of `batch_size`, e.g. to embed only what a resumed run lacks.
    `draft`: JPEG files decoded at >= `draft` pixels; `decode`: the decoding (`open_image`)."""
    dataset = ImageList(items, backbone.preprocess, skip_unreadable, on_image, draft, decode)
    if batches is None:
        loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, shuffle=False, collate_fn=collate)
        done = 0
    else:
        loader = DataLoader(dataset, batch_sampler=[list(b) for b in batches], num_workers=num_workers,
                            collate_fn=collate)
        done = len(items) - sum(len(b) for b in batches)
    with tqdm(total=len(items), initial=done, desc=desc, unit="img", disable=not progress) as bar:
        for rows, pixels, bad in loader:
            feats = backbone.encode_images(pixels).float().cpu() if pixels is not None else None
            yield rows, feats, bad
            bar.update(len(rows) + len(bad))


def extract_features(backbone: Any, items: Sequence[ImageSource], batch_size: int = 64, num_workers: int = 0,
                     progress: bool = True, desc: str = "features", decode: str = "robust") -> torch.Tensor:
    """Un-normalised image features [N, D] of image sources, batched, in order (BadImage if one is unreadable)."""
    out = torch.empty(len(items), backbone.embed_dim)
    for rows, feats, _ in embed_images(backbone, items, batch_size, num_workers, progress, desc, decode=decode):
        out[rows] = feats
    return out


def extract_readable(backbone: Any, items: Sequence[ImageSource], batch_size: int = 64, num_workers: int = 0,
                     progress: bool = True, desc: str = "features", decode: str = "searle",
                     max_share: float | None = None) -> tuple[list[int], torch.Tensor, list[tuple[int, str]]]:
    """A dataset run's features: (rows read, their features [n, D], [(row, reason)] of unreadable ones).
    Unreadable images are skipped and logged; more than `max_share` of them raise `UnreadableImages`."""
    rows_read: list[int] = []
    parts: list[torch.Tensor] = []
    bad: list[tuple[int, str]] = []
    for rows, feats, errors in embed_images(backbone, items, batch_size, num_workers, progress, desc,
                                            skip_unreadable=True, decode=decode):
        rows_read += rows
        bad += errors
        if feats is not None:
            parts.append(feats)
    check_unreadable([(_name(items[r], r), e) for r, e in bad], len(items), max_share=max_share)
    feats = torch.cat(parts) if parts else torch.empty(0, backbone.embed_dim)
    return rows_read, feats, bad


def _name(item: ImageSource, row: int) -> str:
    return str(item) if isinstance(item, (str, Path)) else f"item {row}"
