"""Numeric precision of the query path: fp32, or bf16 where the CPU computes it natively.

At batch 1 the text tower is bound by reading its weights; bf16 halves those bytes and CPUs with
AVX512-BF16 or AMX multiply bf16 natively, so a query's text pass gets faster there. Elsewhere bf16
is emulated and slower (and without AMX it may not pay even where native), and a model may be
sensitive to it: `auto` measures both at start-up, for the text pass and the image encoder
separately, and keeps bf16 for each only when it is faster AND agrees with fp32 (cosine >= 0.999).
Training, OTI and evaluation stay fp32 unless asked otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

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


def time_interleaved(sides: dict[str, Callable[[], object]], repeat: int, pause: float = 0.0
                     ) -> dict[str, list[float]]:
    """Seconds per call of each side, timed in turn (A, B, A, B, ...) so that both see the same load;
    `pause` seconds of sleep (untimed) before each call, as between a server's requests, so that
    one side's worker threads still spinning after its call do not slow the next side's."""
    times: dict[str, list[float]] = {k: [] for k in sides}
    for _ in range(repeat):
        for k, fn in sides.items():
            if pause:
                time.sleep(pause)
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    return times


def median_ms(sides: dict[str, Callable[[], object]], repeat: int, pause: float = 0.0) -> dict[str, float]:
    """Median milliseconds per call of each side (`time_interleaved`)."""
    return {k: statistics.median(v) * 1e3 for k, v in time_interleaved(sides, repeat, pause).items()}


def choose(requested: str, encode: Callable[[str], torch.Tensor], native: bool, repeat: int = 7,
           min_cosine: float = MIN_COSINE) -> PrecisionChoice:
    """Resolve `requested` ("auto", "fp32", "bf16") with `encode(precision) -> feature`.

    "auto" times both precisions interleaved (fp32, bf16, fp32, ...) on the same query after one
    untimed call each, and keeps bf16 only if its median is lower and cos(bf16, fp32) >= min_cosine.
    """
    if requested not in PRECISIONS:
        raise ValueError(f"unknown precision {requested!r}: use one of {', '.join(PRECISIONS)}")
    if requested != "auto":
        return PrecisionChoice(requested, f"{requested} (asked for)")
    if not native:
        return PrecisionChoice("fp32", "fp32 (auto: no native bf16 on this device)")
    ref, low = encode("fp32").float(), encode("bf16").float()  # also warms both paths up
    cosine = float(F.cosine_similarity(ref.flatten(), low.flatten(), dim=0))
    ms = median_ms({p: lambda p=p: encode(p) for p in ("fp32", "bf16")}, repeat)
    fp32_ms, bf16_ms = ms["fp32"], ms["bf16"]
    measured = f"fp32 {fp32_ms:.1f} ms, bf16 {bf16_ms:.1f} ms, cosine {cosine:.5f}"
    if cosine < min_cosine:
        pick, why = "fp32", f"bf16 disagrees with fp32 (cosine < {min_cosine})"
    elif bf16_ms >= fp32_ms:
        pick, why = "fp32", "bf16 is not faster"
    else:
        pick, why = "bf16", "bf16 is faster and agrees"
    choice = PrecisionChoice(pick, f"{pick} (auto: {why}; {measured})", fp32_ms, bf16_ms, cosine)
    log.info("precision: %s", choice)
    return choice


def parse_precision(value: str) -> str:
    """argparse type of a precision setting (flag or environment variable)."""
    if value not in PRECISIONS:
        raise argparse.ArgumentTypeError(f"unknown precision {value!r}: use one of {', '.join(PRECISIONS)}")
    return value


def add_precision_argument(p: argparse.ArgumentParser, default: str = DEFAULT_PRECISION) -> None:
    """The `--precision auto|fp32|bf16` option, declared once for the CLI and the benchmarks."""
    p.add_argument("--precision", choices=PRECISIONS, default=default, help=PRECISION_HELP)
