"""Shared helpers of the benchmarks: thread set-up, interleaved timing, result rows and tables.

Every benchmark returns rows {"bench", "case", "metric", "value", "unit", "goal", "note"} measured
in the same run, plus "goal rows" (`goal_row`): the goal table, one line per case with the
baseline, the faster path, their interleaved ratio and the goal. `finish` prints both; `run_all.py` runs
each benchmark in its own process and collects the rows into one table.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # the benchmarks run from a checkout, installed or not
    sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # random weights only: never wait for the hub
# OpenMP's wait policy is left as the user set it (the default, as in app.py and the CLI: threads
# spin briefly between parallel regions). Bench f measures the default against PASSIVE.

from isearle.timing import median, percentile, time_interleaved, timeit  # noqa: E402, F401  (re-exported for the benches)

Row = dict[str, Any]

#: Objects built once and reused within one benchmark process. A cache, so module state is fine here.
SHARED: dict[str, Any] = {}
#: Folder (set by run_all.py) where a benchmark leaves data for a later one, e.g. bench d's 100k index.
CACHE_ENV = "ISEARLE_BENCH_CACHE"


def cached_index_dir(kind: str, n: int) -> Path | None:
    """Where bench d leaves its n-vector `kind` index for bench c (None when run alone)."""
    root = os.environ.get(CACHE_ENV)
    return Path(root) / f"{kind}_{n}" if root else None


def setup_threads() -> int:
    """torch threads = the CPU quota; FAISS single-threaded (single queries), as in the service."""
    from isearle.runtime import set_threads

    return set_threads()


def interleaved(sides: dict[str, Callable[[], Any]], repeat: int, warmup: int = 1, pause: float = 0.0
                ) -> dict[str, list[float]]:
    """Seconds per call of each side after `warmup` untimed rounds (`timing.time_interleaved`:
    A, B, A, B, ..., `pause` seconds of sleep before each call)."""
    for _ in range(warmup):
        for fn in sides.values():
            fn()
    return time_interleaved(sides, repeat, pause)


def ratio(slow: list[float], fast: list[float]) -> tuple[float, float, float]:
    """Median of the paired ratios slow_i / fast_i and their 25th-75th percentile (the spread)."""
    pairs = [a / b for a, b in zip(slow, fast, strict=False) if b > 0]
    return median(pairs), percentile(pairs, 25), percentile(pairs, 75)


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


def goal_row(case: str, baseline: str, faster: str, goal: str, verdict: str, note: str = "") -> Row:
    """One line of the goal table: the case, the baseline and the faster path measured in the same
    process (interleaved), the goal and whether it is met."""
    return {"bench": "goal", "case": case, "baseline": baseline, "faster": faster, "goal": goal, "verdict": verdict,
            "note": note, "load": load_line()}


def ratio_text(r: tuple[float, float, float]) -> str:
    return f"{r[0]:.2f}x (IQR {r[1]:.2f}-{r[2]:.2f})"


def goal_table(rows: list[Row]) -> str:
    """The goal table (Markdown) from the goal rows among `rows`."""
    lines = ["| case | baseline | faster path | goal | verdict | load (1/5/15 min) |", "|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("bench") == "goal":
            note = f" ({r['note']})" if r.get("note") else ""
            lines.append(f"| {r['case']} | {r['baseline']} | {r['faster']} | {r['goal']} | {r['verdict']}{note} | {r['load']} |")
    return "\n".join(lines)


def print_table(rows: list[Row], title: str = "") -> None:
    if title:
        print(f"\n## {title}\n")
    goals = [r for r in rows if r.get("bench") == "goal"]
    if goals:
        print(goal_table(goals) + "\n", flush=True)
    print(table([r for r in rows if r.get("bench") != "goal"]), flush=True)


#: When set (by run_all.py), a benchmark run as a script also writes its rows to this JSON file.
ROWS_ENV = "ISEARLE_BENCH_ROWS"


def finish(rows: list[Row], title: str) -> None:
    """End of a benchmark script: print its tables; hand the rows to run_all.py when it asks."""
    print_table(rows, title)
    out = os.environ.get(ROWS_ENV)
    if out:
        Path(out).write_text(json.dumps(rows))


def cpu_flags() -> str:
    """The CPU's bf16/AMX flags (what `--precision auto` can use), e.g. "avx512_bf16 (no AMX)"."""
    from isearle.precision import cpu_features

    f = cpu_features()
    have = [k for k in ("avx512_bf16", "amx_bf16", "amx_tile") if f.get(k)]
    amx = "" if f.get("amx_bf16") else " (no AMX)"
    return (", ".join(have) or "no bf16 instructions") + amx + f"; oneDNN bf16 {'yes' if f.get('onednn_bf16') else 'no'}"


def load_line() -> str:
    """The machine's load average now, e.g. "1.2/0.9/0.8 on 2 cores"."""
    from isearle.runtime import cpu_quota

    if not hasattr(os, "getloadavg"):
        return "n/a"
    return "{:.1f}/{:.1f}/{:.1f}".format(*os.getloadavg()) + f" on {cpu_quota()} cores"


def check_load(what: str = "") -> str:
    """Log the load (and warn when it exceeds the cores: absolute times are then inflated)."""
    from isearle.runtime import cpu_quota

    line = load_line()
    busy = hasattr(os, "getloadavg") and os.getloadavg()[0] > cpu_quota()
    log(f"{what}load {line}" + ("  WARNING: load > cores, absolute times are inflated; trust the ratios"
                               if busy else ""))
    return line


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

    return (f"{cpu} ({cpu_flags()}), {cpu_quota()} cores for this process{mem}{load}; "
            f"Python {platform.python_version()}, torch {torch.__version__}, faiss {faiss.__version__}, "
            f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def parse_args(parser: Any, argv: list[str] | None, quick: dict[str, Any]) -> Any:
    """`parser.parse_args(argv)` with a `--quick` flag: `quick` replaces the defaults (tiny sizes that
    check the bench runs end to end, in seconds; its numbers are not results); flags given win."""
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes: checks that the bench runs; the numbers are not results")
    args = parser.parse_args(argv)
    if args.quick:
        parser.set_defaults(**quick)
        args = parser.parse_args(argv)
    return args
