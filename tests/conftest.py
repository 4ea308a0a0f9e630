"""Shared fixtures of the core test suite: offline hub, a random-init tiny CLIP, the paper's B/32 shape."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before anything imports huggingface_hub: never touch the network
# before torch loads OpenMP: idle threads sleep instead of spinning; with several test processes on
# a few cores, spinning threads of one steal the cores of another
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# `--precision auto` (the app's default) is a timing measurement: two processes (the app under test
# and an engine built in the test) may choose differently and rank near-ties differently. Tests run
# the query path in fp32 unless they set a precision (tests/test_precision.py does).
os.environ.setdefault("ISEARLE_PRECISION", "fp32")
# One OpenMP/MKL thread count for every thread of every process a test starts (the app under test
# and an engine built in the test): batch-1 fp32 matrix products sum in a thread-count-dependent
# order, and a thread whose count was never set (or was lowered by FAISS) ranks near-ties differently.
os.environ.setdefault("OMP_NUM_THREADS", str(len(os.sched_getaffinity(0))))

import pytest  # noqa: E402
import torch  # noqa: E402

from isearle.backbone import Backbone, load_backbone  # noqa: E402


@pytest.fixture(scope="session")
def tiny() -> Backbone:
    """isearle-tiny-test: random init, text width 48 != embed dim 64 (phi's in/out sizes differ)."""
    torch.manual_seed(0)  # random init, made reproducible
    return load_backbone("isearle-tiny-test", None, device="cpu")


@pytest.fixture(scope="session")
def vitb32() -> Backbone:
    """The paper's ViT-B/32 architecture (text width 512, 12 layers) with random weights."""
    torch.manual_seed(0)
    return load_backbone("ViT-B-32", None, device="cpu")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """No test reads or writes the user's ~/.cache/isearle (concept banks, official weights)."""
    import isearle.paths

    monkeypatch.setattr(isearle.paths, "CACHE_DIR", tmp_path / "isearle-cache")


@pytest.fixture(scope="session")
def tiny_file(tiny, tmp_path_factory) -> Backbone:
    """The tiny CLIP loaded from a weights file: weights with an id (a file digest), so disk caches keep
    its outputs (random-init weights have no cache key)."""
    path = tmp_path_factory.mktemp("weights") / "isearle-tiny-test.pt"
    torch.save(tiny.model.state_dict(), path)
    return load_backbone("isearle-tiny-test", str(path), device="cpu")
