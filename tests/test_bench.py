"""bench/run_all.py: each benchmark runs in a fresh process (what it gives alone), and the issue's table."""

import json
import sys
from pathlib import Path

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
    them is reported as a row and does not stop the run."""
    (tmp_path / "probe_bench.py").write_text(PROBE)
    (tmp_path / "broken_bench.py").write_text("raise SystemExit('no data here: run it with --data')\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    import torch

    fresh = torch.get_num_threads()  # this process has not changed it: what a new process gets
    md = tmp_path / "table.md"
    rc = run_all.main(["--markdown", str(md)], benches={"w": ("broken_bench", "broken"), "x": ("probe_bench", "first"),
                                                        "y": ("probe_bench", "second")})
    assert rc == 0
    text = md.read_text()
    assert "| w error | broken | exit code 1 |" in text and "no data here" in text
    states = [json.loads(line.split("|")[3].strip()) for line in text.splitlines() if line.startswith("| probe |")]
    assert len(states) == 2
    import os

    pids = {s["pid"] for s in states}
    assert len(pids) == 2 and os.getpid() not in pids  # a process per bench, none of them this one
    for s in states:  # the second bench finds none of what the first left behind
        assert not s["left_behind"] and s["torch_threads"] == fresh and s["py_threads"] == 1
    # the table, as Markdown, one line per goal row (one per bench here)
    assert "| case | today's path | new path | goal | verdict |" in text
    assert text.count("| probe case | 10 ms | 5 ms | <= 6 ms | met (2.00x (IQR 1.9-2.1)) |") == 2
    assert "Load (1/5/15 min) at the start of each bench: w: " in text and "y: " in text
