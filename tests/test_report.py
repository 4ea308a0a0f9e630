"""`isearle inspect`'s report: unreadable files skipped and named, what each S* retrieves, a readable
header, the usual file modes, --cold honoured, and an offline hint towards the bundled model."""

import json
import logging
import os

import pytest
from PIL import Image, ImageDraw

from isearle.report import inspect_folder, open_inspector


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("report-images")
    for i, colour in enumerate(["red", "blue", "green", "orange"]):
        image = Image.new("RGB", (64, 64), "white")
        ImageDraw.Draw(image).ellipse([8 + 4 * i, 8, 56, 56 - 4 * i], fill=colour)
        image.save(d / f"{i}-{colour}.png")
    (d / "broken.png").write_text("this is text, not a picture")
    return d


@pytest.fixture(scope="module")
def phi(tmp_path_factory):
    from isearle.phi import Phi, save_phi

    return str(save_phi(Phi.for_backbone(64, 48), tmp_path_factory.mktemp("phi") / "phi.safetensors"))


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """The tiny test CLIP saved once: every run of a test inspects with the same weights."""
    import torch

    from isearle.backbone import load_backbone

    torch.manual_seed(3)
    path = tmp_path_factory.mktemp("tiny") / "tiny.pt"
    torch.save(load_backbone("isearle-tiny-test", None, "cpu").model.state_dict(), path)
    return str(path)


def _run(folder, out, weights, **kw):
    return inspect_folder(folder, out, "isearle-tiny-test", weights, methods=kw.pop("methods", ["phi", "oti"]),
                          steps=kw.pop("steps", 4), json_twin=True, progress=False, **kw)


def test_the_report_skips_and_names_unreadable_files_and_shows_what_each_s_retrieves(folder, phi, weights, tmp_path,
                                                                                        caplog):
    with caplog.at_level(logging.WARNING, logger="isearle.report"):
        paths = _run(folder, tmp_path / "out", weights, phi=phi)
    assert any("broken.png" in r.getMessage() and "skipped" in r.getMessage() for r in caplog.records)
    data = json.loads(paths["json"].read_text())
    assert [s["path"] for s in data["skipped"]] == ["broken.png"] and "upload" not in data["skipped"][0]["reason"]
    assert len(data["images"]) == 4
    for row in data["images"]:
        for method in ("phi", "oti"):
            hits = row["retrieved"][method]
            assert len(hits) == 3 and row["path"] not in [h[0] for h in hits]
            assert [h[1] for h in hits] == sorted((h[1] for h in hits), reverse=True)
    page = paths["html"].read_text()
    assert "broken.png" in page and page.count("class=retrieved") == 8
    assert "<dl class=settings" in page and '{"model"' not in page and "&quot;model&quot;" not in page
    assert str(tmp_path) not in page and str(tmp_path) not in paths["json"].read_text()  # no server paths
    mask = os.umask(0)
    os.umask(mask)
    for p in paths.values():
        assert p.stat().st_mode & 0o777 == 0o666 & ~mask


def test_cold_is_honoured(folder, phi, weights, tmp_path):
    warm = json.loads(_run(folder, tmp_path / "warm", weights, methods=["oti"], phi=phi)["json"].read_text())
    again = json.loads(_run(folder, tmp_path / "again", weights, methods=["oti"], phi=phi)["json"].read_text())
    cold = json.loads(_run(folder, tmp_path / "cold", weights, methods=["oti"], phi=phi, warm=False)["json"].read_text())
    assert cold["info"]["oti"]["warm_start"] is None and "cold start" in (tmp_path / "cold" / "index.html").read_text()
    assert warm["info"]["oti"]["warm_start"] is not None
    norms = {name: [r["oti"]["norm"] for r in run["images"]] for name, run in
             (("warm", warm), ("again", again), ("cold", cold))}
    assert norms["warm"] == norms["again"] and norms["warm"] != norms["cold"]


def test_offline_missing_weights_suggest_the_bundled_model(monkeypatch):
    from isearle.backbone import WeightsUnavailable

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    try:
        open_inspector("ViT-B-16", "laion400m_e31", progress=False)
    except WeightsUnavailable as err:
        assert "--model isearle-shapes --pretrained isearle-shapes" in str(err) and "\n" not in str(err)
    else:
        pytest.skip("those weights are cached on this machine")
