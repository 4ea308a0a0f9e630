"""Numeric precision of the query path: fp32, or bf16 where the CPU computes it natively.

At batch 1 the text tower is bound by reading its weights; bf16 halves those bytes and CPUs with
AVX512-BF16 or AMX multiply bf16 natively, so a query's text pass gets faster there. Elsewhere bf16
is emulated and slower (and without AMX it may not pay even where native), and a model may be
sensitive to it: `auto` measures both at start-up, for the text pass and the image encoder
separately, and keeps bf16 for each only when it is faster AND agrees with fp32 (cosine >= 0.999);
the measurement is `isearle.tuning`'s, this module holds the vocabulary.
Training, OTI and evaluation stay fp32 unless asked otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
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


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The autocast context of a precision: "bf16" -> bf16 autocast; "fp16" -> fp16 on CUDA (none on
    CPU); "fp32" -> none."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision not in ("fp16", "fp32"):
        raise ValueError(f"unknown precision {precision!r}: use fp16, fp32 or bf16")
    return torch.autocast("cuda", dtype=torch.float16, enabled=device.type == "cuda" and precision == "fp16")


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
