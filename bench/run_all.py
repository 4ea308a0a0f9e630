"""Run every benchmark (a-e) on this machine and print one table of medians and ratios.

    python bench/run_all.py [--quick] [--only a b ...] [--markdown results.md]

Each bench also runs alone (python bench/bench_text.py, ...). Run in one process, so bench c
reuses the 100k-vector gallery that bench d built. Results are measured, never stored: the table
printed is this run's. The machine, its load before and after, and the total time are printed too.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import Row, log, machine, row, table  # noqa: E402  (sets up the environment first)

BENCHES = {
    "a": ("bench.bench_text", "text encoding: truncated vs full context"),
    "b": ("bench.bench_oti", "OTI steps per second, SEARLE vs isearle; phi warm start"),
    "d": ("bench.bench_search", "search: flat vs HNSW vs IVF-PQ at 100k and 1M"),
    "c": ("bench.bench_query", "composed query latency, 100k gallery"),
    "e": ("bench.bench_index", "gallery indexing throughput"),
}
QUICK = {
    "a": ["--repeat", "2"],
    "b": ["--searle-steps", "2", "--fast-steps", "3", "--no-warm-start"],
    "d": ["--sizes", "20000", "--queries", "10"],
    "c": ["--warm", "10", "--cold", "3"],
    "e": ["--images", "16"],
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="+", choices=list(BENCHES), help="run only these benches")
    p.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test of the scripts, not results)")
    p.add_argument("--markdown", type=Path, help="also write the table (and the machine line) to this file")
    args = p.parse_args(argv)
    import importlib

    start = time.perf_counter()
    before = machine()
    rows: list[Row] = []
    timings = []
    for key, (module, title) in BENCHES.items():
        if args.only and key not in args.only:
            continue
        log(f"== {key}. {title}")
        t = time.perf_counter()
        try:
            bench_argv = QUICK[key] if args.quick else []
            if key == "c" and args.quick and "d" in (args.only or BENCHES):
                from bench import bench_query

                bench_query.GALLERY = 20_000  # the gallery bench d built in quick mode
            rows += importlib.import_module(module).main(bench_argv)
        except Exception as err:  # one failing bench must not hide the others' results
            traceback.print_exc()
            rows.append(row(f"{key} error", title, type(err).__name__, str(err)[:120]))
        timings.append(f"{key} {time.perf_counter() - t:.0f} s")
    total = time.perf_counter() - start
    header = [f"Machine: {before}", f"After the run: load avg {'{:.1f}/{:.1f}/{:.1f}'.format(*os.getloadavg())}",
              f"Total {total:.0f} s ({', '.join(timings)}){' [--quick]' if args.quick else ''}"]
    text = "\n".join(header) + "\n\n" + table(rows)
    print("\n" + text, flush=True)
    if args.markdown:
        args.markdown.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
