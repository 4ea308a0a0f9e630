"""The bundled models are checked before use: a flipped byte is a one-line error, never silent answers.

The legacy-format files in assets/models carry no checksum of their own; `assets/models/checksums.json`
lists each with its size and SHA-256 and every read verifies against it. Safetensors files isearle
writes have their metadata in a fixed order, so identical content gives identical bytes.
"""

import json
import logging
import shutil
import struct
import subprocess
import sys

import pytest
import torch

from isearle import artifacts, paths
from isearle.artifacts import (
    CHECKSUMS,
    ArtifactError,
    check_legacy,
    load_tensors,
    save_tensors,
    tensors_bytes,
)
from isearle.paths import REPO_DIR

MODELS = REPO_DIR / "assets" / "models"
BUNDLED = sorted(p.name for p in MODELS.glob("*.safetensors"))
pytestmark = pytest.mark.skipif(not BUNDLED, reason="no bundled models in this checkout")


def flip_exponent(path):
    """XOR 0x40 into the high byte (sign + exponent) of the first non-zero float of the first tensor."""
    data = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    name = sorted(k for k in header if k != "__metadata__")[0]
    entry = header[name]
    width = {"F32": 4, "F16": 2, "BF16": 2}[entry["dtype"]]
    start, end = (8 + n + o for o in entry["data_offsets"])
    for at in range(start, end, width):
        if any(data[at:at + width]):
            data[at + width - 1] ^= 0x40  # little endian: the last byte holds sign and exponent
            path.write_bytes(bytes(data))
            return name
    raise AssertionError(f"{path.name}: {name} is all zeros")


@pytest.fixture
def assets_copy(tmp_path, monkeypatch):
    """A copy of assets/ (models copied, the rest linked) that `paths.ASSETS_DIR` points to."""
    root = tmp_path / "assets"
    root.mkdir()
    for item in (REPO_DIR / "assets").iterdir():
        if item.name == "models":
            shutil.copytree(item, root / "models")
        else:
            (root / item.name).symlink_to(item)
    monkeypatch.setattr(paths, "ASSETS_DIR", root)
    return root


def test_every_bundled_file_is_listed_and_matches():
    listed = json.loads((MODELS / CHECKSUMS).read_text())["files"]
    on_disk = {p.name for p in MODELS.iterdir() if p.name != CHECKSUMS}
    assert set(listed) == on_disk
    for name in on_disk:
        assert check_legacy(MODELS / name, "") is True


def _one_line(err: Exception, name: str) -> None:
    text = str(err)
    assert "\n" not in text and name in text and "corrupt" in text, text


@pytest.mark.parametrize("name", BUNDLED)
def test_a_flipped_exponent_byte_in_a_bundled_model_is_a_one_line_error(assets_copy, name):
    from isearle.backbone import load_backbone
    from isearle.phi import load_phi

    flip_exponent(assets_copy / "models" / name)
    with pytest.raises(ArtifactError) as caught:
        if name == "isearle-shapes.safetensors":
            load_backbone("isearle-shapes", "isearle-shapes", "cpu")
        else:
            load_phi(assets_copy / "models" / name)
    _one_line(caught.value, name)


@pytest.mark.parametrize("name", ["isearle-shapes.safetensors", "isearle-shapes-phi.safetensors"])
def test_the_cli_query_on_a_flipped_bundled_model_exits_with_one_line(assets_copy, name, tmp_path):
    """`isearle query` on the offline world: exit 1 and one line, not results from damaged weights."""
    if not (REPO_DIR / "gallery_index" / "index.json").is_file() or name not in BUNDLED:
        pytest.skip("needs the offline world's gallery")
    from PIL import Image

    flip_exponent(assets_copy / "models" / name)
    image = tmp_path / "ref.png"
    Image.new("RGB", (64, 64), (200, 30, 30)).save(image)
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO_DIR), "HF_HUB_OFFLINE": "1",
           "ISEARLE_ASSETS": str(assets_copy), "ISEARLE_CACHE": str(tmp_path / "cache"), "HOME": str(tmp_path)}
    run = subprocess.run([sys.executable, "-m", "isearle", "query", "--model", "isearle-shapes", "--pretrained",
                          "isearle-shapes", "--gallery", str(REPO_DIR / "gallery_index"), "--image", str(image),
                          "--caption", "is blue instead", "--top-k", "3"],
                         capture_output=True, text=True, env=env, timeout=300, check=False)
    assert run.returncode != 0, run.stdout
    lines = [line for line in run.stderr.splitlines() if line.startswith("error")]
    assert len(lines) == 1 and name in lines[0] and "corrupt" in lines[0], run.stderr
    assert "Traceback" not in run.stderr


def test_an_unlisted_legacy_file_says_so_once_in_the_log(tmp_path, caplog):
    from safetensors.torch import save_file

    path = tmp_path / "old.safetensors"
    save_file({"w": torch.ones(3)}, str(path))
    with caplog.at_level(logging.WARNING, logger="isearle.artifacts"):
        for _ in range(3):
            load_tensors(path, "phi", "")
    said = [r for r in caplog.records if "without a checksum" in r.getMessage()]
    assert len(said) == 1 and "old.safetensors" in said[0].getMessage()


def test_a_listed_legacy_file_is_verified(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "old.safetensors"
    save_file({"w": torch.arange(8, dtype=torch.float32) + 1}, str(path))
    artifacts.write_checksums(tmp_path, [path.name])
    assert load_tensors(path, "phi", "")[0]["w"].sum() == 36
    flip_exponent(path)
    with pytest.raises(ArtifactError, match="old.safetensors is corrupt"):
        load_tensors(path, "phi", "")


def test_identical_content_gives_identical_bytes(tmp_path):
    """Metadata in a fixed order: safetensors alone writes its metadata map in hash order."""
    tensors = {"b": torch.randn(5), "a": torch.arange(4, dtype=torch.float32)}
    meta = {f"key{i}": str(i) * 3 for i in range(12)}
    blobs = set()
    for n in range(6):
        save_tensors(tmp_path / f"{n}.safetensors", tensors, "progress", dict(reversed(meta.items())) if n % 2 else meta)
        blobs.add((tmp_path / f"{n}.safetensors").read_bytes())
    assert len(blobs) == 1
    loaded, read_meta = load_tensors(tmp_path / "0.safetensors", "progress", "")
    assert read_meta == meta and torch.equal(loaded["a"], tensors["a"])
    assert tensors_bytes(tensors, meta) == tensors_bytes(dict(reversed(tensors.items())), meta)


def test_outputs_get_the_usual_file_mode(tmp_path):
    """Atomic writes go through mkstemp (0600): the file ends with the mode `open` would give it."""
    import os

    out = artifacts.write_text(tmp_path / "x.txt", "x")
    mask = os.umask(0)
    os.umask(mask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~mask
