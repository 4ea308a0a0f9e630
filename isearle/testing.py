"""Test and benchmark helpers, shipped with the package as numpy.testing is: run the demo app in
a subprocess on a free port (`AppProcess`) and summarise latencies (`latency_stats`)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from isearle.paths import REPO_DIR
from isearle.timing import percentile


def latency_stats(ms: Sequence[float]) -> dict[str, float]:
    """n, p50, p95, mean and max of latencies in milliseconds."""
    a = np.asarray(list(ms), dtype=np.float64)
    if a.size == 0:
        return {"n": 0, "p50": float("nan"), "p95": float("nan"), "mean": float("nan"), "max": float("nan")}
    return {"n": int(a.size), "p50": percentile(a.tolist(), 50), "p95": percentile(a.tolist(), 95),
            "mean": float(a.mean()), "max": float(a.max())}


def split_app_args(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """(a benchmark's own arguments, the app's arguments after "--"): `bench.py --n 5 -- --gallery g`."""
    argv = list(argv)
    if "--" not in argv:
        return argv, []
    cut = argv.index("--")
    return argv[:cut], argv[cut + 1:]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class AppProcess:
    """`python app.py ARGS` on a free localhost port, until it answers HTTP (tests, benchmarks)."""

    def __init__(self, args: Sequence[str] = (), env: dict[str, str] | None = None, timeout: float = 180,
                 app: str | Path = REPO_DIR / "app.py", log: str | Path | None = None) -> None:
        self.port = free_port()
        self.args, self.timeout, self.app = list(args), timeout, Path(app)
        self.env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False",
                    "PYTHONUNBUFFERED": "1", **(env or {})}
        self.log_path = Path(log) if log else Path(tempfile.mkstemp(prefix="isearle-app-", suffix=".log")[1])
        self.proc: subprocess.Popen | None = None
        self.startup_s = float("nan")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def log(self, tail: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-tail:]
        except OSError:
            return ""

    def start(self) -> AppProcess:
        start = time.perf_counter()
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen([sys.executable, str(self.app), "--host", "127.0.0.1",
                                          "--port", str(self.port), *self.args],
                                         cwd=str(self.app.parent), env=self.env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"app.py exited with {self.proc.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(self.url + "config", timeout=2) as r:
                    if r.status == 200:
                        self.startup_s = time.perf_counter() - start
                        return self
            except OSError:
                pass
            time.sleep(0.3)
        self.stop()
        raise TimeoutError(f"app.py did not answer within {self.timeout} s:\n{self.log()}")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def __enter__(self) -> AppProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
