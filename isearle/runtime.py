"""The process's runtime settings: CPU threads and whether the network may be used.

One place for thread set-up (torch's intra-op threads, FAISS's OpenMP threads) and for the
`HF_HUB_OFFLINE` switch, so that the CLI, the demo, evaluation and training agree.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import torch


def cpu_quota() -> int:
    """CPUs this process may use: its CPU affinity, capped by the cgroup quota (cpu.max) when set."""
    quota = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        max_us, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if max_us != "max":
            quota = max(1, min(quota, int(int(max_us) / int(period))))
    except (OSError, ValueError):
        pass
    return quota


_torch_threads = 0  # the count `set_threads` chose last (0: never called)


def torch_threads() -> int:
    """The torch thread count `set_threads` chose last, else the CPU quota: what a query should run with."""
    return _torch_threads or cpu_quota()


def set_threads(threads: int = 0, faiss_threads: int | None = 1) -> int:
    """torch's intra-op threads = `threads` (0: the CPU quota); FAISS's = `faiss_threads` (None: unchanged).

    One query's FAISS search runs best single-threaded (OpenMP start-up costs more than it saves);
    `GalleryIndex` raises FAISS's count for batched work itself. Returns torch's thread count.
    """
    global _torch_threads
    n = _torch_threads = threads or cpu_quota()
    torch.set_num_threads(n)
    if faiss_threads is not None:
        try:
            import faiss

            faiss.omp_set_num_threads(faiss_threads)
        except ImportError:
            pass
    return n


@contextlib.contextmanager
def faiss_threads(n_rows: int) -> Iterator[None]:
    """FAISS's threads for one call on `n_rows` rows: one for a few queries (OpenMP start-up costs
    more than it saves), else torch's count (batched searches, adds, training). torch may share
    FAISS's OpenMP runtime, whose setting then also caps torch: torch's count is restored after."""
    import faiss

    threads = torch.get_num_threads()
    faiss.omp_set_num_threads(1 if n_rows < 16 else max(1, threads))
    try:
        yield
    finally:
        if torch.get_num_threads() != threads:
            set_threads(threads, faiss_threads=None)


def hub_offline() -> bool:
    """True when the Hugging Face hub must not be contacted."""
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")
