"""Resumable training: model, optimizer and random-number states in one verified file.

A training loop saves its state after each epoch (or every N steps) with `save_state`; a run
killed at any moment (`kill -9`) and started again calls `load_state`, which puts the weights, the
optimizer moments, the GradScaler's loss scale (fp16), torch's, Python's and numpy's generators
back where they were, so the resumed run draws the same batches and dropout masks and ends bit for
bit where an uninterrupted run ends (on CPU). The file belongs to one job (`job`: what the result depends on); another job's state,
or a damaged file, is ignored with a log line and training starts over.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from isearle.artifacts import ArtifactError, display, load_tensors, save_tensors

log = logging.getLogger(__name__)
KIND = "training-state"


def job_id(job: Mapping[str, Any]) -> str:
    """A digest of what a run's result depends on (settings, data digests)."""
    return hashlib.sha256(json.dumps(job, sort_keys=True, default=str).encode()).hexdigest()


def digest_rows(rows: Iterable[Any] | None) -> str | None:
    """A digest of a long list (concepts per image, phrase-bank items), hashed row by row."""
    if rows is None:
        return None
    h = hashlib.sha256()
    for row in rows:
        h.update(json.dumps(row, sort_keys=True, default=str).encode())
        h.update(b"\n")
    return h.hexdigest()


def save_state(path: str | Path, job: Mapping[str, Any], step: int, model: torch.nn.Module,
               optimizer: torch.optim.Optimizer, python_rng: random.Random | None = None,
               numpy_rng: np.random.Generator | None = None, extra: Any = None,
               scaler: torch.amp.GradScaler | None = None) -> None:
    """Write the state after `step` epochs/steps of `job`, atomically."""
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    opt = optimizer.state_dict()
    scalars: dict[str, dict[str, Any]] = {}
    for pid, state in opt["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"opt.{pid}.{key}"] = value
            else:
                scalars.setdefault(str(pid), {})[key] = value
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    meta = {"job": job_id(job), "step": step, "param_groups": opt["param_groups"], "scalars": scalars,
            "python": python_rng.getstate() if python_rng is not None else None,
            "numpy": numpy_rng.bit_generator.state if numpy_rng is not None else None, "extra": extra,
            "scaler": scaler.state_dict() if scaler is not None else {}}
    save_tensors(path, tensors, KIND, {"state": json.dumps(meta)})


def load_state(path: str | Path, job: Mapping[str, Any], model: torch.nn.Module,
               optimizer: torch.optim.Optimizer, python_rng: random.Random | None = None,
               numpy_rng: np.random.Generator | None = None,
               scaler: torch.amp.GradScaler | None = None) -> tuple[int, Any] | None:
    """Restore a saved state of `job` into the given objects: (step, extra), or None to start over."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        tensors, meta = load_tensors(path, KIND, "")
        state = json.loads(meta["state"])
    except (ArtifactError, KeyError, ValueError) as err:
        log.warning("%s %s: starting over", display(path), getattr(err, "problem", "is unreadable"))
        return None
    if state.get("job") != job_id(job):
        log.warning("%s is the state of another run (other data or settings): starting over", display(path))
        return None
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    opt_state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, pid, name = key.split(".", 2)
            opt_state.setdefault(int(pid), {})[name] = value
    for pid, values in state["scalars"].items():
        opt_state.setdefault(int(pid), {}).update(values)
    optimizer.load_state_dict({"state": opt_state, "param_groups": state["param_groups"]})
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    if python_rng is not None and state["python"] is not None:
        version, internal, gauss = state["python"]
        python_rng.setstate((version, tuple(internal), gauss))
    if numpy_rng is not None and state["numpy"] is not None:
        numpy_rng.bit_generator.state = state["numpy"]
    if scaler is not None and scaler.is_enabled() and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    log.info("%s: resuming after %d", display(path), state["step"])
    return int(state["step"]), state["extra"]
