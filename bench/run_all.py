"""Run every benchmark (a-f, h), each in a fresh Python process, and print the goal table and all rows.

    python bench/run_all.py [--quick] [--only a b ...] [--markdown docs/performance-results.md]

Each benchmark runs as its own script (`python bench/bench_text.py ...`) in a new process, exactly
as when run alone: nothing one leaves behind (torch/OpenMP thread pools and their settings, a Ray
runtime, memory, warmed caches) can slow the next. The children write their rows to a JSON file
(ISEARLE_BENCH_ROWS); bench c reuses bench d's 100k gallery through a shared folder on disk
(ISEARLE_BENCH_CACHE). Results are measured, never stored: the tables printed are this run's,
headed by the command, the date, the machine, its CPU's bf16/AMX flags and the load before, between
and after benches. The exit status is 1 when a bench failed (its error is a row of the table).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import CACHE_ENV, REPO, ROWS_ENV, Row, check_load, goal_table, log, machine, row, table  # noqa: E402

#: key -> (module, title); the order is the run order (d builds the gallery that c reuses).
BENCHES = {
    "a": ("bench.bench_text", "text encoding: truncated context, fp32 vs bf16"),
    "b": ("bench.bench_oti", "OTI steps per second, SEARLE vs isearle; phi warm start"),
    "d": ("bench.bench_search", "search: flat vs approximate indexes at 100k and 1M"),
    "c": ("bench.bench_query", "composed query latency, 100k gallery"),
    "e": ("bench.bench_index", "gallery indexing throughput"),
    "f": ("bench.bench_openmp", "OpenMP wait policy: default vs PASSIVE, child processes alternating"),
    "h": ("bench.precision_table", "ShapesCIR accuracy of bf16 queries against fp32"),
}


def run_bench(module: str, argv: list[str], env: dict[str, str] | None = None, timeout: float | None = None
              ) -> tuple[list[Row], int, str]:
    """Run `python -m module argv` in a new process; (its rows, exit code, last lines of its stderr)."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = Path(f.name)
    child_env = {**os.environ, **(env or {}), ROWS_ENV: str(out)}
    child_env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), child_env.get("PYTHONPATH", "")) if p)
    try:
        proc = subprocess.run([sys.executable, "-m", module, *argv], cwd=REPO, env=child_env, timeout=timeout,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        for line in proc.stderr.splitlines():  # the child's progress log, passed through
            print(line, file=sys.stderr, flush=True)
        text = out.read_text() if out.stat().st_size else "[]"
        return json.loads(text), proc.returncode, "\n".join(proc.stderr.splitlines()[-3:])
    finally:
        out.unlink(missing_ok=True)


def main(argv: list[str] | None = None, benches: dict[str, tuple[str, str]] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    benches = benches or BENCHES
    p.add_argument("--only", nargs="+", choices=list(benches), help="run only these benches")
    p.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test of the scripts, not results)")
    p.add_argument("--markdown", type=Path, help="also write the tables (and the machine line) to this file")
    args = p.parse_args(argv)
    start = time.perf_counter()
    started = time.strftime("%Y-%m-%d %H:%M", time.gmtime())
    before = machine()
    rows: list[Row] = []
    timings, loads, failed = [], [], []
    with tempfile.TemporaryDirectory(prefix="isearle-bench-cache-") as cache:
        for key, (module, title) in benches.items():
            if args.only and key not in args.only:
                continue
            loads.append(f"{key}: {check_load(f'== {key}. {title}; ')}")
            bench_argv = ["--quick"] if args.quick else []
            t = time.perf_counter()
            got, rc, tail = run_bench(module, bench_argv, {CACHE_ENV: cache})
            rows += got
            if rc != 0:  # one failing bench must not hide the others' results
                log(f"bench {key} exited with {rc}")
                failed.append(key)
                rows.append(row(f"{key} error", title, f"exit code {rc}", tail.replace("|", "/")[-160:]))
            timings.append(f"{key} {time.perf_counter() - t:.0f} s")
    total = time.perf_counter() - start
    after = "{:.1f}/{:.1f}/{:.1f}".format(*os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    command = " ".join(["python bench/run_all.py", *(argv if argv is not None else sys.argv[1:])])
    header = [f"<!-- written by `{command}`: regenerate it, do not edit it -->", "",
              f"Command: `{command}`  ", f"Date: {started}-{time.strftime('%H:%M', time.gmtime())} UTC  ",
              f"Machine: {before}  ", f"Load (1/5/15 min) at the start of each bench: {'; '.join(loads)}; "
              f"after the run: {after}  ",
              f"Total {total:.0f} s ({', '.join(timings)}), each bench in its own process"
              f"{' [--quick: a smoke test, not results]' if args.quick else ''}"]
    text = ("\n".join(header) + "\n\n### Goals\n\n" + goal_table(rows) + "\n\n### All rows\n\n"
            + table([r for r in rows if r.get("bench") != "goal"]))
    print("\n" + text, flush=True)
    if args.markdown:
        args.markdown.write_text(text + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
