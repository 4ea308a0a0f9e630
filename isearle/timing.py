"""Timing, declared once: interleaved wall-clock loops, medians and percentiles.

`--precision auto` (`isearle.tuning`), the benchmarks (bench/common.py) and the tests time code
the same way: the sides being compared are called in turn (A, B, A, B, ...) so that both see the
same machine load, optionally with a pause before each call as between a server's requests.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any


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


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def percentile(xs: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100), linear interpolation between the two nearest ranks."""
    s = sorted(xs)
    if len(s) == 1:
        return s[0]
    pos = (len(s) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)
