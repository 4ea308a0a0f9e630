"""The gallery index: L2-normalised image features in FAISS, with string ids and per-id metadata.

Exact inner-product search (`IndexFlatIP`) up to `IndexConfig.flat_threshold` vectors, an
approximate index above it (HNSW by default, or IVF-PQ with a refine stage), chosen by
`kind="auto"` and rebuilt automatically when incremental adds cross the threshold. On disk a gallery
is a folder: `index.faiss` (FAISS), `index.json` (backbone, sizes, config) and `items.json` (ids
and metadata in row order). `GalleryIndex.load(dir, mmap=True)` memory-maps the vectors, so a
large gallery opens in milliseconds and is shared between processes through the page cache.

`isearle.indexing.build_gallery_index` embeds images into one (what `isearle index` runs).
"""

from __future__ import annotations

import json
import logging
import math
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch

from isearle.artifacts import (
    ArtifactError,
    check_file,
    check_format,
    display,
    read_json,
    recover_group,
    write_group,
)
from isearle.backbone import Backbone, canonical_name
from isearle.runtime import faiss_threads

log = logging.getLogger(__name__)
KINDS = ("auto", "flat", "hnsw", "ivfpq", "ivfsq")
INDEX_FILE, INFO_FILE, ITEMS_FILE = "index.faiss", "index.json", "items.json"
#: 2: index.json records each file's size and SHA-256 ("files"); 1 (no records) is still read.
FORMAT_VERSION = 2
#: Where `isearle index` keeps the embedded batches of an unfinished run (inside --out).
PROGRESS_DIR = ".index-progress"
#: The command that rebuilds a gallery of a kind (`info["benchmark"]`), registered by the code that builds
#: such galleries; a gallery may also record its own (`info["rebuild"]`).
REBUILD_COMMANDS: dict[str, str] = {}


class BackboneMismatch(ArtifactError):
    """The index was embedded with another backbone than the one asked for."""


@dataclass
class IndexConfig:
    """Which FAISS structure holds the gallery, and its build and search parameters.

    kind: "flat" (exact), "hnsw", "ivfpq" or "ivfsq" (approximate), or "auto": by size, flat up to
    `flat_threshold` vectors, then `approximate` up to `large_threshold`, then "ivfsq". The flat
    threshold keeps one exact single-threaded query at about 5 ms on a 2-core machine (flat search
    is memory-bound: ~10 ms at 100k 512-d vectors); HNSW stores the vectors and a graph (~2.3 KB per
    512-d vector) and builds slowly, so large galleries go to IVF-SQ8 (one byte per dimension, every
    probed list scanned: recall and build time measured at 1M in bench/bench_search.py).
    """

    kind: str = "auto"
    flat_threshold: int = 50_000
    approximate: str = "hnsw"
    large_threshold: int = 250_000
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
        if self.approximate not in ("hnsw", "ivfpq", "ivfsq"):
            raise ValueError(f"approximate must be 'hnsw', 'ivfpq' or 'ivfsq', not {self.approximate!r}")

    def auto_kind(self, n: int) -> str:
        """The structure "auto" uses for n vectors."""
        if n <= self.flat_threshold:
            return "flat"
        return self.approximate if n <= self.large_threshold else "ivfsq"

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
        self.kind = "flat" if self.config.kind == "auto" else self.config.kind
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
        """An empty HNSW or a trained IVF-PQ / IVF-SQ8 index (IVF trains on `train`)."""
        cfg = self.config
        if kind == "hnsw":
            hnsw = faiss.IndexHNSWFlat(self.dim, cfg.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            hnsw.hnsw.efConstruction = cfg.hnsw_ef_construction
            return faiss.IndexIDMap2(hnsw)
        n = train.shape[0]
        if n < 256:
            raise ValueError(f"IVF needs at least 256 vectors to train its lists, got {n}: use kind 'flat'")
        if kind == "ivfpq" and self.dim % cfg.pq_m:
            raise ValueError(f"pq_m={cfg.pq_m} must divide the feature size {self.dim}")
        nlist = cfg.ivf_nlist or int(math.sqrt(n))
        nlist = max(1, min(nlist, n // 39))
        if kind == "ivfsq":
            spec = f"IVF{nlist},SQ8"
        else:
            spec = f"IVF{nlist},PQ{cfg.pq_m}" + (f",Refine({cfg.refine})" if cfg.refine else "")
        inner = faiss.index_factory(self.dim, spec, faiss.METRIC_INNER_PRODUCT)
        if kind == "ivfpq":
            # The factory turns on polysemous training (a Hamming-filter codebook reordering, ~10x the
            # training time) that only pays off with polysemous search, which is not used here.
            faiss.downcast_index(faiss.extract_index_ivf(inner)).do_polysemous_training = False
        sample = train
        if n > 64 * nlist:  # 64 points per list train k-means well; subsample reproducibly
            sample = train[np.sort(np.random.default_rng(0).choice(n, 64 * nlist, replace=False))]
        inner.train(sample)
        return faiss.IndexIDMap2(inner)

    def apply_search_params(self) -> None:
        """Set efSearch / nprobe / k_factor from the config (they are not all kept by FAISS files);
        call it after changing those fields of `self.config`."""
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
            self.apply_search_params()

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
        self.apply_search_params()

    def add(self, features: np.ndarray | torch.Tensor, ids: Sequence[Any],
            metadata: Sequence[Mapping[str, Any]] | Mapping[Any, Mapping[str, Any]] | None = None) -> None:
        """Append vectors with new, unique ids (str() of what is given) and their metadata dicts.

        With kind "auto", crossing a size threshold rebuilds the index as the kind for the new size.
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
            with faiss_threads(len(ids)):
                start, total = len(self.ids), len(self.ids) + len(ids)
                if self.config.kind == "auto" and self.config.auto_kind(total) != self.kind:
                    self._convert(self.config.auto_kind(total), x)
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
            with faiss_threads(q.shape[0]):
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
    def faiss_index(self) -> faiss.Index | None:
        """The underlying FAISS index (row labels), e.g. for a benchmark's exact ground truth."""
        return self._index

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
        if index._index.ntotal == 0 and index.config.kind in ("hnsw", "ivfpq", "ivfsq"):
            index._index, index._view_of, index.kind = None, None, index.config.kind  # built on first add
        index.apply_search_params()
        return index


def gallery_problem(directory: str | Path) -> ArtifactError | None:
    """What is wrong with the saved gallery in `directory` (None: it opens and verifies)."""
    try:
        GalleryIndex.load(directory)
    except ArtifactError as err:
        return err
    return None


def rebuild_hint(directory: str | Path, info: Mapping[str, Any] | None = None) -> str:
    """What to do about a damaged gallery: the command it records (or its kind's), else `isearle index`."""
    command = (info or {}).get("rebuild") or REBUILD_COMMANDS.get(str((info or {}).get("benchmark")))
    if command:
        return f"rebuild it with `{command}`"
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
    have = canonical_name(info.get("model"), info.get("pretrained")), info.get("pretrained")
    want_pretrained = pretrained if check_pretrained else info.get("pretrained")
    want = canonical_name(name, want_pretrained), want_pretrained
    same_name = want[0] == have[0] or (not check_pretrained and name in (info.get("model"), have[0]))
    if not same_name or (check_pretrained and want[1] != have[1]):
        raise BackboneMismatch(
            where, f"was embedded with {info.get('model')}/{info.get('pretrained')}, not "
            f"{name}/{pretrained if check_pretrained else '*'}", f"rebuild it with `isearle index --model {name}`")
