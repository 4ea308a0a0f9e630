"""Reliability: damaged or foreign artifacts give one-line errors, writes are atomic, killed runs resume.

Every artifact kind is damaged the ways a user meets it (truncated, empty, not the format, a newer
format, another backbone) and must raise `ArtifactError` naming the file and what to do; caches are
rebuilt instead. `isearle index --append`, `isearle oti` and `isearle train-phi` are killed with
SIGKILL at a random moment in a real subprocess, resumed, and compared bit for bit with a run that
was never interrupted.
"""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from isearle import artifacts
from isearle.artifacts import ArtifactError
from isearle.backbone import load_backbone
from isearle.index import GalleryIndex
from isearle.indexing import build_gallery_index, folder_items

REPO = Path(__file__).resolve().parents[1]


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def one_line(err: BaseException, *words: str) -> str:
    msg = str(err)
    assert "\n" not in msg and "Traceback" not in msg
    for w in words:
        assert w in msg, f"{w!r} not in {msg!r}"
    return msg


# ------------------------------------------------------------------------------ the module
def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "a.json"
    artifacts.write_json(path, {"v": 1})
    with pytest.raises(RuntimeError), artifacts.atomic_path(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")
    assert json.loads(path.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]  # no temporary file left behind


def test_tensor_files_are_verified(tmp_path):
    path = tmp_path / "t.safetensors"
    artifacts.save_tensors(path, {"x": torch.arange(1000.0)}, "thing", {"note": "hi"})
    tensors, meta = artifacts.load_tensors(path, "thing", "do X")
    assert torch.equal(tensors["x"], torch.arange(1000.0)) and meta == {"note": "hi"}
    with pytest.raises(ArtifactError) as e:
        artifacts.load_tensors(path, "other", "do X")
    one_line(e.value, "t.safetensors", "is a thing file, not a other", "do X")
    good = path.read_bytes()
    truncate(path, 0.7)
    with pytest.raises(ArtifactError) as e:
        artifacts.load_tensors(path, "thing", "do X")
    one_line(e.value, "is truncated", f"of {len(good):,} bytes", ": do X")
    path.write_bytes(b"")
    with pytest.raises(ArtifactError, match="is empty"):
        artifacts.load_tensors(path, "thing", "do X")
    path.write_text('{"not": "tensors"}')
    with pytest.raises(ArtifactError, match="is not a safetensors file"):
        artifacts.load_tensors(path, "thing", "do X")
    # one flipped bit in the data: the checksum catches it
    flipped = bytearray(good)
    flipped[-5] ^= 0x10
    path.write_bytes(bytes(flipped))
    with pytest.raises(ArtifactError, match="is corrupt"):
        artifacts.load_tensors(path, "thing", "do X")
    # a newer format
    header_len = int.from_bytes(good[:8], "little")
    header = json.loads(good[8 : 8 + header_len])
    own = json.loads(header["__metadata__"]["isearle"])
    header["__metadata__"]["isearle"] = json.dumps({**own, "format": artifacts.FORMAT + 1})
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + good[8 + header_len :])
    with pytest.raises(ArtifactError, match="newer isearle"):
        artifacts.load_tensors(path, "thing", "do X")


def test_group_write_rolls_forward_after_a_crash_past_its_commit(tmp_path):
    d = tmp_path / "g"
    artifacts.write_group(d, {"a.bin": lambda p: p.write_bytes(b"old a"), "b.bin": lambda p: p.write_bytes(b"old b")},
                          "m.json", {"v": 1})
    # a crash after the commit point (manifest.pending written), before the renames
    (d / "a.bin.new").write_bytes(b"new a")
    (d / "b.bin.new").write_bytes(b"new b")
    artifacts.write_json(d / "m.json.pending", {"v": 2, "files": {"a.bin": artifacts.file_record(d / "a.bin.new"),
                                                                  "b.bin": artifacts.file_record(d / "b.bin.new")}})
    artifacts.recover_group(d, "m.json", ["a.bin", "b.bin"])
    assert (d / "a.bin").read_bytes() == b"new a" and (d / "b.bin").read_bytes() == b"new b"
    assert json.loads((d / "m.json").read_text())["v"] == 2 and not list(d.glob("*.new")) and not list(d.glob("*.pending"))
    # a crash before the commit: the new files are dropped, the old group stays
    (d / "a.bin.new").write_bytes(b"newer a")
    artifacts.recover_group(d, "m.json", ["a.bin", "b.bin"])
    assert (d / "a.bin").read_bytes() == b"new a" and not (d / "a.bin.new").exists()


# ------------------------------------------------------------------------------ the gallery
@pytest.fixture()
def gallery(tmp_path):
    rng = np.random.default_rng(0)
    index = GalleryIndex.build(rng.normal(size=(20, 16)).astype("float32"), [f"i{k}" for k in range(20)],
                               info={"model": "m", "pretrained": "p"})
    return index.save(tmp_path / "gallery")


@pytest.mark.parametrize("name", ["index.faiss", "items.json", "index.json"])
@pytest.mark.parametrize("damage", ["truncated", "empty", "wrong format"])
def test_damaged_gallery_files_give_one_line_errors(gallery, name, damage):
    path = gallery / name
    if damage == "truncated":
        truncate(path)
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        n = path.stat().st_size  # another format's bytes, of the same length
        path.write_bytes((b"\x89PNG\r\n\x1a\n not what was written" * n)[:n])
    with pytest.raises(ArtifactError) as e:
        GalleryIndex.load(gallery)
    header = name == "index.json"
    problem = {"truncated": "is not valid JSON" if header else "is truncated (",
               "empty": "is empty", "wrong format": "is not a JSON file" if header else "is corrupt"}[damage]
    one_line(e.value, f"gallery/{name} {problem}", "rebuild it with `isearle index --out")


@pytest.mark.parametrize("name, problem", [("index.faiss", "is not a readable FAISS index"),
                                           ("items.json", "is not valid JSON")])
def test_legacy_gallery_without_checksums_still_names_the_damage(gallery, name, problem):
    header = json.loads((gallery / "index.json").read_text())
    del header["files"]  # format 1: no sizes or checksums recorded
    artifacts.write_json(gallery / "index.json", {**header, "format": 1})
    assert len(GalleryIndex.load(gallery)) == 20
    truncate(gallery / name)
    with pytest.raises(ArtifactError) as e:
        GalleryIndex.load(gallery)
    one_line(e.value, f"gallery/{name} {problem}", "rebuild it with")


def test_gallery_wrong_version_and_backbone(gallery):
    header = json.loads((gallery / "index.json").read_text())
    artifacts.write_json(gallery / "index.json", {**header, "format": 99})
    with pytest.raises(ArtifactError) as e:
        GalleryIndex.load(gallery)
    one_line(e.value, "index.json", "newer isearle (format 99")
    artifacts.write_json(gallery / "index.json", header)
    with pytest.raises(ArtifactError) as e:
        GalleryIndex.load(gallery, expect_backbone=("ViT-B-32", "openai"))
    one_line(e.value, "was embedded with m/p, not ViT-B-32/openai", "rebuild it with `isearle index --model ViT-B-32`")
    # same size, other bytes: the checksum names it
    path = gallery / "index.faiss"
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="index.faiss is corrupt"):
        GalleryIndex.load(gallery)


def test_cli_prints_one_line_for_a_damaged_gallery(gallery):
    truncate(gallery / "index.faiss")
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-m", "isearle", "query", "--gallery", str(gallery), "--caption", "x",
                        "--method", "text"], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    lines = [x for x in r.stderr.splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and "index.faiss is truncated" in lines[0] and "rebuild it with" in lines[0], r.stderr


def test_append_skips_known_ids(tiny, tmp_path):
    images = [(f"c{k}", Image.new("RGB", (24, 24), (10 * k, 0, 0)), {}) for k in range(6)]
    index = build_gallery_index(tiny, images[:4], batch_size=2, progress=False)
    index = build_gallery_index(tiny, images, batch_size=2, progress=False, index=index)
    assert index.ids == [f"c{k}" for k in range(6)]
    once = build_gallery_index(tiny, images, batch_size=2, progress=False)
    assert np.array_equal(index.vectors(), once.vectors())


# ------------------------------------------------------------------------------ kill and resume
def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "isearle", *args]


def _run(cmd: list[str], started=None) -> float:
    """Run `cmd` to completion; the seconds it worked after `started()` became true (else in all)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=_env())
    start = time.monotonic()
    while started is not None and proc.poll() is None and not started():
        time.sleep(0.005)
    start = time.monotonic()
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    return time.monotonic() - start


def kill_and_resume(cmd: list[str], work: float, started, seed: int) -> float:
    """Start `cmd`, SIGKILL it at a random moment of its work (after `started()`), run it again."""
    delay = random.Random(seed).uniform(0.05, 0.8) * work
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env())
    deadline = time.monotonic() + 120
    while not started() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run ended before it was killed"
    _run(cmd)
    return delay


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """The tiny test CLIP saved once, so that every subprocess loads the same weights."""
    from isearle.backbone import load_backbone

    path = tmp_path_factory.mktemp("tiny") / "tiny.pt"
    with torch.random.fork_rng():
        torch.manual_seed(0)
        torch.save(load_backbone("isearle-tiny-test", None, "cpu").model.state_dict(), path)
    return path


@pytest.mark.parametrize("seed", [1])
def test_killed_index_append_resumes_bit_for_bit(tiny_checkpoint, tmp_path, seed):
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(seed)
    for k in range(48):  # noise PNGs: slow enough to decode that a kill lands mid-run
        Image.fromarray(rng.integers(0, 255, (384, 384, 3), dtype=np.uint8)).save(folder / f"{k:03d}.png")
    model = ["--model", "isearle-tiny-test", "--pretrained", str(tiny_checkpoint), "--device", "cpu"]
    base = tmp_path / "base"  # a gallery of the first 8 images, to append to
    backbone = load_backbone("isearle-tiny-test", str(tiny_checkpoint), "cpu")
    build_gallery_index(backbone, folder_items(folder)[:8], progress=False).save(base)
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    shutil.copytree(base, ref)
    shutil.copytree(base, killed)
    append = ["index", "--images", str(folder), "--append", "--batch-size", "4", "--num-workers", "0", *model]
    def began(gallery):
        return lambda: any((gallery / ".index-progress").glob("piece_*"))

    work = _run(_cli(*append, "--out", str(ref)), began(ref))
    progress = killed / ".index-progress"
    delay = kill_and_resume(_cli(*append, "--out", str(killed)), work, began(killed), seed)
    a, b = GalleryIndex.load(ref), GalleryIndex.load(killed)
    assert a.ids == b.ids == sorted(p.name for p in folder.iterdir()), delay
    assert len(set(b.ids)) == len(b.ids) == 48  # nothing lost, nothing twice
    assert np.array_equal(a.vectors(), b.vectors()) and a.metadata == b.metadata
    assert not progress.exists()
