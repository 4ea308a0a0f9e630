"""The gallery index: L2-normalised image features in FAISS, with string ids and per-id metadata.

Exact inner-product search (`IndexFlatIP`) up to `IndexConfig.flat_threshold` vectors, an
approximate index above it (HNSW by default, or IVF-PQ with a refine stage), chosen by
`kind="auto"` and rebuilt automatically when incremental adds cross the threshold. On disk a gallery
is a folder: `index.faiss` (FAISS), `index.json` (backbone, sizes, config) and `items.json` (ids
and metadata in row order). `GalleryIndex.load(dir, mmap=True)` memory-maps the vectors, so a
large gallery opens in milliseconds and is shared between processes through the page cache.

`build_gallery_index` embeds images with a DataLoader (batched, optional worker processes) and is
what `isearle index` runs; `--ray` hands the embedding to Ray Data (`isearle.scale`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from isearle.artifacts import (
    ArtifactError,
    Progress,
    atomic_path,
    check_file,
    check_format,
    display,
    read_json,
    recover_group,
    write_group,
)
from isearle.backbone import QUICKGELU_ALIASES, REPO_DIR, Backbone

log = logging.getLogger(__name__)
KINDS = ("auto", "flat", "hnsw", "ivfpq")
INDEX_FILE, INFO_FILE, ITEMS_FILE = "index.faiss", "index.json", "items.json"
#: 2: index.json records each file's size and SHA-256 ("files"); 1 (no records) is still read.
FORMAT_VERSION = 2
#: Where `isearle index` keeps the embedded batches of an unfinished run (inside --out).
PROGRESS_DIR = ".index-progress"
#: The offline world's bundled gallery (rebuilt by `python -m isearle.demo build-gallery`).
OFFLINE_GALLERY = REPO_DIR / "gallery_index"


class BackboneMismatch(ArtifactError):
    """The index was embedded with another backbone than the one asked for."""


@dataclass
class IndexConfig:
    """Which FAISS structure holds the gallery, and its build and search parameters.

    kind: "flat" (exact), "hnsw" or "ivfpq" (approximate), or "auto": flat up to `flat_threshold`
    vectors, then `approximate`. The default threshold keeps one exact single-threaded query at
    about 5 ms on a 2-core machine (flat search is memory-bound: ~10 ms at 100k 512-d vectors, see
    docs/performance.md), which leaves room for the text encoder in a 15 ms interactive query.
    """

    kind: str = "auto"
    flat_threshold: int = 50_000
    approximate: str = "hnsw"
    hnsw_m: int = 32
    hnsw_ef_construction: int = 40
    hnsw_ef_search: int = 64
    #: IVF lists; None: sqrt(N) at build time (k-means on 2 cores stays under a minute at 1M),
    #: capped so that every list gets >= 39 training points.
    ivf_nlist: int | None = None
    ivf_nprobe: int = 16
    #: PQ sub-quantisers (bytes per code); must divide the dimension.
    pq_m: int = 64
    #: Re-rank IVF-PQ candidates with finer codes: "SQ8" (1 byte/dim), "Flat" (exact), or None.
    refine: str | None = "SQ8"
    refine_k_factor: int = 8

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown index kind {self.kind!r}: use one of {', '.join(KINDS)}")
        if self.approximate not in ("hnsw", "ivfpq"):
            raise ValueError(f"approximate must be 'hnsw' or 'ivfpq', not {self.approximate!r}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> IndexConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def _as_matrix(x: np.ndarray | torch.Tensor, dim: int | None = None) -> np.ndarray:
    """[N, D] contiguous float32, L2-normalised (cosine = inner product)."""
    if isinstance(x, torch.Tensor):
        x = x.detach().float().cpu().numpy()
    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 1:
        x = x[None]
    if x.ndim != 2:
        raise ValueError(f"expected features [N, D] or [D], got shape {x.shape}")
    if dim is not None and x.shape[1] != dim:
        raise ValueError(f"feature size {x.shape[1]} does not match the index's {dim}")
    # numpy, not faiss.normalize_L2: its SIMD path can round a row differently depending on the
    # batch it comes in, and a gallery must not depend on how its adds were split.
    norms = np.sqrt(np.einsum("ij,ij->i", x, x))[:, None]
    return np.ascontiguousarray(x / np.maximum(norms, 1e-12), dtype=np.float32)


def canonical_backbone(name: str | None, pretrained: str | None) -> tuple[str | None, str | None]:
    """(name, pretrained) as `load_backbone` resolves it (ViT-B-32 + openai -> ViT-B-32-quickgelu)."""
    if pretrained == "openai" and name in QUICKGELU_ALIASES:
        name = QUICKGELU_ALIASES[name]
    return name, pretrained


@contextlib.contextmanager
def _faiss_threads(n_rows: int) -> Iterator[None]:
    """One FAISS thread for a few queries (OpenMP start-up costs more than it saves), else torch's
    thread count: batched searches, adds, training. torch may share FAISS's OpenMP runtime, whose
    thread setting then also caps torch: torch's count is restored afterwards."""
    torch_threads = torch.get_num_threads()
    faiss.omp_set_num_threads(1 if n_rows < 16 else max(1, torch_threads))
    try:
        yield
    finally:
        if torch.get_num_threads() != torch_threads:
            torch.set_num_threads(torch_threads)


class GalleryIndex:
    """Gallery features in FAISS with string ids and metadata; exact or approximate, incremental.

    Row r of the FAISS index carries the label r; `ids[r]` is its string id and `metadata[id]` its
    dict (path, scene spec, thumbnail...). `info` records the backbone that embedded the gallery.
    """

    def __init__(self, dim: int, config: IndexConfig | None = None, info: Mapping[str, Any] | None = None) -> None:
        self.dim = int(dim)
        self.config = config or IndexConfig()
        self.info: dict[str, Any] = {"embed_dim": self.dim, **dict(info or {})}
        self.ids: list[str] = []
        self.metadata: dict[str, dict] = {}
        self._row: dict[str, int] = {}
        self.kind = "hnsw" if self.config.kind == "hnsw" else "flat" if self.config.kind in ("flat", "auto") else "ivfpq"
        self._index: faiss.Index | None = self._new_flat() if self.kind == "flat" else None
        self._lock = threading.RLock()
        self._view_of: Path | None = None  # set when the FAISS data is a read-only memory map
        self.directory: Path | None = None

    # ------------------------------------------------------------------------------ building
    @classmethod
    def build(cls, features: np.ndarray | torch.Tensor, ids: Sequence[Any],
              metadata: Sequence[Mapping[str, Any]] | Mapping[Any, Mapping[str, Any]] | None = None,
              config: IndexConfig | None = None, info: Mapping[str, Any] | None = None) -> GalleryIndex:
        """An index over `features` [N, D] (normalised on the way in) with ids and metadata."""
        dim = features.shape[-1]
        index = cls(dim, config, info)
        index.add(features, ids, metadata)
        return index

    def _new_flat(self) -> faiss.Index:
        return faiss.IndexIDMap2(faiss.IndexFlatIP(self.dim))

    def _new_approximate(self, kind: str, train: np.ndarray) -> faiss.Index:
        """An empty HNSW or trained IVF-PQ index (IVF-PQ trains on `train`)."""
        cfg = self.config
        if kind == "hnsw":
            hnsw = faiss.IndexHNSWFlat(self.dim, cfg.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            hnsw.hnsw.efConstruction = cfg.hnsw_ef_construction
            return faiss.IndexIDMap2(hnsw)
        n = train.shape[0]
        if n < 256:
            raise ValueError(f"IVF-PQ needs at least 256 vectors to train its codebooks, got {n}: use kind 'flat'")
        if self.dim % cfg.pq_m:
            raise ValueError(f"pq_m={cfg.pq_m} must divide the feature size {self.dim}")
        nlist = cfg.ivf_nlist or int(math.sqrt(n))
        nlist = max(1, min(nlist, n // 39))
        spec = f"IVF{nlist},PQ{cfg.pq_m}" + (f",Refine({cfg.refine})" if cfg.refine else "")
        inner = faiss.index_factory(self.dim, spec, faiss.METRIC_INNER_PRODUCT)
        # The factory turns on polysemous training (a Hamming-filter codebook reordering, ~10x the
        # training time) that only pays off with polysemous search, which is not used here.
        faiss.downcast_index(faiss.extract_index_ivf(inner)).do_polysemous_training = False
        sample = train
        if n > 64 * nlist:  # 64 points per list train k-means well; subsample reproducibly
            sample = train[np.sort(np.random.default_rng(0).choice(n, 64 * nlist, replace=False))]
        inner.train(sample)
        return faiss.IndexIDMap2(inner)

    def _apply_search_params(self) -> None:
        """Set efSearch / nprobe / k_factor from the config (they are not all kept by FAISS files)."""
        if self._index is None:
            return
        inner = faiss.downcast_index(self._index.index)
        if isinstance(inner, faiss.IndexHNSW):
            inner.hnsw.efSearch = self.config.hnsw_ef_search
        if isinstance(inner, faiss.IndexRefine):
            inner.k_factor = self.config.refine_k_factor
        try:
            faiss.extract_index_ivf(inner).nprobe = self.config.ivf_nprobe
        except RuntimeError:
            pass  # not an IVF index

    def _own(self) -> None:
        """Replace a read-only memory map by an in-memory copy before writing to it."""
        if self._view_of is not None:
            self._index = faiss.read_index(str(self._view_of))
            self._view_of = None
            self._apply_search_params()

    def vectors(self) -> np.ndarray:
        """All stored vectors [N, D] in row order (exact for flat and HNSW, decoded for IVF-PQ)."""
        if self._index is None or not self.ids:
            return np.zeros((0, self.dim), np.float32)
        return self._index.index.reconstruct_n(0, len(self.ids))

    def _convert(self, kind: str, new: np.ndarray | None = None) -> None:
        """Rebuild the FAISS index as `kind` from the stored vectors (plus `new` rows)."""
        x = self.vectors()
        if new is not None:
            x = np.concatenate([x, new]) if len(x) else new
        index = self._new_approximate(kind, x)
        if len(x):
            index.add_with_ids(x, np.arange(len(x), dtype=np.int64))
        self._index, self.kind, self._view_of = index, kind, None
        self._apply_search_params()

    def add(self, features: np.ndarray | torch.Tensor, ids: Sequence[Any],
            metadata: Sequence[Mapping[str, Any]] | Mapping[Any, Mapping[str, Any]] | None = None) -> None:
        """Append vectors with new, unique ids (str() of what is given) and their metadata dicts.

        With kind "auto", crossing `flat_threshold` converts the flat index to the approximate one.
        """
        x = _as_matrix(features, self.dim)
        ids = [str(i) for i in ids]
        if len(ids) != x.shape[0]:
            raise ValueError(f"{x.shape[0]} vectors but {len(ids)} ids")
        if len(set(ids)) != len(ids):
            raise ValueError("duplicate ids in one add")
        if isinstance(metadata, Mapping):
            metas = [dict(metadata.get(i, {})) for i in ids]
        else:
            metas = [dict(m) for m in metadata] if metadata is not None else [{} for _ in ids]
            if len(metas) != len(ids):
                raise ValueError(f"{len(ids)} ids but {len(metas)} metadata dicts")
        with self._lock:
            dup = [i for i in ids if i in self._row]
            if dup:
                raise ValueError(f"id {dup[0]!r} is already in the index ({len(dup)} duplicates)")
            if not ids:
                return
            self._own()
            with _faiss_threads(len(ids)):
                start, total = len(self.ids), len(self.ids) + len(ids)
                if self.config.kind == "auto" and self.kind == "flat" and total > self.config.flat_threshold:
                    self._convert(self.config.approximate, x)
                elif self._index is None:  # explicit approximate kind, first add: train (IVF-PQ) on it
                    self._convert(self.kind, x)
                else:
                    self._index.add_with_ids(x, np.arange(start, total, dtype=np.int64))
                self.ids.extend(ids)
                for r, (i, m) in enumerate(zip(ids, metas, strict=True), start):
                    self._row[i] = r
                    self.metadata[i] = m
                self.info["count"] = len(self.ids)

    # ------------------------------------------------------------------------------- queries
    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, item_id: object) -> bool:
        return str(item_id) in self._row

    def search(self, query: np.ndarray | torch.Tensor, k: int = 10,
               exclude_ids: Iterable[Any] | None = None) -> list[list[tuple[str, float]]]:
        """Top-k (id, cosine) per query row of `query` [Q, D] or [D], best first.

        `exclude_ids` (e.g. the reference image) are never returned; k results are still returned
        when the gallery has enough other items.
        """
        q = _as_matrix(query, self.dim)
        excluded = {str(i) for i in exclude_ids or ()} & self._row.keys()
        n = len(self.ids)
        if n == 0 or k <= 0:
            return [[] for _ in range(q.shape[0])]
        fetch = min(n, k + len(excluded))
        with self._lock:
            with _faiss_threads(q.shape[0]):
                scores, labels = self._index.search(q, fetch)
        out = []
        for srow, lrow in zip(scores, labels, strict=True):
            hits = []
            for s, label in zip(srow.tolist(), lrow.tolist(), strict=True):
                if label < 0:
                    continue
                item = self.ids[label]
                if item in excluded:
                    continue
                hits.append((item, s))
                if len(hits) == k:
                    break
            out.append(hits)
        return out

    def path_of(self, item_id: str) -> Path | None:
        """A displayable image file for an id: its `path`, else its `thumbnail` (relative to the index folder)."""
        meta = self.metadata.get(str(item_id), {})
        for key in ("path", "thumbnail"):
            value = meta.get(key)
            if not value:
                continue
            path = Path(value)
            if not path.is_absolute() and self.directory is not None and (self.directory / path).exists():
                path = self.directory / path
            return path
        return None

    @property
    def nbytes(self) -> int:
        """Serialised size of the FAISS index (vectors, graph or codes, id map)."""
        if self._index is None:
            return 0
        return int(faiss.serialize_index(self._index).size)

    # ------------------------------------------------------------------------------ storage
    def save(self, directory: str | Path) -> Path:
        """Write index.faiss, items.json and their manifest index.json into `directory`, as one
        atomic group (see `isearle.artifacts.write_group`): a crash leaves the old gallery or the new."""
        out = Path(directory)
        with self._lock:
            info = {**self.info, "count": len(self.ids), "index_kind": self.kind, "embed_dim": self.dim}
            header = {"format": FORMAT_VERSION, "info": info, "config": asdict(self.config)}
            items = {"ids": self.ids, "metadata": [self.metadata[i] for i in self.ids]}
            index = self._index if self._index is not None else self._new_flat()
            # New files are renamed over the old: a memory-mapped old file stays valid for readers.
            write_group(out, {INDEX_FILE: lambda p: faiss.write_index(index, str(p)),
                              ITEMS_FILE: lambda p: p.write_text(json.dumps(items, ensure_ascii=False), "utf-8")},
                        INFO_FILE, header)
            self.info = info
        return out

    @classmethod
    def load(cls, directory: str | Path, mmap: bool = True,
             expect_backbone: str | tuple[str | None, str | None] | Backbone | None = None) -> GalleryIndex:
        """Open a saved gallery; with `mmap` the vectors stay on disk (read-only view, copied on add).

        Every file is checked against the manifest (size, SHA-256; see `isearle.artifacts`): a
        damaged gallery raises ArtifactError saying how to rebuild it. `expect_backbone` (a name,
        (name, pretrained) or a Backbone) raises BackboneMismatch when the gallery was embedded
        with another model: its features would be meaningless to it.
        """
        directory = Path(directory)
        info_path = directory / INFO_FILE
        if not info_path.is_file() and not (directory / f"{INFO_FILE}.pending").is_file():
            raise FileNotFoundError(f"no gallery index in {directory}: build one with `isearle index`")
        remedy = rebuild_hint(directory)
        try:
            recover_group(directory, INFO_FILE, (INDEX_FILE, ITEMS_FILE))
        except OSError as err:
            raise ArtifactError(directory, f"holds an unfinished write ({err.strerror})", remedy) from None
        header = read_json(info_path, remedy)
        if not isinstance(header, dict) or not isinstance(header.get("info"), dict) \
                or "embed_dim" not in header["info"]:
            raise ArtifactError(info_path, "is not a gallery index header", remedy)
        check_format(info_path, header.get("format"), FORMAT_VERSION, remedy)
        info, files = header["info"], header.get("files", {})
        remedy = rebuild_hint(directory, info)
        if expect_backbone is not None:
            check_backbone(info, expect_backbone, directory)
        index = cls(int(info["embed_dim"]), IndexConfig.from_dict(header.get("config", {})), info)
        items = read_json(directory / ITEMS_FILE, remedy, files.get(ITEMS_FILE))
        if not isinstance(items, dict) or not isinstance(items.get("ids"), list) \
                or not isinstance(items.get("metadata"), list) or len(items["ids"]) != len(items["metadata"]):
            raise ArtifactError(directory / ITEMS_FILE, "is not a gallery item list", remedy)
        index.ids = [str(i) for i in items["ids"]]
        index.metadata = dict(zip(index.ids, items["metadata"], strict=True))
        index._row = {i: r for r, i in enumerate(index.ids)}
        path = directory / INDEX_FILE
        check_file(path, files.get(INDEX_FILE), remedy)
        flags = faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY if mmap else 0
        try:
            index._index = faiss.read_index(str(path), flags)
        except RuntimeError as err:
            problem = str(err).strip().splitlines()[-1][:120]
            raise ArtifactError(path, f"is not a readable FAISS index ({problem})", remedy) from None
        index._view_of = path if mmap else None
        index.kind = info.get("index_kind", index.kind)
        index.directory = directory
        if index._index.ntotal != len(index.ids) or index._index.d != index.dim:
            raise ArtifactError(path, f"does not match its items ({index._index.ntotal} {index._index.d}-d "
                                f"vectors, {len(index.ids)} {index.dim}-d items)", remedy)
        if index._index.ntotal == 0 and index.config.kind in ("hnsw", "ivfpq"):
            index._index, index._view_of, index.kind = None, None, index.config.kind  # built on first add
        index._apply_search_params()
        return index


def rebuild_hint(directory: str | Path, info: Mapping[str, Any] | None = None) -> str:
    """What to do about a damaged gallery: the offline world's is rebuilt by the demo helper."""
    if (info or {}).get("benchmark") == "shapescir" or Path(directory).resolve() == OFFLINE_GALLERY.resolve():
        return "rebuild it with `python -m isearle.demo build-gallery`"
    model = (info or {}).get("model")
    return f"rebuild it with `isearle index --out {display(directory)}" + (f" --model {model}`" if model else "`")


def check_backbone(info: Mapping[str, Any], expected: str | tuple[str | None, str | None] | Backbone,
                   where: str | Path = "the gallery") -> None:
    """Raise BackboneMismatch unless `info` (an index's) was embedded by `expected`."""
    if isinstance(expected, Backbone):
        name, pretrained, check_pretrained = expected.name, expected.pretrained, True
    elif isinstance(expected, tuple):
        (name, pretrained), check_pretrained = expected, True
    else:
        name, pretrained, check_pretrained = expected, None, False
    have = canonical_backbone(info.get("model"), info.get("pretrained"))
    want = canonical_backbone(name, pretrained if check_pretrained else info.get("pretrained"))
    same_name = want[0] == have[0] or (not check_pretrained and name in (info.get("model"), have[0]))
    if not same_name or (check_pretrained and want[1] != have[1]):
        raise BackboneMismatch(
            where, f"was embedded with {info.get('model')}/{info.get('pretrained')}, not "
            f"{name}/{pretrained if check_pretrained else '*'}", f"rebuild it with `isearle index --model {name}`")


# --------------------------------------------------------------------------- building from images
ImageSource = str | Path | Image.Image | Callable[[], Image.Image]


def load_item(item: ImageSource) -> Image.Image:
    """A PIL image from a path, a PIL image, or a callable returning one (rendered scene, dataset row)."""
    from isearle.images import open_image

    if isinstance(item, Image.Image):
        return open_image(item)
    if callable(item):
        return open_image(item())
    return open_image(item)


class GalleryImages(Dataset):
    """(row, pixels or None) for (id, image source, metadata) triples; unreadable images give None.

    With `thumb_dir`, a JPEG thumbnail is written for every item that has no file path (dataset
    rows, rendered scenes), so that a demo can show them.
    """

    def __init__(self, items: Sequence[tuple[str, ImageSource, dict]], preprocess: Callable,
                 thumb_dir: Path | None = None, thumb_size: int = 256, thumb_offset: int = 0) -> None:
        self.items, self.preprocess, self.thumb_dir, self.thumb_size = items, preprocess, thumb_dir, thumb_size
        self.thumb_offset = thumb_offset

    def thumbnail_name(self, row: int) -> str:
        """File name of row `row`'s thumbnail (numbered by gallery row, so appends never collide)."""
        return f"{self.thumb_offset + row:07d}.jpg"

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, row: int) -> tuple[int, torch.Tensor | None, str]:
        from isearle.images import BadImage

        _, source, _ = self.items[row]
        try:
            image = load_item(source)
        except BadImage as err:
            return row, None, str(err)
        if self.thumb_dir is not None and not isinstance(source, (str, Path)):
            thumb = image.copy()
            thumb.thumbnail((self.thumb_size, self.thumb_size))
            with atomic_path(self.thumb_dir / self.thumbnail_name(row)) as tmp:
                thumb.save(tmp, format="JPEG", quality=90)
        return row, self.preprocess(image), ""


def _collate(batch: list[tuple[int, torch.Tensor | None, str]]) -> tuple[list[int], torch.Tensor | None, list]:
    good = [(r, p) for r, p, _ in batch if p is not None]
    bad = [(r, e) for r, _, e in batch if e]
    pixels = torch.stack([p for _, p in good]) if good else None
    return [r for r, _ in good], pixels, bad


def _prepare_items(images: Iterable[tuple[Any, ImageSource, Mapping[str, Any] | None]]
                   ) -> list[tuple[str, ImageSource, dict]]:
    items = []
    for item_id, source, meta in images:
        meta = dict(meta or {})
        if isinstance(source, (str, Path)):
            meta.setdefault("path", str(source))
        items.append((str(item_id), source, meta))
    return items


def backbone_info(backbone: Backbone) -> dict[str, Any]:
    """What an index records about the model that embedded it."""
    return {"model": backbone.name, "pretrained": backbone.pretrained, "embed_dim": backbone.embed_dim}


def _items_and_index(backbone: Backbone, images: Iterable, index: GalleryIndex | None,
                     config: IndexConfig | None) -> tuple[list, GalleryIndex]:
    """The (id, source, metadata) items not in the index yet, and the index they go into: a new
    one, or one of the same backbone (ids it already holds are skipped and counted in the log)."""
    items = _prepare_items(images)
    if index is None:
        index = GalleryIndex(backbone.embed_dim, config, backbone_info(backbone))
    else:
        check_backbone(index.info, backbone)
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
) -> GalleryIndex:
    """Embed (id, image, metadata) triples and index them (into `index` when given: incremental;
    ids it already holds are skipped).

    Images are paths, PIL images or callables; decoding and preprocessing run in `num_workers`
    DataLoader processes while the model encodes batches of `batch_size`. Unreadable images are
    skipped with a warning and listed in `info["skipped"]`. `thumbnails` is the index folder under
    which `thumbs/` receives JPEGs for items without a file path (their metadata gets "thumbnail").
    With `checkpoint` (a folder), every embedded batch is kept there (`isearle.artifacts.Progress`):
    a run killed at any moment resumes at the first missing batch and gives the same index.
    """
    items, index = _items_and_index(backbone, images, index, config)
    thumb_dir = None
    if thumbnails is not None:
        thumb_dir = Path(thumbnails) / "thumbs"
        thumb_dir.mkdir(parents=True, exist_ok=True)
    dataset = GalleryImages(items, backbone.preprocess, thumb_dir, thumb_offset=len(index))
    batches = [list(range(s, min(s + batch_size, len(items)))) for s in range(0, len(items), batch_size)]
    done: Progress | None = None
    if checkpoint is not None:
        done = Progress(checkpoint, {"what": "index", "backbone": backbone_info(backbone), "base": len(index),
                                     "batch_size": batch_size, "thumbs": thumb_dir is not None,
                                     "ids": [i for i, _, _ in items]})
    todo = [b for b in range(len(batches)) if done is None or not done.has(b)]
    loader = DataLoader(dataset, batch_sampler=[batches[b] for b in todo], num_workers=num_workers,
                        collate_fn=_collate, persistent_workers=False)
    skipped: list[str] = list(index.info.get("skipped", []))

    def add(rows: list[int], feats: torch.Tensor, bad: list[tuple[int, str]]) -> None:
        for r, err in bad:
            tqdm.write(f"warning: skipped {items[r][0]}: {err}", file=sys.stderr)
            if items[r][0] not in skipped:
                skipped.append(items[r][0])
        metas = []
        for r in rows:
            meta = items[r][2]
            if thumb_dir is not None and "path" not in meta:
                meta = {**meta, "thumbnail": f"thumbs/{dataset.thumbnail_name(r)}"}
            metas.append(meta)
        if rows:
            index.add(feats, [items[r][0] for r in rows], metas)

    with tqdm(total=len(items), initial=len(items) - sum(len(batches[b]) for b in todo), desc="index",
              unit="img", disable=not progress) as bar:
        for b, (rows, pixels, bad) in zip(todo, loader, strict=True):
            feats = torch.zeros(0, backbone.embed_dim)
            if pixels is not None:
                feats = F.normalize(backbone.encode_images(pixels).float(), dim=-1).cpu()
            if done is None:
                add(rows, feats, bad)
            else:
                done.save(b, {"features": feats}, {"rows": rows, "bad": bad})
            bar.update(len(rows) + len(bad))
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


# ------------------------------------------------------------------------------------------ CLI
def add_index_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of `isearle index`."""
    from isearle.cli import add_backbone_arguments

    d = IndexConfig()
    add_backbone_arguments(p)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--images", type=Path, help="folder of images (searched recursively; ids are relative paths)")
    g.add_argument("--hf-dataset", help="Hugging Face dataset name or local dataset script/folder")
    g.add_argument("--shapes", type=int, metavar="N", help="render N scenes of the offline shapes world")
    p.add_argument("--shapes-seed", type=int, default=1000, help="seed of the rendered shapes scenes")
    p.add_argument("--hf-split", default="train", help="dataset split")
    p.add_argument("--hf-image-column", default=None, help="image column (default: the first Image feature)")
    p.add_argument("--hf-id-column", default=None, help="id column (default: split/row)")
    p.add_argument("--limit", type=int, default=None, help="index only the first N images")
    p.add_argument("--out", type=Path, default=Path("gallery_index"), help="index folder")
    p.add_argument("--append", action="store_true", help="add to the index in --out instead of replacing it")
    p.add_argument("--batch-size", type=int, default=64, help="images encoded together")
    p.add_argument("--num-workers", type=int, default=2, help="DataLoader worker processes (decode + preprocess)")
    p.add_argument("--kind", choices=KINDS, default=d.kind, help="FAISS structure (auto: flat, then --approximate)")
    p.add_argument("--flat-threshold", type=int, default=d.flat_threshold, help="largest exact (flat) index for --kind auto")
    p.add_argument("--approximate", choices=["hnsw", "ivfpq"], default=d.approximate, help="index above the threshold")
    p.add_argument("--hnsw-m", type=int, default=d.hnsw_m, help="HNSW links per node")
    p.add_argument("--ef-search", type=int, default=d.hnsw_ef_search, help="HNSW efSearch")
    p.add_argument("--nprobe", type=int, default=d.ivf_nprobe, help="IVF lists probed per query")
    p.add_argument("--thumbnails", action="store_true",
                   help="store JPEG thumbnails of images without a file (always for --hf-dataset; shapes scenes keep their spec)")
    p.add_argument("--ray", action="store_true", help="embed on Ray Data (local Ray unless --ray-address)")
    p.add_argument("--ray-address", default=None, help="Ray cluster address (e.g. ray://head:10001 or auto)")
    p.add_argument("--ray-workers", type=int, default=None, help="Ray actors (default: one per GPU, else per CPU)")


def _shapes_items(n: int, seed: int, size: int) -> list[tuple[str, Any, dict]]:
    from isearle.shapes.world import scene_source

    ids, items = scene_source(n, seed, size)
    out = []
    for i, item in zip(ids, items, strict=True):
        meta: dict[str, Any] = {"scene_seed": seed}
        # scene_source gives functools.partial(render_dict, spec_dict, size): keep the spec, so that
        # the demo re-renders the scene at any size instead of storing a thumbnail.
        args = getattr(item, "args", ())
        if args and isinstance(args[0], dict):
            meta["scene"] = args[0]
        out.append((str(i), item, meta))
    return out


def index_main(args: argparse.Namespace) -> int:
    """`isearle index`: embed a folder, a Hugging Face dataset or shapes scenes into a gallery index."""
    from isearle.cli import backbone_from

    backbone = backbone_from(args)
    if args.images is not None:
        items: list = folder_items(args.images)
    elif args.hf_dataset is not None:
        items = hf_items(args.hf_dataset, args.hf_split, args.hf_image_column, args.hf_id_column, args.limit)
    else:
        items = _shapes_items(args.shapes, args.shapes_seed, backbone.image_size)
    items = items[: args.limit]
    if not items:
        raise ValueError("no images found to index")
    config = IndexConfig(kind=args.kind, flat_threshold=args.flat_threshold, approximate=args.approximate,
                         hnsw_m=args.hnsw_m, hnsw_ef_search=args.ef_search, ivf_nprobe=args.nprobe)
    index = None
    if args.append and (args.out / INFO_FILE).is_file():
        index = GalleryIndex.load(args.out, mmap=False, expect_backbone=backbone)
        known = sum(1 for i, _, _ in items if str(i) in index)
        if known:
            print(f"{known} of {len(items)} images are already in {args.out}: skipped", file=sys.stderr)
    thumbs = args.out if (args.thumbnails or args.hf_dataset is not None) else None
    if args.ray:
        from isearle.scale import ray_build_gallery_index

        index = ray_build_gallery_index(backbone, items, batch_size=args.batch_size, config=config,
                                        index=index, address=args.ray_address, num_workers=args.ray_workers,
                                        thumbnails=thumbs)
    else:
        index = build_gallery_index(backbone, items, args.batch_size, args.num_workers, True, config,
                                    thumbs, index, checkpoint=args.out / PROGRESS_DIR)
    index.save(args.out)
    Progress.discard(args.out / PROGRESS_DIR)
    print(f"{len(index)} images ({index.kind}, {index.dim}-d, {backbone.name}) indexed in {args.out}")
    return 0
