"""Scale-out on Ray Data: feature extraction, gallery indexing and OTI over a pool of actors.

Each actor loads the backbone once (one actor per GPU, else one per CPU) and `map_batches` feeds
it work units. A work unit is one *global* batch (rows [b * batch_size, (b + 1) * batch_size)),
exactly the batches of the single-process paths, and OTI batch b is seeded with `seed + b` as in
`isearle.oti_runs.invert_dataset`. The results equal the single-process ones bit for bit when each actor
uses as many torch threads (`threads`, default 1) as the single process did (tests/test_ray.py);
with another thread count CPU kernels split some reductions differently, and tokens agree to fp32
rounding (~1e-7).

Ray runs locally by default (`ray.init(num_cpus=...)`); `address=` joins a cluster, to which the
`isearle` package is shipped with the job (`runtime_env.py_modules`). Weights that cannot be
fetched by name on a worker (random init, bundled or local checkpoints) travel through the object
store. OTI shards are written by the driver as batches finish, so an interrupted run resumes.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from isearle import paths
from isearle.artifacts import write_bytes
from isearle.backbone import BUNDLED_WEIGHTS, Backbone, load_backbone
from isearle.images import check_unreadable, embed_images, thumbnail_jpeg
from isearle.index import GalleryIndex, IndexConfig
from isearle.oti import OTIConfig, invert
from isearle.oti_runs import load_tokens, prepare_run, save_shard, shard_done, write_run_config
from isearle.runtime import cpu_quota, set_threads

log = logging.getLogger(__name__)


def _ray():
    try:
        import ray
        import ray.data  # noqa: F401  (Ray Data is the engine used here)
    except ImportError as err:  # an optional dependency: say how to get it
        raise ImportError('--ray needs Ray Data: pip install "ray[data]" (or pip install -e ".[ray]")') from err
    return ray


def init_ray(address: str | None = None, num_cpus: int | None = None) -> bool:
    """Start a local Ray with `num_cpus` CPUs (default: the CPU quota) or join the cluster at `address`.

    Returns True when Ray was started here (the caller then shuts it down).
    The package travels to the workers: on the PYTHONPATH locally, as a `py_modules` upload on a
    cluster. An already initialised Ray is reused as it is.
    """
    ray = _ray()
    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address, runtime_env={"py_modules": [str(paths.PACKAGE_DIR)]}, log_to_driver=True)
    else:
        path = os.pathsep.join(p for p in (str(paths.PACKAGE_DIR.parent), os.environ.get("PYTHONPATH", "")) if p)
        ray.init(num_cpus=num_cpus or cpu_quota(), include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": path}})
    return True


@contextmanager
def ray_session(address: str | None = None, num_workers: int | None = None, threads: int = 1) -> Iterator[None]:
    """Ray for the duration of a block (local: `num_workers` x `threads` CPUs); shut down if started here."""
    started = init_ray(address, num_workers * threads if num_workers else None)
    try:
        yield
    finally:
        if started:
            _ray().shutdown()


@dataclass
class BackboneSpec:
    """How an actor rebuilds the driver's backbone: by name, plus shipped weights when needed."""

    name: str
    pretrained: str | None
    preprocess: Callable
    state: list | None = None  # [ObjectRef] of the state dict (boxed: Ray must not resolve it early)

    @classmethod
    def of(cls, backbone: Backbone, ship_weights: bool | None = None) -> BackboneSpec:
        """Ship weights that a worker cannot load by name (random init, bundled or local files)."""
        if ship_weights is None:
            p = backbone.pretrained
            ship_weights = p is None or p in BUNDLED_WEIGHTS or Path(str(p)).is_file()
        state = None
        if ship_weights:
            cpu_state = {k: v.detach().cpu() for k, v in backbone.model.state_dict().items()}
            state = [_ray().put(cpu_state)]
        return cls(backbone.name, backbone.pretrained, backbone.preprocess, state)

    def load(self, device: str) -> Backbone:
        pretrained = None if self.state is not None else self.pretrained
        backbone = load_backbone(self.name, pretrained, device)
        if self.state is not None:
            backbone.model.load_state_dict(_ray().get(self.state[0]))
            backbone.pretrained = self.pretrained
        backbone.preprocess = self.preprocess
        return backbone


def _pool_options(num_workers: int | None, threads: int) -> tuple[int, dict[str, Any], str]:
    """(actors, per-actor resources, device): one actor per GPU when the cluster has GPUs, else
    one per `threads` CPUs."""
    ray = _ray()
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    if gpus:
        return num_workers or gpus, {"num_gpus": 1, "num_cpus": threads}, "cuda"
    return num_workers or max(1, int(resources.get("CPU", 1)) // threads), {"num_cpus": threads}, "cpu"


def _map(units: Sequence[int], worker: type, ctor: dict[str, Any], num_workers: int | None,
         threads: int, progress: bool) -> Iterator[dict[str, np.ndarray]]:
    """Stream the outputs of `worker` actors over work units (global batch numbers)."""
    ray = _ray()
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = progress
    size, resources, device = _pool_options(num_workers, threads)
    size = max(1, min(size, len(units)))
    # from_items keeps the input on the driver: no read tasks competing with the actors for CPUs.
    ds = ray.data.from_items([{"batch": int(b)} for b in units])
    ds = ds.map_batches(worker, batch_size=1, compute=ray.data.ActorPoolStrategy(size=size),
                        fn_constructor_kwargs={**ctor, "device": device, "threads": threads}, **resources)
    yield from ds.iter_batches(batch_size=None, batch_format="numpy")


# ---------------------------------------------------------------------------------- features
class _EncodeWorker:
    """Actor: image features of global batches (strict like `extract_features`, or gallery mode)."""

    def __init__(self, spec: BackboneSpec, items: list, batch_size: int, gallery: bool, thumbnails: bool,
                 device: str, threads: int, skip: bool = False, decode: str = "robust") -> None:
        set_threads(threads, faiss_threads=None)
        self.backbone = spec.load(device)
        self.items = _ray().get(items[0])
        self.batch_size, self.gallery, self.thumbnails = batch_size, gallery, thumbnails
        self.skip, self.decode = skip or gallery, decode

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out: dict[str, list] = {"row": [], "ok": [], "features": [], "thumb": [], "error": []}
        dim = self.backbone.embed_dim
        for b in batch["batch"].tolist():
            start = b * self.batch_size
            chunk = self.items[start : start + self.batch_size]
            sources = [item[1] for item in chunk] if self.gallery else chunk
            thumbs: dict[int, bytes] = {}

            def keep_thumbnail(row: int, source: Any, image: Any, thumbs: dict[int, bytes] = thumbs) -> None:
                if self.thumbnails and not isinstance(source, (str, Path)):
                    thumbs[row] = thumbnail_jpeg(image)

            rows, feats, bad = next(embed_images(self.backbone, sources, len(sources), 0, False,
                                                 skip_unreadable=self.skip, on_image=keep_thumbnail,
                                                 decode=self.decode))
            by_row = {r: j for j, r in enumerate(rows)}
            errors = dict(bad)
            for r in range(len(chunk)):
                ok = r in by_row
                out["row"].append(start + r)
                out["ok"].append(ok)
                out["features"].append(feats[by_row[r]].numpy() if ok else np.zeros(dim, np.float32))
                out["error"].append(errors.get(r, ""))
                out["thumb"].append(thumbs.get(r, b"") if ok else b"")
        return {"row": np.asarray(out["row"], np.int64), "ok": np.asarray(out["ok"], bool),
                "features": np.stack(out["features"]).astype(np.float32),
                "thumb": np.asarray(out["thumb"], dtype=object), "error": np.asarray(out["error"], dtype=object)}


def _encode(backbone: Backbone, items: Sequence, batch_size: int, gallery: bool, thumbnails: bool,
            num_workers: int | None, threads: int, progress: bool, skip: bool = False,
            decode: str = "robust") -> dict[str, np.ndarray]:
    ray = _ray()
    n_batches = (len(items) + batch_size - 1) // batch_size
    ctor = {"spec": BackboneSpec.of(backbone), "items": [ray.put(list(items))], "batch_size": batch_size,
            "gallery": gallery, "thumbnails": thumbnails, "skip": skip, "decode": decode}
    parts = list(_map(range(n_batches), _EncodeWorker, ctor, num_workers, threads, progress))
    merged = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    order = np.argsort(merged["row"], kind="stable")
    return {k: v[order] for k, v in merged.items()}


def ray_extract_features(backbone: Backbone, items: Sequence, batch_size: int = 64, *,
                         address: str | None = None, num_workers: int | None = None, threads: int = 1,
                         progress: bool = True) -> torch.Tensor:
    """Un-normalised image features [N, D] of paths or image callables, on Ray; equals `extract_features`."""
    with ray_session(address, num_workers, threads):
        out = _encode(backbone, items, batch_size, False, False, num_workers, threads, progress)
    return torch.from_numpy(out["features"])


def ray_build_gallery_index(
    backbone: Backbone,
    images: Sequence[tuple[Any, Any, Mapping[str, Any] | None]],
    batch_size: int = 64,
    config: IndexConfig | None = None,
    index: GalleryIndex | None = None,
    *,
    address: str | None = None,
    num_workers: int | None = None,
    threads: int = 1,
    thumbnails: str | Path | None = None,
    progress: bool = True,
    decode: str = "robust",
) -> GalleryIndex:
    """`build_gallery_index` with the embedding on Ray Data; the same index, ids and metadata.

    Thumbnails (for items without a file) are encoded on the workers and written by the driver, so
    a cluster needs no shared filesystem.
    """
    from isearle.indexing import items_and_index

    items, index = items_and_index(backbone, images, index, config, decode)
    with ray_session(address, num_workers, threads):
        out = _encode(backbone, items, batch_size, True, thumbnails is not None, num_workers, threads, progress,
                      decode=decode)
    thumb_dir = Path(thumbnails) / "thumbs" if thumbnails is not None else None
    if thumb_dir is not None:
        thumb_dir.mkdir(parents=True, exist_ok=True)
    offset = len(index)
    skipped = list(index.info.get("skipped", []))
    # Add batch by batch, as the single-process path does (same features, same FAISS adds).
    for start in range(0, len(items), batch_size):
        rows = [r for r in range(start, min(start + batch_size, len(items))) if out["ok"][r]]
        for r in range(start, min(start + batch_size, len(items))):
            if not out["ok"][r]:
                log.warning("skipped %s: %s", items[r][0], out["error"][r])
                skipped.append(items[r][0])
        if not rows:
            continue
        metas = []
        for r in rows:
            meta = items[r][2]
            if thumb_dir is not None and out["thumb"][r]:
                name = f"{offset + r:07d}.jpg"
                write_bytes(thumb_dir / name, out["thumb"][r])
                meta = {**meta, "thumbnail": f"thumbs/{name}"}
            metas.append(meta)
        feats = torch.nn.functional.normalize(torch.from_numpy(out["features"][rows]).float(), dim=-1)
        index.add(feats, [items[r][0] for r in rows], metas)
    if skipped:
        index.info["skipped"] = skipped
    return index


# --------------------------------------------------------------------------------------- OTI
class _OTIWorker:
    """Actor: OTI of global batches, batch b seeded with config.seed + b (as `invert_dataset`)."""

    def __init__(self, spec: BackboneSpec, payload: list, device: str, threads: int) -> None:
        set_threads(threads, faiss_threads=None)
        self.backbone = spec.load(device)
        p = _ray().get(payload[0])
        self.features, self.tasks, self.init = p["features"], p["tasks"], p["init"]
        self.config: OTIConfig = p["config"]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows, batches, tokens, losses = [], [], [], []
        bs = self.config.batch_size
        for b in batch["batch"].tolist():
            sl = slice(b * bs, (b + 1) * bs)
            cfg = OTIConfig(**{**asdict(self.config), "seed": self.config.seed + b})
            hist: list[float] = []
            t = invert(self.backbone, self.features[sl], cfg, None if self.tasks is None else self.tasks[sl],
                       None if self.init is None else self.init[sl], history=hist)
            n = t.shape[0]
            rows.append(np.arange(b * bs, b * bs + n))
            batches.append(np.full(n, b))
            tokens.append(t.detach().cpu().numpy())
            losses.append(np.full(n, hist[-1] if hist else np.nan))
        return {"row": np.concatenate(rows), "batch": np.concatenate(batches),
                "tokens": np.concatenate(tokens).astype(np.float32), "loss": np.concatenate(losses)}


def ray_oti(
    backbone: Backbone,
    ids: Sequence[str],
    items: Sequence,
    out_dir: str | Path,
    config: OTIConfig | None = None,
    concepts: object | None = None,
    phrase_bank: Mapping[str, Sequence[str]] | None = None,
    init_phi: torch.nn.Module | None = None,
    store_top_k: int = 150,
    batch_size: int = 64,
    *,
    address: str | None = None,
    num_workers: int | None = None,
    threads: int = 1,
    progress: bool = True,
    decode: str = "robust",
) -> tuple[list[str], torch.Tensor]:
    """`isearle.oti_runs.invert_images` on Ray Data: same files in `out_dir`, same tokens, resumable;
    unreadable images skipped and recorded as there.

    Features are extracted by an actor pool (`batch_size` images per unit), concepts, phrase tasks
    and the phi warm start are computed on the driver, then OTI batches (`config.batch_size`) run
    on a second actor pool; the driver writes each finished batch's shard.
    """
    config = config or OTIConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ids = [str(i) for i in ids]
    with ray_session(address, num_workers, threads):
        def extract() -> tuple[list[int], torch.Tensor, list[tuple[int, str]]]:
            got = _encode(backbone, items, batch_size, False, False, num_workers, threads, progress, skip=True,
                          decode=decode)
            ok = got["ok"].tolist()
            bad = [(r, str(got["error"][r])) for r, good in enumerate(ok) if not good]
            check_unreadable([(ids[r], e) for r, e in bad], len(ids))
            rows = [r for r, good in enumerate(ok) if good]
            return rows, torch.from_numpy(got["features"][rows]), bad

        ids, features, tasks, init, skipped = prepare_run(backbone, ids, out, extract, config, concepts, phrase_bank,
                                                          init_phi, store_top_k)
        write_run_config(out, config, backbone, decode=decode, unreadable=skipped)
        bs = config.batch_size
        n_batches = (len(ids) + bs - 1) // bs
        pending = [b for b in range(n_batches) if not shard_done(out, b, ids[b * bs : (b + 1) * bs])]
        if pending:
            payload = {"features": features, "tasks": tasks, "init": init, "config": config}
            ctor = {"spec": BackboneSpec.of(backbone), "payload": [_ray().put(payload)]}
            got: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}
            for part in _map(pending, _OTIWorker, ctor, num_workers, threads, progress):
                for b in np.unique(part["batch"]).tolist():
                    sel = part["batch"] == b
                    got.setdefault(b, []).append((part["row"][sel], part["tokens"][sel]))
                    rows = np.concatenate([r for r, _ in got[b]])
                    if len(rows) == min(bs, len(ids) - b * bs):
                        _write_shard(out, b, ids, got.pop(b))
    return load_tokens(out)


def _write_shard(out: Path, b: int, ids: Sequence[str], parts: list[tuple[np.ndarray, np.ndarray]]) -> None:
    """The shard file of `invert_dataset` for batch b (written atomically)."""
    rows = np.concatenate([r for r, _ in parts])
    tokens = np.concatenate([t for _, t in parts])[np.argsort(rows)]
    rows = np.sort(rows)
    save_shard(out, b, [ids[r] for r in rows.tolist()], torch.from_numpy(np.ascontiguousarray(tokens)))
