"""Shared helpers of the benchmarks: thread set-up, timing, result rows and the printed table.

Every benchmark returns rows {"bench", "case", "metric", "value", "unit", "goal", "note"} measured
in the same run; `print_table` prints them, `run_all.py` collects all of them into one table.
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # the benchmarks run from a checkout, installed or not
    sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # random weights only: never wait for the hub
# Before torch/faiss load their OpenMP runtimes: idle OpenMP threads sleep instead of spinning. On
# a 2-core machine shared with other work, spinning threads of torch's and faiss's two runtimes
# steal the cores the computing thread needs (measured here: 2-thread text encoding ~6x slower
# with the default policy under load). OMP_WAIT_POLICY=ACTIVE in the environment restores it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

Row = dict[str, Any]

#: Objects built by one benchmark and reused by another in the same process (run_all.py), e.g. the
#: 100k-vector HNSW index of bench_search for bench_query. A cache, so module state is fine here.
SHARED: dict[str, Any] = {}


def setup_threads() -> int:
    """torch threads = the CPU quota; FAISS single-threaded (single queries), as in the service."""
    from isearle.runtime import set_threads

    return set_threads()


def timeit(fn: Callable[[], Any], repeat: int, warmup: int = 1) -> list[float]:
    """Wall-clock seconds of `repeat` calls of `fn` after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def percentile(xs: list[float], q: float) -> float:
    """The q-th percentile (0-100), linear interpolation."""
    s = sorted(xs)
    if len(s) == 1:
        return s[0]
    pos = (len(s) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def row(bench: str, case: str, metric: str, value: float | str, unit: str = "", goal: str = "",
        note: str = "") -> Row:
    return {"bench": bench, "case": case, "metric": metric, "value": value, "unit": unit, "goal": goal,
            "note": note}


def fmt(value: float | str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, int):
        return f"{value:,}"
    if value != value:  # NaN
        return "n/a"
    a = abs(value)
    if a >= 1000:
        return f"{value:,.0f}"
    if a >= 100:
        return f"{value:.0f}"
    if a >= 10:
        return f"{value:.1f}"
    if a >= 0.01 or a == 0:
        return f"{value:.2f}"
    return f"{value:.1e}"


def table(rows: list[Row]) -> str:
    """A Markdown table of result rows."""
    lines = ["| bench | case | metric | value | goal | note |", "|---|---|---|---|---|---|"]
    for r in rows:
        value = f"{fmt(r['value'])} {r['unit']}".strip()
        lines.append(f"| {r['bench']} | {r['case']} | {r['metric']} | {value} | {r['goal']} | {r['note']} |")
    return "\n".join(lines)


def print_table(rows: list[Row], title: str = "") -> None:
    if title:
        print(f"\n## {title}\n")
    print(table(rows), flush=True)


def machine() -> str:
    """One line about the machine: CPU model, cores available, memory, load, library versions."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f", {kb / 2**20:.0f} GiB RAM"
    except (OSError, ValueError, IndexError):
        pass
    load = ""
    if hasattr(os, "getloadavg"):
        load = ", load avg {:.1f}/{:.1f}/{:.1f}".format(*os.getloadavg())
    import faiss

    from isearle.runtime import cpu_quota

    return (f"{cpu}, {cpu_quota()} cores for this process{mem}{load}; Python {platform.python_version()}, "
            f"torch {torch.__version__}, faiss {faiss.__version__}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)
