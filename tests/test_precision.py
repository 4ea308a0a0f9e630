"""`--precision auto|fp32|bf16`: auto keeps bf16 only when faster AND agreeing with fp32; bf16 queries rank
the ShapesCIR examples as fp32 does."""

from __future__ import annotations

import json
import time

import pytest
import torch

from isearle import precision as P
from isearle import tuning as T
from isearle.paths import ASSETS_DIR


def fake_encoder(fp32_s: float, bf16_s: float, bf16_feature: torch.Tensor):
    """encode(precision) that takes the given time and returns a fixed feature per precision."""
    ref = torch.tensor([1.0, 0.0, 0.0])

    def encode(p: str) -> torch.Tensor:
        time.sleep(fp32_s if p == "fp32" else bf16_s)
        return ref if p == "fp32" else bf16_feature

    return encode


AGREES = torch.tensor([1.0, 0.01, 0.0])  # cosine 0.99995
DISAGREES = torch.tensor([1.0, 0.1, 0.0])  # cosine 0.995


def test_auto_keeps_bf16_when_faster_and_agreeing():
    choice = T.choose("auto", fake_encoder(0.02, 0.001, AGREES), native=True, repeat=3)
    assert choice.precision == "bf16" and choice.bf16_ms < choice.fp32_ms and choice.cosine > 0.9999


def test_auto_picks_fp32_where_bf16_disagrees_even_if_faster():
    choice = T.choose("auto", fake_encoder(0.02, 0.001, DISAGREES), native=True, repeat=3)
    assert choice.precision == "fp32" and "disagrees" in choice.reason and choice.cosine < P.MIN_COSINE


def test_auto_picks_fp32_where_bf16_is_slower():
    choice = T.choose("auto", fake_encoder(0.001, 0.02, AGREES), native=True, repeat=3)
    assert choice.precision == "fp32" and "not faster" in choice.reason


def test_auto_without_native_bf16_never_tries_it():
    def encode(p: str) -> torch.Tensor:
        raise AssertionError("must not be measured")

    assert T.choose("auto", encode, native=False).precision == "fp32"
    assert T.choose("bf16", encode, native=False).precision == "bf16"  # asked for: obeyed
    with pytest.raises(ValueError, match="unknown precision"):
        T.choose("fp16", encode, native=True)


def test_retriever_auto_falls_back_to_fp32_when_the_bf16_model_disagrees(tiny, monkeypatch):
    """Injected disagreement: the bf16 copy of the model has a perturbed text projection."""
    from isearle.index import GalleryIndex
    from isearle.retrieval import Retriever

    index = GalleryIndex.build(torch.nn.functional.normalize(torch.randn(20, tiny.embed_dim), dim=-1),
                               [str(i) for i in range(20)], None)
    real = type(tiny).with_precision

    def disagreeing(self, p):
        low = real(self, p)
        with torch.no_grad():
            low.model.text_projection.add_(torch.randn_like(low.model.text_projection) * 0.5)
        return low

    monkeypatch.setattr(type(tiny), "with_precision", disagreeing)
    monkeypatch.setattr("isearle.tuning.bf16_native", lambda device: True)
    monkeypatch.setattr("isearle.tuning.onnx_text.available", lambda backbone: False)
    retriever = Retriever(tiny, index)
    T.tune(retriever, "auto")
    assert retriever.precision.precision == "fp32" and "disagrees" in retriever.precision.reason
    assert retriever.query_backbone is tiny
    monkeypatch.setattr(type(tiny), "with_precision", real)  # an agreeing copy is kept when faster
    choice = T.tune(retriever, "bf16")
    assert retriever.query_backbone.precision == "bf16" and choice.precision == "bf16"
    assert retriever.query_backbone.model.text_projection.dtype == torch.bfloat16  # weights kept in bf16
    assert tiny.model.text_projection.dtype == torch.float32  # OTI's backbone untouched


def test_auto_chooses_per_tower(tiny, monkeypatch):
    """bf16 is kept for the text pass where it agrees and dropped for the image tower where it does
    not (as on a CPU where bf16 helps the text pass and slows the image tower): each tower is measured
    on its own, and uploads are encoded by the image tower's choice."""
    from isearle.index import GalleryIndex
    from isearle.retrieval import Retriever

    index = GalleryIndex.build(torch.nn.functional.normalize(torch.randn(20, tiny.embed_dim), dim=-1),
                               [str(i) for i in range(20)], None)
    real, real_choose = type(tiny).with_precision, T.choose

    def images_disagree(self, p):
        low = real(self, p)
        with torch.no_grad():
            low.model.visual.proj.add_(torch.randn_like(low.model.visual.proj) * 0.5)
        return low

    def bf16_faster(requested, encode, native):  # the real decision, with bf16 made the faster one
        return real_choose(requested, lambda p: (time.sleep(0.01 if p == "fp32" else 0), encode(p))[1], native,
                           repeat=3)

    monkeypatch.setattr(type(tiny), "with_precision", images_disagree)
    monkeypatch.setattr(T, "bf16_native", lambda device: True)
    monkeypatch.setattr(T.onnx_text, "available", lambda backbone: False)  # PyTorch's choice alone
    monkeypatch.setattr(T, "choose", bf16_faster)
    retriever = Retriever(tiny, index)
    T.tune(retriever, "auto")
    assert retriever.precision.precision == "bf16" and retriever.query_backbone.precision == "bf16"
    assert retriever.image_precision.precision == "fp32" and "disagrees" in retriever.image_precision.reason
    assert retriever.image_backbone is tiny
    report = retriever.precision_report()
    assert report.startswith("text bf16 (auto") and "images fp32 (auto: bf16 disagrees" in report
    from PIL import Image

    image = Image.new("RGB", (40, 30), "blue")
    with torch.inference_mode():
        assert torch.equal(retriever.image_features(image)[1], tiny.encode_pil([image])[0])


def test_a_warm_query_hashes_its_reference_once(tiny, monkeypatch):
    """A query computes the reference's content hash once, not per step (hashing a photo is not free)."""
    from PIL import Image

    from isearle import retrieval
    from isearle.index import GalleryIndex
    from isearle.phi import Phi
    from isearle.retrieval import Retriever

    index = GalleryIndex.build(torch.nn.functional.normalize(torch.randn(20, tiny.embed_dim), dim=-1),
                               [str(i) for i in range(20)], None)
    retriever = Retriever(tiny, index, Phi.for_backbone(tiny.embed_dim, tiny.token_width))
    calls = []
    real = retrieval.image_key
    monkeypatch.setattr(retrieval, "image_key", lambda im: calls.append(1) or real(im))
    image = Image.new("RGB", (640, 480), "blue")
    retriever.query(image, "is red")  # cold: features, phi, prefix, caption
    retriever.query(image, "is green")  # warm
    assert len(calls) == 2


@pytest.fixture(scope="module")
def shapes_service():
    from isearle.service import load_service

    torch.set_num_threads(min(2, torch.get_num_threads()))
    return load_service(ASSETS_DIR.parent / "gallery_index", precision="fp32")


@pytest.mark.parametrize("method", ["phi", "image+text"])
def test_bf16_and_fp32_give_the_same_top10_on_the_shapescir_examples(shapes_service, method):
    """Same ten items, in the same order up to near-ties: the item at each rank of the bf16 list scores
    (by the fp32 query) within 5e-4 of fp32's item at that rank. Measured: 23 of 24 lists hold the same
    ten items (the other swaps its 10th and 11th, 1e-4 apart); orders differ only among items < 2e-4 apart."""
    from isearle.retrieval import Retriever
    from isearle.shapes.world import render_dict

    examples = json.loads((ASSETS_DIR / "examples.json").read_text())["references"]
    size = int(shapes_service.index.info.get("render_size", shapes_service.backbone.image_size))
    fp32 = shapes_service.retriever
    bf16 = Retriever(fp32.backbone, fp32.index, shapes_service.phi)
    T.tune(bf16, "bf16")
    assert bf16.query_backbone.precision == "bf16"
    same_items, worst, moved = 0, 0.0, 0.0
    for ex in examples:
        image = render_dict(ex["reference_spec"], size)
        a = fp32.query_feature(image, ex["relative_caption"], method)
        b = bf16.query_feature(image, ex["relative_caption"], method)
        assert float(a @ b) > 0.9999
        moved = max(moved, float((a - b).abs().max()))
        scores = {h.id: h.score for h in fp32.search(a, 50)}  # fp32's scores of every candidate
        ids_a = [h.id for h in fp32.search(a, 10)]
        ids_b = [h.id for h in bf16.search(b, 10)]
        same_items += set(ids_a) == set(ids_b)
        worst = max(worst, *(abs(scores[x] - scores.get(y, -1.0)) for x, y in zip(ids_a, ids_b, strict=True)))
    assert moved > 1e-6  # the bf16 path really ran (its features are not fp32's bit for bit)
    assert worst <= 5e-4, f"a bf16 rank holds an item {worst:.1e} worse than fp32's (fp32 scores)"
    assert same_items >= len(examples) - 1, f"{same_items}/{len(examples)} lists with the same ten items"


def test_app_setting_precision_reaches_the_query_path(tmp_path):
    """--precision / ISEARLE_PRECISION: bf16 -> the loaded gallery's queries run on the bf16 copy
    (reported by /info); a bad value is refused by the flag parser with the allowed ones."""
    import argparse

    from isearle import demo as D

    p = argparse.ArgumentParser()
    D.add_arguments(p, {"ISEARLE_PRECISION": "bf16"})
    args = p.parse_args(["--examples", str(tmp_path / "none.json"), "--no-warmup"])
    assert args.precision == "bf16"
    engine = D.DemoEngine.start(args, warm=False)
    retriever = engine.load().retriever
    assert retriever.query_backbone.precision == "bf16" and retriever.backbone.precision != "bf16"
    assert engine.info()["precision"].startswith("bf16")
    p = argparse.ArgumentParser()
    D.add_arguments(p, {})
    assert p.parse_args([]).precision == P.DEFAULT_PRECISION == "auto"
    with pytest.raises(SystemExit):
        p.parse_args(["--precision", "fp16"])


# ------------------------------------------------------------------------ compute precisions
def test_fp16_means_fp16_on_every_device(tiny, monkeypatch, caplog):
    """One meaning per word: a backbone that says fp16 runs fp16 autocast, on the CPU too where torch
    supports it (else fp32, said in the log); load_backbone's CPU default is fp32, not a no-op fp16."""
    import dataclasses

    assert tiny.precision == "fp32" and P.default_compute_precision("cuda") == "fp16"
    x = torch.ones(2, 2)
    with tiny.autocast:
        assert (x @ x).dtype == torch.float32
    if P.fp16_autocast_supported("cpu"):
        with dataclasses.replace(tiny, precision="fp16").autocast:
            assert (x @ x).dtype == torch.float16
        assert P.grad_scaler("cpu", "fp16").is_enabled()
    with dataclasses.replace(tiny, precision="bf16").autocast:
        assert (x @ x).dtype == torch.bfloat16
    assert not P.grad_scaler("cpu", "bf16").is_enabled() and not P.grad_scaler("cpu", "fp32").is_enabled()
    monkeypatch.setattr(P, "_cpu_fp16_autocast", lambda: False)
    with caplog.at_level("WARNING"):
        assert P.effective_precision("fp16", "cpu") == "fp32"
        with P.compute_autocast("cpu", "fp16"):
            assert (x @ x).dtype == torch.float32
    assert "running fp32" in caplog.text
    with pytest.raises(ValueError, match="unknown precision"):
        P.effective_precision("auto", "cpu")  # the query path's word, not a compute precision


@pytest.mark.parametrize("command", [["eval", "--benchmark", "shapes"], ["train-phi", "--oti", "x", "--out", "y"],
                                     ["oti", "--shapes", "2", "--out", "x"], ["index", "--shapes", "2"],
                                     ["train-clip"]])
def test_every_command_takes_the_same_precision_words(command):
    from isearle.cli import build_parser

    p = build_parser()
    for word in P.COMPUTE_PRECISIONS:
        assert p.parse_args([*command, "--precision", word]).precision == word
    with pytest.raises(SystemExit):
        p.parse_args([*command, "--precision", "auto"])
    with pytest.raises(SystemExit):
        p.parse_args(["index", "--shapes", "2", "--bf16"])  # replaced by --precision bf16
