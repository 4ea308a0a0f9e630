"""Benchmark loaders for the official folder layouts, and an on-disk cache of image features.

Each loader reads the files exactly as the dataset authors distribute them and returns a
`Benchmark`: its queries (reference image id, relative caption(s), ground truths, extra labels),
the ranked gallery (image ids) and, for every image involved, where to load it from (a path, or a
callable that renders it). Nothing here touches a model except `extract_features_cached`.

Layouts (SEARLE README; Pic2Word for ImageNet-R):

* CIRR ``root/cirr/captions/cap.rc2.{train,val,test1}.json`` and
  ``root/cirr/image_splits/split.rc2.{split}.json`` (name -> "./dev/dev-0-0-img0.png", relative to
  ``root``), images in ``root/{train,dev,test1}/``.
* CIRCO ``root/annotations/{val,test}.json`` and
  ``root/COCO2017_unlabeled/annotations/image_info_unlabeled2017.json``, images in
  ``root/COCO2017_unlabeled/unlabeled2017/``.
* FashionIQ ``root/captions/cap.{dress,shirt,toptee}.{split}.json``,
  ``root/image_splits/split.{category}.{split}.json``, images ``root/images/{name}.jpg`` (or .png).
* ImageNet-R domain conversion ``root/imgnet_real_query.txt`` and ``root/imgnet_targets.txt``
  (Pic2Word's lists: "path label" with paths starting "imgnet/"), images in ``root/real/{wnid}/``
  and ``root/imagenet-r/{wnid}/{domain}_{n}.jpg``; without the lists, every class folder present in
  both ``real/`` and ``imagenet-r/`` is used.
* ShapesCIR ``root/annotations/{val,test}.json`` and ``root/gallery.json`` (image id -> scene spec),
  images rendered by `isearle.shapes.world.render`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from isearle.artifacts import ArtifactError, display, load_tensors, save_tensors
from isearle.images import ImageSource, embed_images

log = logging.getLogger(__name__)

FASHIONIQ_CATEGORIES: tuple[str, ...] = ("dress", "shirt", "toptee")
DOMAINS: tuple[str, ...] = ("cartoon", "origami", "toy", "sculpture")
DOMAIN_TEMPLATE = "a {} of $"
BENCHMARKS: tuple[str, ...] = ("cirr", "circo", "fashioniq", "imagenet-r", "shapes")


@dataclass
class Query:
    """One composed query; `targets` are its ground truths (first: the annotated target; [] on test)."""

    id: str
    reference: str
    caption: str = ""
    #: FashionIQ's two relative captions (the query is built from both, in both orders).
    captions: list[str] = field(default_factory=list)
    targets: list[str] = field(default_factory=list)
    #: CIRR's img_set members: Recall_subset ranks only these (minus the reference).
    subset: list[str] | None = None
    #: Labels for per-group metrics: CIRCO semantic aspects, ShapesCIR edit type, FashionIQ category, domain.
    groups: list[str] = field(default_factory=list)
    #: A per-query prompt template (domain conversion: "a cartoon of $"); None: the evaluation's template.
    template: str | None = None
    extra: dict = field(default_factory=dict)


@dataclass
class Benchmark:
    """Queries, the ranked gallery, and the source of every image involved."""

    name: str
    split: str
    queries: list[Query]
    gallery: list[str]
    images: dict[str, ImageSource]
    root: Path
    #: A sub-benchmark label (FashionIQ category), None otherwise.
    subset_name: str | None = None
    #: Distinguishes cached features of this dataset's images from other datasets' (same ids).
    cache_namespace: str = ""

    @property
    def has_ground_truth(self) -> bool:
        return any(q.targets for q in self.queries)

    def limit(self, n: int | None) -> Benchmark:
        """The same benchmark with only the first `n` queries (the gallery is unchanged)."""
        return self if n is None else replace(self, queries=self.queries[:n])

    def image_ids(self) -> list[str]:
        """Gallery ids, then references outside the gallery: every image whose feature is needed."""
        seen = dict.fromkeys(self.gallery)
        for q in self.queries:
            seen.setdefault(q.reference)
        return list(seen)

    def __len__(self) -> int:
        return len(self.queries)


def _read_json(path: Path) -> object:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: see the expected layout in `isearle.datasets` "
                                f"(or docs/reproducing.md)")
    return json.loads(path.read_text(encoding="utf-8"))


def _namespace(name: str, root: Path, *parts: object) -> str:
    digest = hashlib.blake2b(str(root.resolve()).encode() + repr(parts).encode(), digest_size=6).hexdigest()
    return f"{name}-{digest}"


def _unique(ids: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(ids))


# ----------------------------------------------------------------------------------------- CIRR
def load_cirr(root: str | Path, split: str = "val") -> Benchmark:
    """CIRR rc2 (SEARLE layout). split: train, val, test1 ("test" means test1)."""
    root = Path(root)
    split = "test1" if split == "test" else split
    if split not in ("train", "val", "test1"):
        raise ValueError(f"CIRR split {split!r}: use train, val or test1")
    base = root if (root / "captions").is_dir() and not (root / "cirr").is_dir() else root / "cirr"
    triplets = _read_json(base / "captions" / f"cap.rc2.{split}.json")
    relpaths: dict[str, str] = _read_json(base / "image_splits" / f"split.rc2.{split}.json")  # type: ignore[assignment]
    # image paths are relative to the dataset root ("./dev/..."); accept a root one level up or down
    first = next(iter(relpaths.values()), "")
    prefix = next((d for d in (root, base, root.parent) if (d / first).is_file()), root)
    images: dict[str, ImageSource] = {name: prefix / rel for name, rel in relpaths.items()}
    queries = []
    for t in triplets:  # type: ignore[union-attr]
        members = list(t.get("img_set", {}).get("members", []))
        target = t.get("target_hard")
        queries.append(Query(
            id=str(t["pairid"]), reference=t["reference"], caption=t["caption"],
            targets=[target] if target else [], subset=members,
            extra={"target_soft": t.get("target_soft", {}), "img_set_id": t.get("img_set", {}).get("id")},
        ))
    return Benchmark("cirr", split, queries, list(relpaths), images, root,
                     cache_namespace=_namespace("cirr", root))


# ---------------------------------------------------------------------------------------- CIRCO
def load_circo(root: str | Path, split: str = "val") -> Benchmark:
    """CIRCO: queries from annotations/{split}.json, gallery = the 123k COCO 2017 unlabeled images."""
    root = Path(root)
    if split not in ("val", "test"):
        raise ValueError(f"CIRCO split {split!r}: use val or test")
    annotations = _read_json(root / "annotations" / f"{split}.json")
    coco = root / "COCO2017_unlabeled"
    info = _read_json(coco / "annotations" / "image_info_unlabeled2017.json")
    folder = coco / "unlabeled2017"
    images: dict[str, ImageSource] = {str(im["id"]): folder / im["file_name"] for im in info["images"]}  # type: ignore[index]
    queries = []
    for a in annotations:  # type: ignore[union-attr]
        gts = [str(x) for x in a.get("gt_img_ids", [])]
        target = a.get("target_img_id")
        if target is not None:
            gts = [str(target)] + [g for g in gts if g != str(target)]
        queries.append(Query(
            id=str(a["id"]), reference=str(a["reference_img_id"]), caption=a["relative_caption"],
            targets=_unique(gts), groups=list(a.get("semantic_aspects", [])),
            extra={"shared_concept": a.get("shared_concept", "")},
        ))
    return Benchmark("circo", split, queries, list(images), images, root,
                     cache_namespace=_namespace("circo", root))


# ------------------------------------------------------------------------------------ FashionIQ
def load_fashioniq(root: str | Path, category: str, split: str = "val") -> Benchmark:
    """One FashionIQ category; gallery = that category's split images. Queries keep both captions."""
    root = Path(root)
    if category not in FASHIONIQ_CATEGORIES:
        raise ValueError(f"FashionIQ category {category!r}: use one of {', '.join(FASHIONIQ_CATEGORIES)}")
    triplets = _read_json(root / "captions" / f"cap.{category}.{split}.json")
    names: list[str] = list(_read_json(root / "image_splits" / f"split.{category}.{split}.json"))  # type: ignore[arg-type]
    folder = root / "images"
    suffix = ".jpg"
    probe = next((n for n in names), None)
    if probe is not None and not (folder / f"{probe}.jpg").is_file():
        suffix = next((s for s in (".png", ".jpeg", ".JPG") if (folder / f"{probe}{s}").is_file()), ".jpg")
    queries = []
    for i, t in enumerate(triplets):  # type: ignore[arg-type]
        target = t.get("target")
        queries.append(Query(
            id=f"{category}-{i}", reference=t["candidate"], captions=list(t["captions"]),
            caption=" and ".join(c.strip(".?, ") for c in t["captions"]),
            targets=[target] if target else [], groups=[category],
        ))
    all_names = _unique(names + [q.reference for q in queries] + [t for q in queries for t in q.targets])
    images: dict[str, ImageSource] = {n: folder / f"{n}{suffix}" for n in all_names}
    return Benchmark("fashioniq", split, queries, names, images, root, subset_name=category,
                     cache_namespace=_namespace("fashioniq", root))


def fashioniq_prompts(captions: Sequence[str]) -> tuple[str, str]:
    """SEARLE's two FashionIQ caption orders: "{c1} and {c2}" and "{c2} and {c1}", stripped of ". ?,"."""
    c = [x.strip(".?, ") for x in captions]
    if len(c) == 1:
        return c[0], c[0]
    return f"{c[0]} and {c[1]}", f"{c[1]} and {c[0]}"


# ------------------------------------------------------------------------------- ImageNet-R
_PIC2WORD_LINE = re.compile(r"^(\S+)\s+(-?\d+)\s*$")


def _read_list(path: Path, root: Path) -> list[tuple[str, Path, int]]:
    """(id, path, label) of a Pic2Word list; paths "imgnet/real/..." resolve against `root`."""
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        m = _PIC2WORD_LINE.match(line.strip())
        if not m:
            continue
        rel, label = m.group(1), int(m.group(2))
        parts = Path(rel).parts
        inner = Path(*parts[1:]) if parts and parts[0] == "imgnet" else Path(rel)
        out.append((inner.as_posix(), root / inner, label))
    return out


def load_imagenet_r(root: str | Path, domains: Sequence[str] = DOMAINS) -> Benchmark:
    """Domain conversion (Pic2Word protocol): ImageNet val queries, ImageNet-R targets.

    One query per (query image, domain) with prompt "a {domain} of $"; its ground truths are the
    ImageNet-R images of the same class in that domain; the gallery is every ImageNet-R image of
    the listed domains.
    """
    root = Path(root)
    unknown = [d for d in domains if d not in DOMAINS]
    if unknown:
        raise ValueError(f"unknown domain(s) {unknown}: use {', '.join(DOMAINS)}")
    qfile, tfile = root / "imgnet_real_query.txt", root / "imgnet_targets.txt"
    if qfile.is_file() and tfile.is_file():
        query_rows = [(i, p, label % 1000) for i, p, label in _read_list(qfile, root)]
        target_rows = [(i, p, label % 1000, DOMAINS[label // 1000]) for i, p, label in _read_list(tfile, root)
                       if 0 <= label // 1000 < len(DOMAINS)]
    else:
        real, rend = root / "real", root / "imagenet-r"
        if not (real.is_dir() and rend.is_dir()):
            raise FileNotFoundError(f"{root} holds neither Pic2Word's imgnet_real_query.txt / imgnet_targets.txt "
                                    f"nor real/ and imagenet-r/ class folders")
        wnids = sorted(d.name for d in rend.iterdir() if d.is_dir() and (real / d.name).is_dir())
        query_rows, target_rows = [], []
        for c, wnid in enumerate(wnids):
            for p in sorted((real / wnid).iterdir()):
                query_rows.append((f"real/{wnid}/{p.name}", p, c))
            for p in sorted((rend / wnid).iterdir()):
                dom = p.name.split("_", 1)[0]
                if dom in DOMAINS:
                    target_rows.append((f"imagenet-r/{wnid}/{p.name}", p, c, dom))
    target_rows = [r for r in target_rows if r[3] in domains]
    by_key: dict[tuple[int, str], list[str]] = {}
    for i, _, c, d in target_rows:
        by_key.setdefault((c, d), []).append(i)
    queries = [
        Query(id=f"{d}/{qi}", reference=qi, targets=by_key.get((c, d), []), groups=[d],
              template=DOMAIN_TEMPLATE.format(d), extra={"class": c})
        for d in domains for qi, _, c in query_rows
    ]
    images: dict[str, ImageSource] = {i: p for i, p, *_ in query_rows + target_rows}
    return Benchmark("imagenet-r", "val", queries, [r[0] for r in target_rows], images, root,
                     cache_namespace=_namespace("imagenet-r", root))


# ------------------------------------------------------------------------------------- shapes
def default_shapes_dir() -> Path:
    """assets/shapescir (the project's bundled ShapesCIR benchmark)."""
    from isearle.paths import ASSETS_DIR

    return ASSETS_DIR / "shapescir"


def load_shapes(root: str | Path | None = None, split: str = "test", size: int | None = None) -> Benchmark:
    """ShapesCIR (CIRCO-like, built by `isearle build-shapes`); images rendered at `size` pixels."""
    from isearle.shapes.world import DEFAULT_SIZE, render_dict

    root = Path(root) if root is not None else default_shapes_dir()
    if split not in ("val", "test"):
        raise ValueError(f"ShapesCIR split {split!r}: use val or test")
    if not (root / "gallery.json").is_file():
        raise FileNotFoundError(f"no ShapesCIR benchmark in {root}: build it with `isearle build-shapes --out {root}`")
    annotations = _read_json(root / "annotations" / f"{split}.json")
    gallery_file = root / "gallery.json"
    specs = _read_json(gallery_file)
    if isinstance(specs, dict) and isinstance(specs.get("images"), dict):
        specs = specs["images"]
    size = size or DEFAULT_SIZE
    images: dict[str, ImageSource] = {str(k): functools.partial(render_dict, v, size) for k, v in specs.items()}  # type: ignore[union-attr]
    queries = []
    for a in annotations:  # type: ignore[union-attr]
        target = a.get("target_img_id")
        gts = [str(x) for x in a.get("gt_img_ids", [])]
        if target is not None:
            gts = [str(target)] + [g for g in gts if g != str(target)]
        queries.append(Query(
            id=str(a["id"]), reference=str(a["reference_img_id"]), caption=a["relative_caption"],
            targets=_unique(gts), groups=[a["edit_type"]] if a.get("edit_type") else [],
            extra={"shared_concept": a.get("shared_concept", "")},
        ))
    stat = gallery_file.stat()
    return Benchmark("shapes", split, queries, list(images), images, root,
                     cache_namespace=_namespace("shapes", root, stat.st_size, stat.st_mtime_ns, size))


def load_benchmarks(name: str, root: str | Path | None, split: str = "val", *,
                    categories: Sequence[str] = FASHIONIQ_CATEGORIES, domains: Sequence[str] = DOMAINS,
                    image_size: int | None = None) -> list[Benchmark]:
    """The benchmark(s) of `name`: one, or one per FashionIQ category."""
    if name == "shapes":
        return [load_shapes(root, split, image_size)]
    if root is None:
        raise ValueError(f"--data (the dataset folder) is required for {name}")
    if name == "cirr":
        return [load_cirr(root, split)]
    if name == "circo":
        return [load_circo(root, split)]
    if name == "fashioniq":
        return [load_fashioniq(root, c, split) for c in categories]
    if name == "imagenet-r":
        return [load_imagenet_r(root, domains)]
    raise ValueError(f"unknown benchmark {name!r}: use one of {', '.join(BENCHMARKS)}")


# -------------------------------------------------------------------------------- feature cache
def default_cache_dir() -> Path:
    """$ISEARLE_CACHE/features (default ~/.cache/isearle/features)."""
    from isearle import paths

    return paths.CACHE_DIR / "features"


#: Format version of the feature cache's shards (part of its key).
FEATURE_CACHE_VERSION = 2


def feature_settings(backbone: object, preprocess: str = "targetpad", decode: str = "searle") -> dict:
    """Everything besides the weights that changes a cached image feature: the precision it was
    encoded in (what it means on the backbone's device), the preprocessing and the decoding."""
    from isearle.precision import effective_precision

    device = getattr(backbone, "device", "cpu")
    return {"what": "features", "version": FEATURE_CACHE_VERSION, "preprocess": preprocess, "decode": decode,
            "precision": effective_precision(getattr(backbone, "precision", "fp32"), device)}


def backbone_key(name: str, pretrained: str | None, preprocess: str = "targetpad", **settings: object) -> str | None:
    """The feature cache's key (`isearle.keys.cache_key`) of a backbone, preprocessing and decoding /
    precision settings (`feature_settings`); None for random-init weights (never cached)."""
    from isearle.keys import cache_key

    return cache_key(name, pretrained, **{"what": "features", "version": FEATURE_CACHE_VERSION,
                                          "preprocess": preprocess, **settings})


class FeatureCache:
    """Un-normalised image features on disk, keyed by the backbone's weights and every setting that
    changes a feature (`feature_settings`: precision, preprocessing, decoding) and by image id, inside
    a dataset namespace: ``{root}/{key}/{namespace}/shard_*.safetensors``.

    Each shard holds a [N, D] tensor with its ids in the metadata; shards are written as extraction
    proceeds, so an interrupted extraction resumes. `root=None` or `key=None` (random-init weights)
    disables the disk (memory only).
    """

    def __init__(self, root: str | Path | None, key: str | None, namespace: str) -> None:
        self.dir = None if root is None or key is None else Path(root) / key / namespace
        self.key = key
        self._ids: dict[str, int] = {}
        self._rows: list[torch.Tensor] = []
        self._loaded = False

    @classmethod
    def for_backbone(cls, root: str | Path | None, backbone: object, namespace: str,
                     preprocess: str = "targetpad", decode: str = "searle") -> FeatureCache:
        """The cache of `backbone`'s features in its precision, with this preprocessing and decoding."""
        settings = feature_settings(backbone, preprocess, decode)
        from isearle.keys import cache_key

        return cls(root, cache_key(backbone.name, backbone.pretrained, **settings), namespace)

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        if self.dir is None or not self.dir.is_dir():
            return
        for shard in sorted(self.dir.glob("shard_*.safetensors")):
            try:
                tensors, meta = load_tensors(shard, "features", "")
                ids, feats = json.loads(meta["ids"]), tensors["features"]
                if feats.ndim != 2 or len(ids) != feats.shape[0] or (self._rows and feats.shape[1] != self._rows[0].shape[1]):
                    raise ArtifactError(shard, "does not match the other shards", "")
            except (ArtifactError, KeyError, ValueError) as err:
                log.warning("%s %s: dropped, its images are encoded again", display(shard),
                            getattr(err, "problem", "is unreadable"))
                shard.unlink(missing_ok=True)
                continue
            self._store(ids, feats)

    def _store(self, ids: Sequence[str], feats: torch.Tensor) -> None:
        base = sum(r.shape[0] for r in self._rows)
        self._rows.append(feats.float().cpu())
        for j, i in enumerate(ids):
            self._ids[i] = base + j

    def __contains__(self, image_id: str) -> bool:
        self._load()
        return image_id in self._ids

    def __len__(self) -> int:
        self._load()
        return len(self._ids)

    def get(self, ids: Sequence[str]) -> torch.Tensor:
        """Features [N, D] of cached ids (KeyError for a missing one)."""
        self._load()
        if not ids:
            return torch.empty(0, self._rows[0].shape[1] if self._rows else 0)
        table = torch.cat(self._rows) if len(self._rows) > 1 else self._rows[0]
        self._rows = [table]
        return table[[self._ids[i] for i in ids]]

    def missing(self, ids: Sequence[str]) -> list[str]:
        self._load()
        return [i for i in ids if i not in self._ids]

    def add(self, ids: Sequence[str], features: torch.Tensor) -> None:
        """Store features of `ids` (memory, and a new shard on disk)."""
        self._load()
        if len(ids) != features.shape[0]:
            raise ValueError("one feature row per id")
        if not len(ids):
            return
        self._store(list(ids), features)
        if self.dir is not None:
            self.dir.mkdir(parents=True, exist_ok=True)
            n = max((int(p.stem[6:]) for p in self.dir.glob("shard_*.safetensors") if p.stem[6:].isdigit()),
                    default=-1) + 1
            save_tensors(self.dir / f"shard_{n:06d}.safetensors", {"features": features.float()}, "features",
                         {"ids": json.dumps(list(ids))})


def extract_features_cached(backbone: object, ids: Sequence[str], sources: dict[str, ImageSource],
                            cache: FeatureCache, batch_size: int = 64, num_workers: int = 0,
                            progress: bool = True, flush_every: int = 4096, desc: str = "image features",
                            decode: str = "searle", unreadable: dict[str, str] | None = None) -> torch.Tensor:
    """Un-normalised features [N, D] of `ids` (in order): cached ones read, the others encoded in
    batches (DataLoader, progress bar) and written to the cache every `flush_every` images.

    Images that cannot be read are skipped (their rows are zero), named in the log and in
    `unreadable` ({id: reason}); more than `isearle.images.MAX_UNREADABLE` of them raise
    `UnreadableImages`. They are not cached, so a repaired file is read next time."""
    from isearle.images import check_unreadable

    todo = cache.missing(list(dict.fromkeys(ids)))
    bad: dict[str, str] = {}
    if todo:
        pending_ids: list[str] = []
        pending: list[torch.Tensor] = []
        for rows, feats, errors in embed_images(backbone, [sources[i] for i in todo], batch_size, num_workers,
                                                progress, desc, skip_unreadable=True, decode=decode):
            bad.update((todo[r], e) for r, e in errors)
            if feats is None:
                continue
            pending.append(feats)
            pending_ids += [todo[i] for i in rows]
            if len(pending_ids) >= flush_every:
                cache.add(pending_ids, torch.cat(pending))
                pending_ids, pending = [], []
        cache.add(pending_ids, torch.cat(pending) if pending else torch.empty(0))
    check_unreadable(list(bad.items()), len(dict.fromkeys(ids)))
    if unreadable is not None:
        unreadable.update(bad)
    good = [i for i in ids if i not in bad]
    feats = cache.get(good)
    if not bad:
        return feats
    out = torch.zeros(len(ids), feats.shape[1] if feats.numel() else getattr(backbone, "embed_dim", 0))
    keep = [r for r, i in enumerate(ids) if i not in bad]
    out[keep] = feats
    return out
