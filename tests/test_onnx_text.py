"""The warm query's text pass on ONNX Runtime equals PyTorch's, and `auto` uses it only where it pays."""

import importlib.util

import pytest
import torch

from isearle import onnx_text, prefix_cache
from isearle.pseudo_word import encode_tokens, fill_template, tokenize_prompts

pytestmark = pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None, reason="onnxruntime is not installed")
TEMPLATE = "a photo of $ that {}"
CAPTIONS = ["is blue", "shows the same car but at night with the lights on", "has two dogs , on a beach", "word " * 90]


@pytest.fixture(scope="module")
def engine(tiny):
    return onnx_text.OnnxText(tiny)


def _prefix_ids(backbone):
    ids = backbone.tokenize(["a photo of $ that"])[0]
    return ids[: int(ids.argmax())]


def test_the_exported_continuation_equals_the_pytorch_pass(tiny, engine):
    """Caption lengths from 2 to 71 tokens (one cut at the context length) after one prefix; the
    graph's lengths are free, not those it was exported with."""
    assert onnx_text.available(tiny)
    torch.manual_seed(0)
    token = torch.randn(tiny.token_width) * 0.05
    with torch.inference_mode():
        _, prefix = prefix_cache.PromptPrefix.first(tiny, tokenize_prompts(tiny, [fill_template(TEMPLATE, "x")]),
                                                    token, _prefix_ids(tiny))
        for caption in CAPTIONS:
            tokens = tokenize_prompts(tiny, [fill_template(TEMPLATE, caption)])
            full = encode_tokens(tiny, tokens, token)
            got = prefix.encode(tokens, engine)
            assert float((got - full).abs().max() / full.abs().max()) <= 2e-5, caption
        other = prefix.encode(tokens, lambda x, past: engine(x, past * 1.5))  # the keys/values are used
        assert float((other - full).abs().max()) > 1e-3


def _retriever(backbone, monkeypatch, onnx_faster: bool, spoil: bool = False):
    """Retriever(auto) where bf16 is not native and ONNX Runtime is made faster (or slower) by a pause."""
    import time

    from isearle import tuning
    from isearle.index import GalleryIndex
    from isearle.retrieval import Retriever

    real_call = onnx_text.OnnxText.__call__

    def timed(self, x, past):
        time.sleep(0 if onnx_faster else 0.05)
        out = real_call(self, x, past)
        return out + torch.randn_like(out) * out.abs().max() if spoil else out

    monkeypatch.setattr(onnx_text.OnnxText, "__call__", timed)
    monkeypatch.setattr(tuning, "bf16_native", lambda device: False)
    real_encode = prefix_cache.PromptPrefix.encode

    def slow_torch(self, tokens, engine=None):
        if engine is None and onnx_faster:
            time.sleep(0.05)
        return real_encode(self, tokens, engine)

    monkeypatch.setattr(prefix_cache.PromptPrefix, "encode", slow_torch)
    vectors = torch.nn.functional.normalize(torch.randn(30, backbone.embed_dim), dim=-1)
    retriever = Retriever(backbone, GalleryIndex.build(vectors, [str(i) for i in range(30)], None))
    tuning.tune(retriever, "auto")
    monkeypatch.setattr(prefix_cache.PromptPrefix, "encode", real_encode)
    return retriever


def test_auto_runs_warm_captions_on_onnx_runtime_where_faster(tiny, monkeypatch):
    from PIL import Image

    from isearle.pseudo_word import encode_with_pseudo_tokens

    retriever = _retriever(tiny, monkeypatch, onnx_faster=True)
    assert retriever.text_engine is not None and retriever.query_backbone is tiny
    assert "ONNX Runtime fp32 (auto: faster and agrees" in retriever.precision_report()
    calls = []
    real = onnx_text.OnnxText.__call__
    monkeypatch.setattr(onnx_text.OnnxText, "__call__", lambda self, x, p: calls.append(1) or real(self, x, p))
    from isearle.oti import OTIConfig

    image, oti = Image.new("RGB", (50, 40), "green"), OTIConfig(steps=2, batch_size=1)
    for caption in CAPTIONS[:3]:
        with torch.inference_mode():
            got = retriever.query_feature(image, caption, "oti", oti)
            token = retriever.tokens.get(retriever._token_key(retriever.image_features(image)[0], "oti", oti))
            want = torch.nn.functional.normalize(
                encode_with_pseudo_tokens(tiny, [fill_template(retriever.template, caption)], token), dim=-1)[0]
        assert float((got - want).abs().max()) <= 1e-5, caption
    assert len(calls) == 2  # the first caption builds the prefix in PyTorch, the later ones run on ONNX Runtime


@pytest.mark.parametrize("onnx_faster, spoil, why", [(False, False, "is not faster"), (True, True, "disagrees")])
def test_auto_keeps_pytorch_where_onnx_runtime_is_slower_or_disagrees(tiny, monkeypatch, onnx_faster, spoil, why):
    retriever = _retriever(tiny, monkeypatch, onnx_faster=onnx_faster, spoil=spoil)
    assert retriever.text_engine is None
    assert f"warm captions on PyTorch (auto: ONNX Runtime {why}" in retriever.precision_report()


def test_without_onnxruntime_auto_stays_on_pytorch(tiny, monkeypatch):
    from isearle import tuning
    from isearle.index import GalleryIndex
    from isearle.retrieval import Retriever

    monkeypatch.setattr(onnx_text, "available", lambda backbone: False)
    monkeypatch.setattr(tuning, "bf16_native", lambda device: False)
    vectors = torch.nn.functional.normalize(torch.randn(30, tiny.embed_dim), dim=-1)
    retriever = Retriever(tiny, GalleryIndex.build(vectors, [str(i) for i in range(30)], None))
    tuning.tune(retriever, "auto")
    assert retriever.text_engine is None and "ONNX" not in retriever.precision_report()


def test_the_exported_graph_is_kept_on_disk_per_weights(tiny, tmp_path, monkeypatch):
    """A second start reads the graph of the same weights instead of exporting it (no exporter call),
    and computes the same; a damaged file is exported again; random-init weights are never cached."""
    from isearle.backbone import load_backbone

    checkpoint = tmp_path / "tiny.pt"
    torch.save(tiny.model.state_dict(), checkpoint)
    backbone = load_backbone("isearle-tiny-test", str(checkpoint), "cpu")
    first = onnx_text.OnnxText(backbone)
    path = onnx_text.graph_path(backbone)
    assert first.exported and path.is_file()

    def no_export(backbone):
        raise AssertionError("exported again")

    real_export = onnx_text.export
    monkeypatch.setattr(onnx_text, "export", no_export)
    second = onnx_text.OnnxText(backbone)
    assert not second.exported
    x, past = torch.randn(1, 5, backbone.token_width), torch.randn(len(backbone.text.transformer.resblocks), 2, 1, 6,
                                                                    backbone.token_width)
    assert torch.equal(first(x, past), second(x, past))
    path.write_bytes(b"not a graph")
    monkeypatch.setattr(onnx_text, "export", real_export)
    third = onnx_text.OnnxText(backbone)
    assert third.exported and torch.allclose(third(x, past), first(x, past), atol=1e-6)
    assert onnx_text.graph_path(tiny) is None  # random init: no key, never cached
