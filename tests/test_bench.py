"""The benchmarks: each one runs end to end in `--quick` mode (a broken bench fails the build), and
bench/run_all.py runs each in a fresh process (what it gives alone) and writes the results page."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench import run_all  # noqa: E402

PROBE = '''
import json, os, threading, time
import torch
from bench.common import finish, goal_row, row

def main(argv=None):
    state = {"pid": os.getpid(), "torch_threads": torch.get_num_threads(),
             "py_threads": threading.active_count(), "left_behind": hasattr(torch, "_probe_was_here")}
    # what a benchmark may leave behind: thread settings, a live thread, module state
    torch.set_num_threads(1)
    torch._probe_was_here = True
    threading.Thread(target=time.sleep, args=(60,), daemon=True).start()
    return [row("probe", "state", json.dumps(state), 1.0),
            goal_row("probe case", "10 ms", "5 ms", "<= 6 ms", "met", "2.00x (IQR 1.9-2.1)")]

if __name__ == "__main__":
    finish(main(), "probe")
'''


def test_run_all_runs_each_bench_in_a_fresh_process(tmp_path, monkeypatch):
    """Two probe benches: the second finds nothing the first left behind; a failing bench before
    them is reported as a row, does not stop the run, and makes its exit status 1."""
    (tmp_path / "probe_bench.py").write_text(PROBE)
    (tmp_path / "broken_bench.py").write_text("raise SystemExit('no data here: run it with --data')\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    import torch

    fresh = torch.get_num_threads()  # this process has not changed it: what a new process gets
    md = tmp_path / "table.md"
    rc = run_all.main(["--markdown", str(md)], benches={"w": ("broken_bench", "broken"), "x": ("probe_bench", "first"),
                                                        "y": ("probe_bench", "second")})
    assert rc == 1
    text = md.read_text()
    assert "| w error | broken | exit code 1 |" in text and "no data here" in text
    states = [json.loads(line.split("|")[3].strip()) for line in text.splitlines() if line.startswith("| probe |")]
    assert len(states) == 2

    pids = {s["pid"] for s in states}
    assert len(pids) == 2 and os.getpid() not in pids  # a process per bench, none of them this one
    for s in states:  # the second bench finds none of what the first left behind
        assert not s["left_behind"] and s["torch_threads"] == fresh and s["py_threads"] == 1
    # the results page: what ran, when, where; the goal table, one line per goal row (one per bench here)
    assert text.startswith(f"<!-- written by `python bench/run_all.py --markdown {md}`")
    assert "\nDate: " in text and "\nMachine: " in text and "### Goals" in text and "### All rows" in text
    assert text.count("| probe case | 10 ms | 5 ms | <= 6 ms | met (2.00x (IQR 1.9-2.1)) |") == 2
    assert "Load (1/5/15 min) at the start of each bench: w: " in text and "y: " in text


#: every script of bench/ (a file that runs as `python bench/NAME.py`; the others are its helpers)
BENCHES = sorted(p.name for p in (REPO / "bench").glob("*.py") if 'if __name__ == "__main__":' in p.read_text())
IN_RUN_ALL = {module.split(".")[1] + ".py" for module, _ in run_all.BENCHES.values()}
#: benches whose --quick run is a test of their own (bench/visitor_latency.py drives chromium)
OWN_QUICK_TEST = {"visitor_latency.py": "tests/test_demo_latency_bench.py"}
#: the benches that start the demo server; run_all.py runs every other one
SERVER_BENCHES = [b for b in BENCHES if b not in IN_RUN_ALL | set(OWN_QUICK_TEST) | {"run_all.py"}]


def test_every_bench_script_runs_in_ci():
    """Each script of bench/ is run by run_all.py, by `test_bench_runs_quick` below, or by its own
    quick test."""
    assert IN_RUN_ALL <= set(BENCHES)
    assert {"demo_latency.py", "inspector_latency.py"} <= set(SERVER_BENCHES)
    for script, test in OWN_QUICK_TEST.items():
        assert script in BENCHES and '"--quick"' in (REPO / test).read_text()


def run_quick(script: str, argv: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "ISEARLE_CACHE": str(tmp_path / "cache"), "TMPDIR": str(tmp_path)}
    return subprocess.run([sys.executable, f"bench/{script}", "--quick", *argv], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=1200)


def test_run_all_quick_runs_every_bench(tmp_path):
    """`python bench/run_all.py --quick`: every bench of run_all.py runs end to end with tiny sizes (a smoke
    test of the scripts; the numbers are not results) and none fails."""
    md = tmp_path / "results.md"
    proc = run_quick("run_all.py", ["--markdown", str(md)], tmp_path)
    text = md.read_text() if md.exists() else ""
    assert proc.returncode == 0, f"a bench failed:\n{text[-3000:]}\n{proc.stderr[-2000:]}"
    assert " error |" not in text
    ran = text.split("at the start of each bench: ", 1)[1].split("\n", 1)[0]
    assert [part.split(":")[0] for part in ran.split("; ")[:-1]] == list(run_all.BENCHES)
    assert "### Goals" in text and "[--quick: a smoke test, not results]" in text


@pytest.mark.parametrize("script", SERVER_BENCHES)
def test_bench_runs_quick(script, tmp_path):
    """`python bench/SCRIPT --quick` starts the demo, times a few requests and prints p50 / p95."""
    proc = run_quick(script, [], tmp_path)
    assert proc.returncode == 0, f"bench/{script} --quick failed:\n{proc.stderr[-3000:]}"
    assert "p50" in proc.stdout, proc.stdout[-2000:]
