"""OTI runs on disk: invert a whole image set in resumable, verified shards and read the tokens back.

`isearle oti` and phi training's targets go through here; the per-batch optimisation itself is
`isearle.oti`. A run folder holds its settings (run.json) and one safetensors shard per batch, so a
killed run resumes at the first missing or damaged shard and refuses a folder made with other settings.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from isearle.artifacts import ArtifactError, display, load_tensors, read_json, save_tensors, write_json
from isearle.backbone import Backbone
from isearle.oti import OTIConfig, PhraseTask, invert, phrase_tasks

log = logging.getLogger(__name__)


def invert_dataset(
    backbone: Backbone,
    ids: Sequence[str],
    image_features: torch.Tensor,
    out_dir: str | Path,
    config: OTIConfig | None = None,
    tasks: Sequence[PhraseTask] | None = None,
    init: torch.Tensor | None = None,
    progress: bool = True,
    on_batch: Callable[[int, float], None] | None = None,
    recorded: Mapping[str, Any] | None = None,
) -> tuple[list[str], torch.Tensor]:
    """OTI over a whole dataset in batches, saved shard by shard so an interrupted run resumes.

    Each batch b is seeded with `config.seed + b`, so a resumed run gives the same tokens as an
    uninterrupted one. Shards are safetensors (tokens) + JSON (ids); `load_tokens` merges them.
    `recorded` settings (the decoding, the unreadable images) go into the run's config.json.
    """
    config = config or OTIConfig()
    out = Path(out_dir)
    write_run_config(out, config, backbone, **(recorded or {}))
    bs = config.batch_size
    n_batches = (len(ids) + bs - 1) // bs
    todo = [b for b in range(n_batches) if not shard_done(out, b, ids[b * bs : (b + 1) * bs])]
    if len(todo) < n_batches:
        log.info("resuming: %d of %d batches already inverted", n_batches - len(todo), n_batches)
    for b in tqdm(todo, desc="OTI batches", disable=not progress):
        sl = slice(b * bs, (b + 1) * bs)
        cfg = OTIConfig(**{**asdict(config), "seed": config.seed + b})
        hist: list[float] = []
        tokens = invert(backbone, image_features[sl], cfg, None if tasks is None else tasks[sl],
                        None if init is None else init[sl], history=hist)
        save_shard(out, b, ids[sl], tokens)
        if on_batch is not None:
            on_batch(b, hist[-1] if hist else float("nan"))
    return load_tokens(out)


def _remedy(out: Path) -> str:
    return f"run `isearle oti --out {display(out)}` again (it redoes what is missing or damaged)"


def write_run_config(out: Path, config: OTIConfig, backbone: Backbone, **recorded: Any) -> None:
    """Record a run's settings in out/config.json (the OTI settings, the precision the run computes in,
    the backbone, and `recorded`: e.g. the image decoding); a folder holding a run with other settings
    or another backbone is refused (its shards would mix two kinds of token)."""
    from isearle.oti import oti_precision

    data = json.loads(json.dumps({**asdict(config), "precision": oti_precision(backbone, config),
                                  "backbone": backbone.name, "pretrained": backbone.pretrained, **recorded}))
    path = out / "config.json"
    if path.is_file():
        try:
            old = read_json(path, "")
        except ArtifactError:
            old = None  # unreadable: the shards' own checks decide what is kept
        if isinstance(old, dict):
            diff = sorted(k for k in data if k not in ("batch_size", "unreadable") and k in old and old[k] != data[k])
            if diff:
                raise ArtifactError(out, f"holds an OTI run with other settings ({', '.join(diff)} differ)",
                                    "use a new --out folder, or the settings of that run")
            if old.get("batch_size", data["batch_size"]) != data["batch_size"] and any(out.glob("shard_*")):
                raise ArtifactError(out, f"holds an OTI run in batches of {old['batch_size']}",
                                    f"resume it with --batch-size {old['batch_size']}, or use a new --out folder")
            recorded = {k: old[k] for k in ("decode", "unreadable") if k in old and k not in data}
            data.update(recorded)
    write_json(path, data, indent=1)


def shard_path(out: Path, b: int) -> Path:
    return out / f"shard_{b:06d}.safetensors"


def save_shard(out: Path, b: int, ids: Sequence[str], tokens: torch.Tensor) -> None:
    """Batch b's tokens and ids, written atomically and with a checksum."""
    save_tensors(shard_path(out, b), {"tokens": tokens.float().cpu()}, "oti-shard", {"ids": json.dumps(list(ids))})


def shard_done(out: Path, b: int, ids: Sequence[str]) -> bool:
    """Whether batch b is finished: its shard is intact and holds `ids` (else it is redone)."""
    path = shard_path(out, b)
    if not path.exists():
        return False
    try:
        _, meta = load_tensors(path, "oti-shard", "")
        if json.loads(meta["ids"]) == list(ids):
            return True
        problem = "holds other images"
    except (ArtifactError, KeyError, ValueError) as err:
        problem = getattr(err, "problem", "is damaged")
    log.warning("%s %s: redoing batch %d", display(path), problem, b)
    return False


def load_tokens(out_dir: str | Path) -> tuple[list[str], torch.Tensor]:
    """Merge the shards written by `invert_dataset`: (ids, tokens [N, width])."""
    out = Path(out_dir)
    ids: list[str] = []
    tokens = []
    for shard in sorted(out.glob("shard_*.safetensors")):
        tensors, meta = load_tensors(shard, "oti-shard", _remedy(out))
        if "ids" not in meta or "tokens" not in tensors:
            raise ArtifactError(shard, "is not an OTI shard", _remedy(out))
        ids += json.loads(meta["ids"])
        tokens.append(tensors["tokens"])
    if not tokens:
        raise FileNotFoundError(f"no OTI shards in {out_dir}: run `isearle oti` first")
    return ids, torch.cat(tokens)


def prepare_run(
    backbone: Backbone,
    ids: Sequence[str],
    out_dir: str | Path,
    extract: Callable[[], torch.Tensor],
    config: OTIConfig,
    concepts: object | None = None,
    phrase_bank: Mapping[str, Sequence[str]] | None = None,
    init_phi: torch.nn.Module | None = None,
    store_top_k: int = 150,
) -> tuple[list[str], torch.Tensor, list[PhraseTask] | None, torch.Tensor | None, list[str]]:
    """What a dataset-scale OTI run needs before its batches: (ids read, their features, phrase tasks,
    warm start, ids of the images that could not be read).

    Writes features.safetensors (ids + un-normalised image features, from `extract()` unless a
    run over the same images is being resumed; `extract()` returns the features of every image, or
    `isearle.images.extract_readable`'s (rows read, features, unreadable)) and concepts.json (the top `store_top_k` concept
    names per image, what phi training reads next). Shared by the local and the Ray paths.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    feat_path = out / "features.safetensors"
    features = None
    if feat_path.exists():  # resuming: the stored features must be of the same images
        try:
            tensors, meta = load_tensors(feat_path, "oti-features", "")
            stored, features = json.loads(meta["ids"]), tensors["features"]
            skipped = json.loads(meta.get("unreadable", "[]"))
        except (ArtifactError, KeyError, ValueError) as err:
            log.warning("%s %s: extracting the features again", display(feat_path), getattr(err, "problem", "is damaged"))
        else:
            if stored != [i for i in ids if i not in set(skipped)]:
                raise ArtifactError(out, "holds an OTI run over other images", "use a new --out folder")
            ids = stored
    if features is None:
        got = extract()
        skipped = []
        if isinstance(got, tuple):  # (rows read, their features, [(row, reason)] unreadable)
            rows, features, bad = got
            skipped = [ids[r] for r, _ in bad]
            ids = [ids[r] for r in rows]
        else:
            features = got
        save_tensors(feat_path, {"features": features}, "oti-features",
                     {"ids": json.dumps(list(ids)), "unreadable": json.dumps(skipped)})
    tasks = None
    if concepts is not None:
        names = concepts.top_names(features, store_top_k)
        write_json(out / "concepts.json", dict(zip(ids, names, strict=True)))
        if phrase_bank is not None:
            tasks = phrase_tasks(names, phrase_bank, config.top_k_concepts, config.concept_match)
    init = None
    if init_phi is not None:
        with torch.inference_mode():
            init = init_phi(features.to(backbone.device)).cpu()
    return list(ids), features, tasks, init, skipped


def invert_images(
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
    progress: bool = True,
    decode: str = "robust",
) -> tuple[list[str], torch.Tensor]:
    """The dataset-scale OTI run: features, top concepts, then resumable OTI, all kept in `out_dir`.

    Images are decoded with `decode` (`isearle.images`); those that cannot be read are skipped,
    logged and listed in config.json ("unreadable"), and more than 1 % of them fail the run."""
    from isearle.images import extract_readable

    config = config or OTIConfig()
    ids, features, tasks, init, skipped = prepare_run(
        backbone, ids, out_dir,
        lambda: extract_readable(backbone, items, batch_size=batch_size, progress=progress, decode=decode),
        config, concepts, phrase_bank, init_phi, store_top_k)
    return invert_dataset(backbone, ids, features, out_dir, config, tasks, init, progress,
                          recorded={"decode": decode, "unreadable": skipped})


def load_run(out_dir: str | Path) -> tuple[list[str], torch.Tensor, torch.Tensor, list[list[str]] | None]:
    """(ids, image features, OTI tokens, top concepts per image or None) of an `isearle oti` run."""
    out = Path(out_dir)
    if not out.is_dir():
        raise FileNotFoundError(f"no OTI run in {out}: run `isearle oti --out {out}` first")
    tensors, meta = load_tensors(out / "features.safetensors", "oti-features", _remedy(out))
    feat_ids, features = json.loads(meta["ids"]), tensors["features"]
    ids, tokens = load_tokens(out)
    row = {i: r for r, i in enumerate(feat_ids)}
    missing = [i for i in ids if i not in row]
    if missing:
        raise ArtifactError(out / "features.safetensors", f"lacks the features of {len(missing)} inverted images",
                            "run OTI again in a new --out folder")
    features = features[[row[i] for i in ids]]
    concept_file = out / "concepts.json"
    concepts = None
    if concept_file.is_file():
        table = read_json(concept_file, _remedy(out))
        if not isinstance(table, dict) or any(i not in table for i in ids):
            raise ArtifactError(concept_file, "does not list the concepts of every image", _remedy(out))
        concepts = [table[i] for i in ids]
    return ids, features, tokens, concepts


#: The OTI settings its tokens depend on; phi records them (its JSON's "oti") and runs OTI with them.
TARGET_SETTINGS = ("steps", "gamma", "max_norm", "lambda_gpt", "templates")


def load_runs(out_dirs: Sequence[str | Path], backbone: Backbone | None = None
              ) -> tuple[list[str], torch.Tensor, torch.Tensor, list[list[str]] | None, dict[str, Any]]:
    """`load_run` of several runs, concatenated, and the OTI settings they share (`TARGET_SETTINGS`).

    Runs made with different settings are refused: phi would be distilled from two kinds of token;
    so are runs made with another backbone than `backbone` (when given).
    """
    runs, settings = [], None
    for out in map(Path, out_dirs):
        runs.append(load_run(out))
        config = out / "config.json"
        own = read_json(config, _remedy(out)) if config.is_file() else {}
        if backbone is not None and own.get("backbone") not in (None, backbone.name):
            raise ArtifactError(out, f"is an OTI run of {own.get('backbone')}/{own.get('pretrained')}, not "
                                f"{backbone.name}/{backbone.pretrained}", f"pass --model {own.get('backbone')} "
                                f"--pretrained {own.get('pretrained')}, or run OTI with this backbone")
        own = {k: own[k] for k in TARGET_SETTINGS if k in own}
        if settings is not None and own != settings:
            raise ValueError(f"OTI run {out} was made with {own}, the first run with {settings}: "
                             "distil phi from runs made with the same OTI settings")
        settings = own
    ids = [i for r in runs for i in r[0]]
    concepts = [c for r in runs for c in r[3]] if all(r[3] is not None for r in runs) else None
    return ids, torch.cat([r[1] for r in runs]), torch.cat([r[2] for r in runs]), concepts, settings or {}

