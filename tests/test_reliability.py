"""Reliability: damaged or foreign artifacts give one-line errors, writes are atomic, killed runs resume.

Every artifact kind is damaged the ways a user meets it (truncated, empty, not the format, a newer
format, another backbone) and must raise `ArtifactError` naming the file and what to do; caches are
rebuilt instead. `isearle index --append`, `isearle oti` and `isearle train-phi` are killed with
SIGKILL at a random moment in a real subprocess, resumed, and compared bit for bit with a run that
was never interrupted.
"""

import dataclasses
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


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one torch thread is faster, and immune to a busy machine's OpenMP stalls."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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


def test_gallery_wrong_version_and_backbone(gallery, monkeypatch):
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
    monkeypatch.setenv("ISEARLE_VERIFY", "size")  # sizes only (what files over 256 MiB get)
    GalleryIndex.load(gallery)
    monkeypatch.setenv("ISEARLE_VERIFY", "auto")
    monkeypatch.setattr(artifacts, "HASH_LIMIT", 100)
    GalleryIndex.load(gallery)
    monkeypatch.setenv("ISEARLE_VERIFY", "full")
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


def test_cli_prints_one_line_for_damaged_oti_runs_and_phrase_banks(oti_run, model_args, tmp_path):
    out, phrases = oti_run
    truncate(sorted(out.glob("shard_*"))[1])
    phrases.write_text('{"red": ["a photo of red')
    env = {**_env(), "ISEARLE_CACHE": str(tmp_path / "cache")}
    for cmd, expected in (
            (["train-phi", "--oti", str(out), "--out", str(tmp_path / "phi.safetensors")], "shard_000001.safetensors is truncated"),
            (["oti", "--shapes", "2", "--vocabulary", "shapes", "--phrases", str(phrases), "--out", str(tmp_path / "o")],
             "phrases.json is not valid JSON")):
        r = subprocess.run(_cli(*cmd, *model_args), capture_output=True, text=True, env=env, timeout=300)
        errors = [x for x in r.stderr.splitlines() if x.startswith("error:")]
        assert r.returncode == 1 and "Traceback" not in r.stderr and len(errors) == 1, r.stderr[-2000:]
        assert expected in errors[0]


def test_cli_turns_unexpected_errors_into_one_line(monkeypatch, capsys):
    import isearle.cli as C

    def fail(err):
        def run(args):
            raise err
        return run

    monkeypatch.delenv("ISEARLE_DEBUG", raising=False)
    commands = C.COMMANDS

    def failing(err):  # `isearle concepts` raising err
        return [(n, h, add, fail(err) if n == "concepts" else run) for n, h, add, run in commands]

    monkeypatch.setattr(C, "COMMANDS", failing(RuntimeError("boom\nsecond line")))
    assert C.main(["concepts", "--shapes", "1", "--out", "x.json"]) == 1
    assert capsys.readouterr().err == ("error: internal error (RuntimeError: boom); run again with ISEARLE_DEBUG=1 "
                                       "for the traceback and report it\n")
    monkeypatch.setattr(C, "COMMANDS", failing(OSError(28, "No space left on device", "/data/x.json")))
    assert C.main(["concepts", "--shapes", "1", "--out", "x.json"]) == 1
    assert capsys.readouterr().err == "error: /data/x.json: No space left on device\n"
    monkeypatch.setenv("ISEARLE_DEBUG", "1")
    with pytest.raises(OSError):
        C.main(["concepts", "--shapes", "1", "--out", "x.json"])


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


def _run(cmd: list[str], started=None) -> tuple[float, str]:
    """Run `cmd` to completion: (seconds it worked after `started()` became true, its stderr)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=_env())
    while started is not None and proc.poll() is None and not started():
        time.sleep(0.005)
    start = time.monotonic()
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    return time.monotonic() - start, err


def kill_and_resume(cmd: list[str], units: int, done, unit_s: float, seed: int) -> tuple[str, str, int]:
    """Start `cmd`, SIGKILL it at a random moment (after a random number of its `units` pieces of
    work are `done()`, plus a random part of one piece's time `unit_s`), run it again:
    (where it was killed, the resumed run's stderr, the pieces done when it was killed)."""
    rng = random.Random(seed)
    k, extra = rng.randrange(units - 1), rng.uniform(0, unit_s)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env())
    deadline = time.monotonic() + 240
    while done() <= k and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    time.sleep(extra)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run ended before it was killed"
    left = done()
    _, err = _run(cmd)
    return f"after {k + 1} of {units} pieces + {extra:.3f} s", err, left


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
    def pieces(gallery):
        return lambda: len(list((gallery / ".index-progress").glob("piece_*.safetensors")))

    work, err = _run(_cli(*append, "--out", str(ref)), lambda: pieces(ref)() > 0)
    assert "8 of 48 images are already in the index: skipped" in err
    delay, err, left = kill_and_resume(_cli(*append, "--out", str(killed)), 10, pieces(killed), work / 9, seed)
    assert f"resuming: {left} of 10 batches already embedded" in err, (left, err[-2000:])  # none redone
    progress = killed / ".index-progress"
    a, b = GalleryIndex.load(ref), GalleryIndex.load(killed)
    assert a.ids == b.ids == sorted(p.name for p in folder.iterdir()), delay
    assert len(set(b.ids)) == len(b.ids) == 48  # nothing lost, nothing twice
    assert np.array_equal(a.vectors(), b.vectors()) and a.metadata == b.metadata
    assert not progress.exists()


def _cache_env(tmp_path: Path) -> None:
    os.environ["ISEARLE_CACHE"] = str(tmp_path / "cache")  # subprocesses: no user cache


@pytest.fixture()
def model_args(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("ISEARLE_CACHE", str(tmp_path / "cache"))
    return ["--model", "isearle-tiny-test", "--pretrained", str(tiny_checkpoint), "--device", "cpu"]


@pytest.mark.parametrize("seed", [2])
def test_killed_oti_resumes_bit_for_bit(model_args, tmp_path, seed):
    from isearle.oti_runs import load_run

    oti = ["oti", "--shapes", "24", "--vocabulary", "shapes", "--steps", "30", "--batch-size", "3", *model_args]
    ref, killed = tmp_path / "ref", tmp_path / "killed"

    def shards(out):
        return lambda: len(list(out.glob("shard_*.safetensors")))

    work, _ = _run(_cli(*oti, "--out", str(ref)), lambda: shards(ref)() > 0)
    inodes = {}

    def done():  # finished shards, and their inodes: a resumed run must not write them again
        inodes.update({p.name: p.stat().st_ino for p in killed.glob("shard_*.safetensors")})
        return shards(killed)()

    delay, err, left = kill_and_resume(_cli(*oti, "--out", str(killed)), 8, done, work / 7, seed)
    assert all(killed.joinpath(name).stat().st_ino == ino for name, ino in inodes.items())
    assert f"resuming: {left} of 8 batches already inverted" in err, err[-2000:]
    a, b = load_run(ref), load_run(killed)
    assert a[0] == b[0] and len(set(b[0])) == len(b[0]) == 24, delay  # same ids, nothing twice
    assert torch.equal(a[1], b[1]) and torch.equal(a[2], b[2]) and a[3] == b[3]  # features, tokens, concepts


@pytest.fixture()
def oti_run(tiny_checkpoint, tmp_path):
    """An OTI run over 64 shapes scenes (2 steps: the tokens only need to exist) and a phrase bank."""
    from isearle.concepts import concept_bank, load_vocabulary
    from isearle.oti import OTIConfig
    from isearle.oti_runs import invert_images
    from isearle.phrases import generate_phrases
    from isearle.shapes.captions import phrase_generator
    from isearle.shapes.world import scene_source

    backbone = load_backbone("isearle-tiny-test", str(tiny_checkpoint), "cpu")
    ids, items = scene_source(64, 5, backbone.image_size)
    out = tmp_path / "oti"
    invert_images(backbone, ids, items, out, OTIConfig(steps=2, batch_size=32),
                  concept_bank(backbone, "shapes", cache_dir=tmp_path / "concepts", progress=False), progress=False)
    phrases = tmp_path / "phrases.json"
    generate_phrases(load_vocabulary("shapes"), phrase_generator(4, 0), cache=phrases, progress=False)
    return out, phrases


@pytest.mark.parametrize("seed", [3])
def test_killed_train_phi_resumes_bit_for_bit(model_args, oti_run, tmp_path, seed):
    from isearle.phi import phi_settings

    out, phrases = oti_run
    train = ["train-phi", "--oti", str(out), "--phrases", str(phrases), "--epochs", "60", "--batch-size", "16",
             *model_args]
    ref, killed = tmp_path / "ref.safetensors", tmp_path / "killed.safetensors"
    state = tmp_path / "killed.training.safetensors"
    work, _ = _run(_cli(*train, "--out", str(ref)), lambda: (tmp_path / "ref.training.safetensors").is_file())

    def epochs_done():
        try:
            return json.loads(artifacts.tensors_metadata(state, "")["state"])["step"]
        except ArtifactError:  # not written yet
            return 0

    delay, err, done = kill_and_resume(_cli(*train, "--out", str(killed)), 60, epochs_done, work / 59, seed)
    assert f"resuming after {done}" in err, err[-2000:]
    a, _ = artifacts.load_tensors(ref, "phi", "")
    b, _ = artifacts.load_tensors(killed, "phi", "")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), delay
    assert phi_settings(ref) == phi_settings(killed)  # same settings and per-epoch losses
    assert phi_settings(ref)["final_losses"]["gpt"] > 0 and not state.exists()


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_train_phi_resumed_after_any_epoch_matches(tiny, oti_run, monkeypatch, tmp_path, precision):
    """In process, killed (an exception) right after epoch k's state is saved: the resumed run's phi,
    losses and RNG draws equal an uninterrupted run's, with the GPT loss on (Python's RNG); under
    fp16 its GradScaler also goes on from the saved loss scale."""
    import isearle.phi_training as PT
    from isearle.oti_runs import load_run
    from isearle.phrases import load_phrase_bank

    out, phrases = oti_run
    _, feats, toks, concepts = load_run(out)
    bank = load_phrase_bank(phrases)
    scalers: list[torch.amp.GradScaler] = []

    def grad_scaler(device, prec):  # a scale that doubles every step, so a saved state is not a fresh one's
        scalers.append(torch.amp.GradScaler("cpu", init_scale=1.0, enabled=prec == "fp16", growth_interval=1))
        return scalers[-1]

    monkeypatch.setattr(PT, "grad_scaler", grad_scaler)
    torch.set_num_threads(2)  # two threads: a text batch's rows then depend on what shares the batch
    cfg = PT.PhiTrainConfig(epochs=3, batch_size=16, precision=precision)
    ref, ref_hist = PT.train_phi(tiny, feats, toks, cfg, concepts, bank, progress=False, checkpoint=tmp_path / "a")
    ref_scaler = scalers[-1].state_dict()
    save = PT.save_state

    def killed_after(k):
        def hook(path, job, step, *args, **kwargs):
            save(path, job, step, *args, **kwargs)
            if step == k:
                raise KeyboardInterrupt

        return hook

    for k in (1, 2):
        monkeypatch.setattr(PT, "save_state", killed_after(k))
        with pytest.raises(KeyboardInterrupt):
            PT.train_phi(tiny, feats, toks, cfg, concepts, bank, progress=False, checkpoint=tmp_path / f"k{k}")
        if precision == "fp16":  # the scale at the kill is not a fresh scaler's: only the checkpoint holds it
            assert scalers[-1].get_scale() > 1.0
        monkeypatch.setattr(PT, "save_state", save)
        phi, hist = PT.train_phi(tiny, feats, toks, cfg, concepts, bank, progress=False, checkpoint=tmp_path / f"k{k}")
        assert hist == ref_hist and hist[-1]["gpt"] > 0
        assert all(torch.equal(a, b) for a, b in zip(ref.state_dict().values(), phi.state_dict().values(), strict=True))
        assert scalers[-1].state_dict() == ref_scaler


# ------------------------------------------------------------------------------ other artifact kinds
def test_damaged_oti_runs_name_the_file(oti_run, tiny_checkpoint):
    from isearle.oti_runs import load_run, load_runs

    out, _ = oti_run
    shard = sorted(out.glob("shard_*"))[0]
    good = shard.read_bytes()
    truncate(shard)
    with pytest.raises(ArtifactError) as e:
        load_run(out)
    one_line(e.value, f"{shard.name} is truncated", "run `isearle oti --out", "again")
    shard.write_bytes(b"")
    with pytest.raises(ArtifactError, match="is empty"):
        load_run(out)
    shard.write_bytes(good)
    (out / "concepts.json").write_text("{not json")
    with pytest.raises(ArtifactError) as e:
        load_run(out)
    one_line(e.value, "concepts.json is not valid JSON")
    (out / "concepts.json").unlink()
    feats = out / "features.safetensors"
    artifacts.save_tensors(feats, {"features": torch.zeros(2, 2)}, "concept-bank", {"ids": "[]"})
    with pytest.raises(ArtifactError, match="is a concept-bank file, not a oti-features"):
        load_run(out)
    shutil.rmtree(out)
    out.mkdir()
    (out / "config.json").write_text(json.dumps({"backbone": "ViT-B-32-quickgelu", "pretrained": "openai"}))
    backbone = load_backbone("isearle-tiny-test", str(tiny_checkpoint), "cpu")
    artifacts.save_tensors(out / "features.safetensors", {"features": torch.zeros(1, 64)}, "oti-features", {"ids": '["a"]'})
    artifacts.save_tensors(out / "shard_000000.safetensors", {"tokens": torch.zeros(1, 48)}, "oti-shard", {"ids": '["a"]'})
    with pytest.raises(ArtifactError) as e:
        load_runs([out], backbone)
    one_line(e.value, "is an OTI run of ViT-B-32-quickgelu/openai, not isearle-tiny-test", "--model ViT-B-32-quickgelu")


def test_oti_resume_redoes_a_damaged_shard_and_refuses_other_settings(tiny, tmp_path):
    from isearle.oti import OTIConfig
    from isearle.oti_runs import invert_dataset

    feats = torch.randn(6, tiny.embed_dim, generator=torch.Generator().manual_seed(0))
    ids = [f"x{i}" for i in range(6)]
    cfg = OTIConfig(steps=3, batch_size=2)
    _, ref = invert_dataset(tiny, ids, feats, tmp_path / "run", cfg, progress=False)
    truncate(tmp_path / "run" / "shard_000001.safetensors")
    got_ids, again = invert_dataset(tiny, ids, feats, tmp_path / "run", cfg, progress=False)
    assert got_ids == ids and torch.equal(again, ref)
    with pytest.raises(ArtifactError) as e:
        invert_dataset(tiny, ids, feats, tmp_path / "run", OTIConfig(steps=4, batch_size=2), progress=False)
    one_line(e.value, "holds an OTI run with other settings (steps differ)", "new --out folder")


def test_phi_checkpoints(tiny, tmp_path):
    from isearle.phi import Phi, load_phi, phi_settings, save_phi

    phi = Phi.for_backbone(tiny.embed_dim, tiny.token_width).eval()
    path = save_phi(phi, tmp_path / "phi.safetensors", {"backbone": tiny.name})
    assert phi_settings(path)["phi"]["output_dim"] == tiny.token_width and load_phi(path, backbone=tiny)
    good = path.read_bytes()
    for damage, problem in ((lambda: truncate(path), "phi.safetensors is truncated"),
                            (lambda: path.write_bytes(b""), "phi.safetensors is empty"),
                            (lambda: path.write_text("<html>not found</html>"), "is not a safetensors file")):
        damage()
        with pytest.raises(ArtifactError) as e:
            load_phi(path)
        one_line(e.value, problem, "train it again with `isearle train-phi`")
    path.write_bytes(good)
    with pytest.raises(ArtifactError) as e:  # a phi of another backbone
        load_phi(path, backbone=dataclasses.replace(tiny, name="ViT-B-32-quickgelu"))
    one_line(e.value, "is a phi for isearle-tiny-test", "not for ViT-B-32-quickgelu", "train-phi --model")
    # an older checkpoint: settings in a JSON sidecar, still read; without it, a clear error
    from safetensors.torch import save_file

    old = tmp_path / "old.safetensors"
    save_file({k: v.contiguous() for k, v in phi.state_dict().items()}, str(old))
    with pytest.raises(ArtifactError) as e:
        load_phi(old)
    one_line(e.value, "old.json is missing", "copy it next to the .safetensors")
    (tmp_path / "old.json").write_text(json.dumps({"phi": phi_settings(path)["phi"], "backbone": tiny.name}))
    x = torch.randn(2, tiny.embed_dim)
    assert torch.equal(load_phi(old)(x), phi(x))
    (tmp_path / "old.json").write_text("{")
    with pytest.raises(ArtifactError, match="old.json is not valid JSON"):
        load_phi(old)


def test_official_searle_checkpoint_loads_weights_only_and_damage_is_named(tiny, tmp_path):
    from isearle.phi import Phi, load_phi

    phi = Phi.for_backbone(tiny.embed_dim, tiny.token_width).eval()
    pt = tmp_path / "SEARLE.pt"
    torch.save({"epoch": 3, "Phi": phi.state_dict()}, pt)
    x = torch.randn(2, tiny.embed_dim)
    assert torch.equal(load_phi(pt)(x), phi(x))
    truncate(pt)
    with pytest.raises(ArtifactError) as e:
        load_phi(pt)
    one_line(e.value, "SEARLE.pt is not a readable SEARLE checkpoint", "download it again")
    torch.save({"epoch": 3, "model": {}}, pt)
    with pytest.raises(ArtifactError, match="no phi weights in it"):
        load_phi(pt)


def test_damaged_concept_bank_cache_is_rebuilt(tiny_file, tmp_path, caplog):
    tiny = tiny_file
    from isearle.concepts import concept_bank

    bank = concept_bank(tiny, "shapes", cache_dir=tmp_path, progress=False)
    path = next(tmp_path.glob("*.safetensors"))
    for damage in (lambda: truncate(path), lambda: path.write_bytes(b""), lambda: path.write_text("{}"),
                   lambda: artifacts.save_tensors(path, {"features": torch.zeros(3, 7)}, "concept-bank",
                                                  {"names": '["a", "b", "c"]'})):
        damage()
        with caplog.at_level("WARNING"):
            again = concept_bank(tiny, "shapes", cache_dir=tmp_path, progress=False)
        assert again.names == bank.names and torch.equal(again.features, bank.features)
        assert "rebuilding it" in caplog.text and path.name in caplog.text
        caplog.clear()


def test_damaged_phrase_bank_names_the_file(tmp_path):
    from isearle.phrases import generate_phrases, load_phrase_bank

    path = tmp_path / "phrases.json"
    for text, problem in (("", "is empty"), ('{"red": ["a photo', "is not valid JSON"),
                          ('["not", "a", "bank"]', "is not a phrase bank")):
        path.write_text(text)
        with pytest.raises(ArtifactError) as e:
            load_phrase_bank(path)
        one_line(e.value, f"phrases.json {problem}", "isearle phrases --out")
        with pytest.raises(ArtifactError):  # resuming into it does not overwrite it
            generate_phrases(["red"], lambda c: [f"a photo of {c} that is"], cache=path, progress=False)
        assert path.read_text() == text


def test_damaged_feature_cache_shard_is_dropped_and_encoded_again(tmp_path, caplog):
    from isearle.datasets import FeatureCache

    cache = FeatureCache(tmp_path, "k", "ns")
    cache.add(["a", "b"], torch.ones(2, 4))
    cache.add(["c"], torch.full((1, 4), 2.0))
    truncate(tmp_path / "k" / "ns" / "shard_000000.safetensors")
    fresh = FeatureCache(tmp_path, "k", "ns")
    with caplog.at_level("WARNING"):
        assert fresh.missing(["a", "b", "c"]) == ["a", "b"]
    assert "shard_000000.safetensors is truncated" in caplog.text and "encoded again" in caplog.text
    fresh.add(["a", "b"], torch.ones(2, 4))  # a new shard, not over shard_000001
    assert torch.equal(FeatureCache(tmp_path, "k", "ns").get(["a", "c"]), torch.tensor([[1.0] * 4, [2.0] * 4]))


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_clip_training_resumes_bit_for_bit(monkeypatch, tmp_path, precision):
    """Killed after step 3 and resumed from weights unlike the seed's: the same model as an
    uninterrupted run, and under fp16 the same GradScaler state (its loss scale and growth count)."""
    import open_clip

    import isearle.clip_training as CT
    from isearle.backbone import register_model_configs

    register_model_configs()
    data = CT.ShapesCaptions(24, seed=1, size=32, context_length=77, progress=False, composite=0.3)
    tok = open_clip.get_tokenizer("isearle-tiny-test")
    scalers: list[torch.amp.GradScaler] = []

    def grad_scaler(device, prec):  # a scale that moves every step, so the state at step 3 is not a fresh one's
        scalers.append(torch.amp.GradScaler("cpu", enabled=prec == "fp16", growth_interval=1))
        return scalers[-1]

    monkeypatch.setattr(CT, "grad_scaler", grad_scaler)

    def model():
        torch.manual_seed(0)
        return open_clip.create_model_and_transforms("isearle-tiny-test", pretrained=None)[0]

    def config(out):
        return CT.TrainConfig(model="isearle-tiny-test", steps=6, batch_size=8, warmup=2, out_dir=str(out),
                              checkpoint_every=1, eval_every=0, log_every=1, resume=True, precision=precision)

    ref = model()
    CT.train_clip(ref, data, tok, config(tmp_path / "ref"), progress=False)
    ref_scaler = scalers[-1].state_dict()
    save = CT.save_checkpoint

    def killed(path, m, opt, meta, *rest):
        save(path, m, opt, meta, *rest)
        if meta["step"] == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(CT, "save_checkpoint", killed)
    with pytest.raises(KeyboardInterrupt):
        CT.train_clip(model(), data, tok, config(tmp_path / "run"), progress=False)
    killed_scaler = scalers[-1].state_dict()
    monkeypatch.setattr(CT, "save_checkpoint", save)
    resumed = model()
    with torch.no_grad():  # a start unlike the seed's: only the checkpoint's state can give the reference
        for p in resumed.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    steps: list[int] = []
    monkeypatch.setattr(CT, "save_checkpoint", lambda path, m, opt, meta, *rest: steps.append(meta["step"]) or save(
        path, m, opt, meta, *rest))
    meta = CT.train_clip(resumed, data, tok, config(tmp_path / "run"), progress=False)
    assert meta["step"] == 6 and steps[0] == 4  # it went on from step 3, not from 0
    assert all(torch.equal(a, b) for a, b in zip(ref.state_dict().values(), resumed.state_dict().values(), strict=True))
    assert scalers[-1].state_dict() == ref_scaler
    if precision == "fp16":  # the loss scale at the kill was not a fresh scaler's: only the checkpoint holds it
        assert killed_scaler["scale"] != torch.amp.GradScaler("cpu").get_scale()
    truncate(tmp_path / "run" / "last.safetensors")  # a damaged state: a log line, training starts over
    assert CT.load_checkpoint(tmp_path / "run" / "last.safetensors", model(), torch.optim.AdamW(
        model().parameters()), config(tmp_path / "run")) is None


def test_damaged_thumbnails_are_written_again(tmp_path, caplog):
    from isearle import demo as D

    cache = D.ThumbnailCache(tmp_path)
    first = Path(cache.save(Image.new("RGB", (40, 40), "red"), "ref"))
    truncate(first)
    with caplog.at_level("WARNING"):
        again = Path(cache.save(Image.new("RGB", (40, 40), "red"), "ref"))
    assert again == first and Image.open(again).getpixel((5, 5)) == (255, 0, 0)
    assert "is damaged" in caplog.text


# ------------------------------------------------------------------------------ the app
@pytest.fixture()
def offline_world(monkeypatch, tmp_path):
    """A small offline world: the bundled shapes CLIP, 24 ShapesCIR gallery scenes, REPO_DIR = tmp."""
    import isearle.demo.galleries
    from isearle.shapes import benchmark
    from isearle.weights import weights_file

    if weights_file("isearle-shapes") is None or not (benchmark.BENCHMARK_DIR / "gallery.json").is_file():
        pytest.skip("no bundled offline world in this checkout")
    specs = json.loads((benchmark.BENCHMARK_DIR / "gallery.json").read_text())
    bench = tmp_path / "shapescir"
    bench.mkdir()
    (bench / "gallery.json").write_text(json.dumps(dict(list(specs.items())[:24])))
    monkeypatch.setattr(benchmark, "BENCHMARK_DIR", bench)
    monkeypatch.setattr(isearle.demo.galleries, "REPO_DIR", tmp_path)  # tmp/gallery_index is "the offline gallery"
    return tmp_path / "gallery_index"


def _app_args(gallery: Path, *more: str):
    import argparse

    from isearle import demo as D

    p = argparse.ArgumentParser()
    D.add_arguments(p, {})
    return p.parse_args(["--gallery", str(gallery), "--no-warmup", *more])


def test_app_rebuilds_a_damaged_offline_gallery_and_serves(offline_world):
    from isearle import demo as D

    assert D.ensure_offline_gallery(offline_world, progress=False) and len(GalleryIndex.load(offline_world)) == 24
    truncate(offline_world / "index.faiss")
    engine = D.DemoEngine.start(_app_args(offline_world), warm=False)
    assert len(engine.notices) == 1
    one_line(ValueError(engine.notices[0]), "index.faiss of the offline gallery is truncated", "it was rebuilt")
    result = engine.search(None, Image.new("RGB", (64, 64), "red"), "is blue", 5, "phi", 10)
    assert len(result.items) == 5 and len(GalleryIndex.load(offline_world)) == 24


def test_app_shows_a_damaged_gallery_in_one_line(offline_world, tmp_path):
    """A damaged gallery the app cannot rebuild is skipped with a notice, and asking for it gives a
    one-line gr.Error (no traceback), while the offline gallery keeps serving."""
    import gradio as gr

    from isearle import demo as D

    sys.path.insert(0, str(REPO))
    import app

    D.ensure_offline_gallery(offline_world, progress=False)
    other = tmp_path / "other"
    shutil.copytree(offline_world, other)
    (other / "items.json").write_text("{")
    engine = D.DemoEngine.start(_app_args(Path(f"{other},{offline_world}")), warm=False)
    assert list(engine.entries) == [D.GalleryEntry(offline_world).key]
    assert len(engine.notices) == 1 and "other/items.json is truncated (1 of" in engine.notices[0]
    engine.entries[D.GalleryEntry(other).key] = D.GalleryEntry(other)  # the user picks it anyway
    with pytest.raises(gr.Error) as e:
        app.guarded(engine.load)(D.GalleryEntry(other).key)
    one_line(ValueError(e.value.message), "other/items.json is truncated (1 of", "rebuild it with `python -m isearle.demo")
    assert len(engine.search(D.GalleryEntry(offline_world).key, Image.new("RGB", (64, 64), "red"), "is blue", 3, "phi", 10).items) == 3


def test_a_failed_panel_leaves_the_results_of_its_search(offline_world, monkeypatch):
    """The page's Search streams the results, then the panel, on one request: when the panel fails
    the results stay on screen and the panel says why in one line (the app keeps serving)."""
    from isearle import demo as D
    from isearle.errors import IsearleError

    sys.path.insert(0, str(REPO))
    import app

    D.ensure_offline_gallery(offline_world, progress=False)
    args = _app_args(offline_world, "--precision", "fp32")  # no `auto` measurement at start-up
    engine = D.DemoEngine.start(args, warm=False)
    blocks = app.build(engine, args)
    stream = next(f.fn for f in blocks.fns.values() if f.name == "search_and_explain")
    ref = Image.new("RGB", (64, 64), "red")
    query = (ref, "is blue", 4, "phi", 10, engine.default_key, False, False)
    results, panel = list(stream(*query))
    assert len(results[0]) == 4 and all(isinstance(u, dict) and u.get("__type__") == "update" for u in results[10:])
    assert "S* reads as" in panel[14] and all(u.get("__type__") == "update" for u in panel[:10])

    def broken(*args, **kwargs):
        raise IsearleError("the concept bank is unreadable: run `isearle concepts` again")

    monkeypatch.setattr(engine, "explain", broken)
    results, panel = list(stream(*query))
    assert len(results[0]) == 4  # the results came first, and nothing later takes them back
    assert all(u.get("__type__") == "update" and "value" not in u for u in panel[:10])
    assert panel[14] == "**The explanation failed:** the concept bank is unreadable: run `isearle concepts` again"
