"""Embedding images into a gallery index: image sources (a folder, a Hugging Face dataset) and
`build_gallery_index`, what `isearle index` runs (resumable; `--ray` hands the embedding to Ray
Data, `isearle.scale`). The index itself, FAISS and files, is `isearle.index`."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

from isearle.artifacts import Progress, atomic_path
from isearle.backbone import Backbone
from isearle.images import ImageSource, embed_images, thumbnail_jpeg
from isearle.index import GalleryIndex, IndexConfig, check_backbone

log = logging.getLogger(__name__)


class ThumbnailWriter:
    """Writes a JPEG thumbnail of every image without a file (dataset rows, rendered scenes) while a
    gallery is embedded, named by gallery row so that appends never collide (picklable: runs in workers)."""

    def __init__(self, thumb_dir: Path, offset: int = 0, size: int = 256) -> None:
        self.thumb_dir, self.offset, self.size = thumb_dir, offset, size

    def name(self, row: int) -> str:
        return f"{self.offset + row:07d}.jpg"

    def __call__(self, row: int, source: ImageSource, image: Image.Image) -> None:
        if not isinstance(source, (str, Path)):
            with atomic_path(self.thumb_dir / self.name(row)) as tmp:
                tmp.write_bytes(thumbnail_jpeg(image, self.size))


def _prepare_items(images: Iterable[tuple[Any, ImageSource, Mapping[str, Any] | None]]
                   ) -> list[tuple[str, ImageSource, dict]]:
    items = []
    for item_id, source, meta in images:
        meta = dict(meta or {})
        if isinstance(source, (str, Path)):
            meta.setdefault("path", str(source))
        items.append((str(item_id), source, meta))
    return items


def backbone_info(backbone: Backbone, decode: str = "robust") -> dict[str, Any]:
    """What an index records about how it was embedded: the model, the precision and the decoding."""
    from isearle.precision import effective_precision

    return {"model": backbone.name, "pretrained": backbone.pretrained, "embed_dim": backbone.embed_dim,
            "precision": effective_precision(backbone.precision, backbone.device), "decode": decode}


def items_and_index(backbone: Backbone, images: Iterable, index: GalleryIndex | None,
                     config: IndexConfig | None, decode: str = "robust") -> tuple[list, GalleryIndex]:
    """The (id, source, metadata) items not in the index yet, and the index they go into: a new
    one, or one of the same backbone and decoding (ids it already holds are skipped and counted in
    the log)."""
    from isearle.errors import IsearleError

    items = _prepare_items(images)
    if index is None:
        index = GalleryIndex(backbone.embed_dim, config, backbone_info(backbone, decode))
    else:
        check_backbone(index.info, backbone)
        if index.info.get("decode", "robust") != decode:
            raise IsearleError(f"the gallery was embedded with --decode {index.info.get('decode', 'robust')}: "
                               f"append with the same --decode, or rebuild it")
    new = [item for item in items if item[0] not in index]
    if len(new) < len(items):
        log.info("%d of %d images are already in the index: skipped", len(items) - len(new), len(items))
    return new, index


def build_gallery_index(
    backbone: Backbone,
    images: Iterable[tuple[Any, ImageSource, Mapping[str, Any] | None]],
    batch_size: int = 64,
    num_workers: int = 0,
    progress: bool = True,
    config: IndexConfig | None = None,
    thumbnails: str | Path | None = None,
    index: GalleryIndex | None = None,
    checkpoint: str | Path | None = None,
    draft: bool = False,
    decode: str = "robust",
) -> GalleryIndex:
    """Embed (id, image, metadata) triples and index them (into `index` when given: incremental;
    ids it already holds are skipped).

    Images are paths, PIL images or callables; decoding and preprocessing run in `num_workers`
    DataLoader processes while the model encodes batches of `batch_size`. Unreadable images are
    skipped with a warning and listed in `info["skipped"]`. `thumbnails` is the index folder under
    which `thumbs/` receives JPEGs for items without a file path (their metadata gets "thumbnail").
    With `checkpoint` (a folder), every embedded batch is kept there (`isearle.artifacts.Progress`):
    a run killed at any moment resumes at the first missing batch and gives the same index.
    `draft`: JPEG files decoded at the reduced size the model needs (`open_image`); the backbone's
    precision (`Backbone.with_precision`) and `decode` (`isearle.images`) are recorded in the index.
    """
    items, index = items_and_index(backbone, images, index, config, decode)
    writer = None
    if thumbnails is not None:
        writer = ThumbnailWriter(Path(thumbnails) / "thumbs", offset=len(index))
        writer.thumb_dir.mkdir(parents=True, exist_ok=True)
    batches = [list(range(s, min(s + batch_size, len(items)))) for s in range(0, len(items), batch_size)]
    done: Progress | None = None
    if checkpoint is not None:
        done = Progress(checkpoint, {"what": "index", "backbone": backbone_info(backbone, decode), "base": len(index),
                                     "batch_size": batch_size, "thumbs": writer is not None,
                                     "ids": [i for i, _, _ in items]})
    todo = [b for b in range(len(batches)) if done is None or not done.has(b)]
    if len(todo) < len(batches):
        log.info("resuming: %d of %d batches already embedded", len(batches) - len(todo), len(batches))
    skipped: list[str] = list(index.info.get("skipped", []))

    def add(rows: list[int], feats: torch.Tensor, bad: list[tuple[int, str]]) -> None:
        for r, err in bad:
            log.warning("skipped %s: %s", items[r][0], err)
            if items[r][0] not in skipped:
                skipped.append(items[r][0])
        metas = [items[r][2] if writer is None or "path" in items[r][2]
                 else {**items[r][2], "thumbnail": f"thumbs/{writer.name(r)}"} for r in rows]
        if rows:
            index.add(feats, [items[r][0] for r in rows], metas)

    embedded = embed_images(backbone, [source for _, source, _ in items], num_workers=num_workers, progress=progress,
                            desc="index", skip_unreadable=True, on_image=writer, batches=[batches[b] for b in todo],
                            draft=backbone.image_size if draft else None, decode=decode)
    for b, (rows, feats, bad) in zip(todo, embedded, strict=True):
        feats = F.normalize(feats, dim=-1) if feats is not None else torch.zeros(0, backbone.embed_dim)
        if done is None:
            add(rows, feats, bad)
        else:
            done.save(b, {"features": feats}, {"rows": rows, "bad": bad})
    if done is not None:  # every batch is on disk: add them in order, as an uninterrupted run does
        for b in range(len(batches)):
            tensors, meta = done.load(b)
            add(meta["rows"], tensors["features"], [tuple(x) for x in meta["bad"]])
    if skipped:
        index.info["skipped"] = skipped
    return index


# ------------------------------------------------------------------------------------- sources
def folder_items(folder: str | Path) -> list[tuple[str, Path, dict]]:
    """(id = path relative to `folder`, path, {"path"}) for every image file under `folder`."""
    from isearle.images import list_images

    root = Path(folder)
    return [(str(p.relative_to(root)), p, {"path": str(p)}) for p in list_images(root)]


class HFRow:
    """A lazy image loader for row `row` of a Hugging Face dataset (picklable for DataLoader workers)."""

    def __init__(self, dataset: Any, column: str, row: int) -> None:
        self.dataset, self.column, self.row = dataset, column, row

    def __call__(self) -> Image.Image:
        value = self.dataset[self.row][self.column]
        if isinstance(value, Image.Image):
            return value
        if isinstance(value, dict) and value.get("bytes"):
            import io

            return Image.open(io.BytesIO(value["bytes"]))
        if isinstance(value, dict) and value.get("path"):
            return Image.open(value["path"])
        raise ValueError(f"row {self.row} column {self.column!r} holds no image")


def hf_items(name: str, split: str = "train", image_column: str | None = None,
             id_column: str | None = None, limit: int | None = None) -> list[tuple[str, HFRow, dict]]:
    """(id, lazy loader, metadata) for the images of a Hugging Face dataset (local or cached when offline)."""
    import datasets

    ds = datasets.load_dataset(name, split=split)
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    if image_column is None:
        image_column = next((c for c, f in ds.features.items() if isinstance(f, datasets.Image)), None)
        if image_column is None:
            raise ValueError(f"dataset {name} has no image column; pass --hf-image-column")
    ids = [str(v) for v in ds[id_column]] if id_column else [f"{split}/{r}" for r in range(len(ds))]
    return [(i, HFRow(ds, image_column, r), {"dataset": name, "split": split, "row": r})
            for r, i in enumerate(ids)]
