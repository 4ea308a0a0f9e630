"""Numeric precision of the query path: fp32, or bf16 where the CPU computes it natively.

At batch 1 the text tower is bound by reading its weights; bf16 halves those bytes and CPUs with
AVX512-BF16 or AMX multiply bf16 natively, so a query's text pass gets faster there. Elsewhere bf16
is emulated and slower (and without AMX it may not pay even where native), and a model may be
sensitive to it: `auto` measures both at start-up, for the text pass and the image encoder
separately, and keeps bf16 for each only when it is faster AND agrees with fp32 (cosine >= 0.999).
Training, OTI and evaluation use the compute precisions below (`COMPUTE_PRECISIONS`: fp32, bf16,
fp16 = SEARLE's fp16 autocast + GradScaler), with the autocast and GradScaler helpers they share;
the start-up measurement is `isearle.tuning`'s, this module holds the vocabulary.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16")
#: The query path's default (app, `isearle query`, benches); evaluation and OTI stay fp32.
DEFAULT_PRECISION = "auto"
PRECISION_HELP = ("numbers of the query path: bf16 (half the bytes per weight; fast on CPUs with AVX512-BF16/AMX), "
                  "fp32, or auto: measure both at start-up, for the text pass and the image encoder separately, and "
                  "keep bf16 for each only if faster and its feature agrees with fp32's (cosine >= 0.999); also ONNX "
                  "Runtime for warm captions where installed and faster")
#: bf16 is kept by `auto` only when its query feature has at least this cosine to fp32's.
MIN_COSINE = 0.999


def cpu_features() -> dict[str, bool]:
    """The CPU's bf16-related flags (/proc/cpuinfo) and whether oneDNN runs bf16 natively here."""
    flags: set[str] = set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    try:
        onednn = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        onednn = False
    names = ("avx512_bf16", "amx_bf16", "amx_tile", "avx512f")
    return {**{n: n in flags for n in names}, "onednn_bf16": onednn}


def bf16_native(device: torch.device | str = "cpu") -> bool:
    """Whether bf16 matrix products are native on this device (else `auto` never tries bf16)."""
    device = torch.device(device)
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    f = cpu_features()
    return f["onednn_bf16"] and (f["avx512_bf16"] or f["amx_bf16"])


@dataclass
class PrecisionChoice:
    """What `choose` decided and the measurement behind it."""

    precision: str
    reason: str
    fp32_ms: float = float("nan")
    bf16_ms: float = float("nan")
    cosine: float = float("nan")

    def __str__(self) -> str:
        return self.reason


def parse_precision(value: str) -> str:
    """argparse type of a precision setting (flag or environment variable)."""
    if value not in PRECISIONS:
        raise argparse.ArgumentTypeError(f"unknown precision {value!r}: use one of {', '.join(PRECISIONS)}")
    return value


def add_precision_argument(p: argparse.ArgumentParser, default: str = DEFAULT_PRECISION) -> None:
    """The `--precision auto|fp32|bf16` option, declared once for the CLI and the benchmarks."""
    p.add_argument("--precision", choices=PRECISIONS, default=default, help=PRECISION_HELP)


# ------------------------------------------------------------------ compute precision (training, OTI, eval)
#: The compute precisions of training, OTI and evaluation, one meaning everywhere: "fp32" (all fp32),
#: "bf16" (bf16 autocast), "fp16" (fp16 autocast + GradScaler: SEARLE's mixed precision). The query
#: path adds "auto" (`PRECISIONS`). On CPU, "fp16" runs torch's CPU fp16 autocast where this torch
#: supports it (emulated: slower, for tests and parity checks) and fp32 otherwise, with a log line.
COMPUTE_PRECISIONS = ("fp32", "bf16", "fp16")
COMPUTE_PRECISION_HELP = ("fp32 (all fp32), bf16 (bf16 autocast) or fp16 (fp16 autocast + GradScaler, SEARLE's "
                          "mixed precision; on CPU torch's fp16 autocast where supported, else fp32); "
                          "default: fp16 on CUDA, fp32 on CPU")


def default_compute_precision(device: torch.device | str) -> str:
    """SEARLE's precision on a device: fp16 autocast + GradScaler on CUDA, fp32 on CPU."""
    return "fp16" if torch.device(device).type == "cuda" else "fp32"


def fp16_autocast_supported(device: torch.device | str) -> bool:
    """Whether torch runs fp16 autocast on this device (always on CUDA; CPU: checked once)."""
    device = torch.device(device)
    if device.type == "cuda":
        return True
    return _cpu_fp16_autocast()


@functools.lru_cache(maxsize=1)
def _cpu_fp16_autocast() -> bool:
    try:
        with torch.autocast("cpu", dtype=torch.float16):
            out = torch.ones(2, 2) @ torch.ones(2, 2)
        return out.dtype == torch.float16
    except (RuntimeError, TypeError, AssertionError):
        return False


def effective_precision(precision: str, device: torch.device | str) -> str:
    """What `precision` runs as on `device`: itself, or "fp32" for "fp16" where torch has no fp16
    autocast on that device (logged once per call site)."""
    if precision not in COMPUTE_PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}: use one of {', '.join(COMPUTE_PRECISIONS)}")
    if precision == "fp16" and not fp16_autocast_supported(device):
        log.warning("fp16 autocast is not supported on %s by this torch: running fp32", torch.device(device))
        return "fp32"
    return precision


def compute_autocast(device: torch.device | str, precision: str) -> contextlib.AbstractContextManager:
    """The autocast context of a compute precision on `device` (fp16 on CPU where torch supports it)."""
    device = torch.device(device)
    precision = effective_precision(precision, device)
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.float16 if precision == "fp16" else torch.bfloat16)


def grad_scaler(device: torch.device | str, precision: str) -> torch.amp.GradScaler:
    """SEARLE's GradScaler under fp16 autocast (fp16 gradients would underflow otherwise); a
    pass-through (disabled) scaler in fp32 and bf16."""
    device = torch.device(device)
    return torch.amp.GradScaler(device.type, enabled=effective_precision(precision, device) == "fp16")


def parse_compute_precision(value: str) -> str:
    """argparse type of a compute precision."""
    if value not in COMPUTE_PRECISIONS:
        raise argparse.ArgumentTypeError(f"unknown precision {value!r}: use one of {', '.join(COMPUTE_PRECISIONS)}")
    return value


def add_compute_precision_argument(p: argparse.ArgumentParser, flag: str = "--precision", default: str | None = None,
                                   help: str = COMPUTE_PRECISION_HELP) -> None:
    """The `--precision fp32|bf16|fp16` option of training, OTI, evaluation and indexing (None: the
    device's default, `default_compute_precision`)."""
    p.add_argument(flag, choices=COMPUTE_PRECISIONS, default=default, help=help)
