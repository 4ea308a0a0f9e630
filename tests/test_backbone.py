"""Backbone loading: offline decisions, QuickGELU mapping, the tiny test model, targetpad, the placeholder."""

import time

import huggingface_hub
import pytest
import torch
from PIL import Image

import isearle.backbone
import isearle.paths
from isearle.backbone import (
    QUICKGELU_ALIASES,
    WeightsUnavailable,
    build_preprocess,
    canonical_name,
    load_backbone,
    targetpad_transform,
)


@pytest.fixture
def empty_hub_cache(tmp_path, monkeypatch):
    """The real cache lookup, pointed at an empty cache: 'not cached' whatever this machine holds."""
    real = huggingface_hub.try_to_load_from_cache
    calls: list[str] = []

    def lookup(repo_id, filename, *args, **kwargs):
        calls.append(repo_id)
        return real(repo_id, filename, cache_dir=tmp_path / "hub")

    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lookup)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return calls



def test_hub_client_is_offline_for_the_whole_session():
    """conftest sets HF_HUB_OFFLINE before huggingface_hub is imported (it reads it once)."""
    from huggingface_hub import constants

    assert constants.HF_HUB_OFFLINE
    assert isearle.backbone.hub_offline()

def test_openai_weights_offline_fail_fast_and_map_to_quickgelu(empty_hub_cache):
    start = time.perf_counter()
    with pytest.raises(WeightsUnavailable) as info:
        load_backbone("ViT-B-32", "openai", device="cpu")
    elapsed = time.perf_counter() - start
    assert elapsed < 1.0, f"offline decision took {elapsed:.2f} s"
    message = str(info.value)
    assert "ViT-B-32-quickgelu" in message and "openai" in message  # names the (QuickGELU) model
    assert "\n" not in message
    assert empty_hub_cache, "the cache must be checked before giving up"


def test_quickgelu_aliases():
    assert canonical_name("ViT-B-32", "openai") == "ViT-B-32-quickgelu"  # the one mapping (load, index, service)
    assert canonical_name("ViT-B-32", None) == canonical_name("ViT-B-32", "laion2b_s34b_b79k") == "ViT-B-32"
    assert canonical_name("isearle-shapes", "openai") == "isearle-shapes"
    assert QUICKGELU_ALIASES["ViT-B-32"] == "ViT-B-32-quickgelu"
    assert QUICKGELU_ALIASES["ViT-L-14"] == "ViT-L-14-quickgelu"
    import open_clip

    for name in QUICKGELU_ALIASES.values():
        assert name in open_clip.list_models()
        assert open_clip.get_pretrained_cfg(name, "openai")


def test_unknown_model_and_tag_raise_weights_unavailable():
    with pytest.raises(WeightsUnavailable, match="no-such-model"):
        load_backbone("no-such-model", None, device="cpu")
    with pytest.raises(WeightsUnavailable, match="known tags"):
        load_backbone("ViT-B-32", "no-such-tag", device="cpu")


def test_missing_bundled_weights_say_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setattr(isearle.paths, "ASSETS_DIR", tmp_path)
    with pytest.raises(WeightsUnavailable, match="bundled weights"):
        isearle.backbone._resolve_pretrained("isearle-shapes", "isearle-shapes")


def test_tiny_model(tiny):
    assert tiny.name == "isearle-tiny-test" and tiny.pretrained is None
    assert tiny.device == torch.device("cpu")
    assert (tiny.embed_dim, tiny.token_width, tiny.context_length, tiny.image_size) == (64, 48, 77, 32)
    assert not tiny.model.training
    assert not any(p.requires_grad for p in tiny.model.parameters())
    feats = tiny.encode_pil([Image.new("RGB", (50, 20), "red"), Image.new("L", (8, 8), 3)])
    assert feats.shape == (2, 64) and feats.dtype == torch.float32
    assert tiny.encode_texts(["a dog", "a cat"]).shape == (2, 64)


def test_vitb32_architecture(vitb32):
    assert vitb32.name == "ViT-B-32"
    assert (vitb32.embed_dim, vitb32.token_width, vitb32.context_length, vitb32.image_size) == (512, 512, 77, 224)


@pytest.mark.parametrize("name", ["tiny", "vitb32"])
def test_placeholder_id_is_259(name, request):
    backbone = request.getfixturevalue(name)
    assert backbone.placeholder_id == 259
    ids = backbone.tokenize(["a photo of $ that is red"])[0]
    assert int((ids == 259).sum()) == 1
    assert int(ids.max()) == 49407 and int(ids.max()) < backbone.token_embedding.num_embeddings


def test_targetpad_pads_elongated_images_to_ratio_1_25():
    pad = targetpad_transform(224)
    wide = Image.new("RGB", (300, 100), (255, 255, 255))
    out = pad(wide)
    w, h = out.size
    assert w == 300 and max(w, h) / min(w, h) == pytest.approx(1.25, abs=0.02)
    assert out.getpixel((150, 0)) == (0, 0, 0) and out.getpixel((150, h - 1)) == (0, 0, 0)  # black bands
    assert out.getpixel((150, h // 2)) == (255, 255, 255)  # the image itself, centred
    assert out.getpixel((0, h // 2)) == (255, 255, 255)  # no padding along the long side
    tall = pad(Image.new("RGB", (100, 300), "white"))
    assert tall.size[1] == 300 and max(tall.size) / min(tall.size) == pytest.approx(1.25, abs=0.02)
    square = Image.new("RGB", (120, 120), "white")
    assert pad(square) is square
    mild = Image.new("RGB", (120, 100), "white")  # ratio 1.2 < 1.25: left alone
    assert pad(mild) is mild


def test_preprocess_kinds():
    pre = build_preprocess("targetpad", 32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    x = pre(Image.new("RGB", (90, 30), "white"))
    assert x.shape == (3, 32, 32)
    assert float(x[:, 0, 16].max()) == pytest.approx(-1.0)  # top row: black padding
    clip = build_preprocess("clip", 32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert float(clip(Image.new("RGB", (90, 30), "white"))[:, 0, 16].min()) == pytest.approx(1.0)  # cropped
    with pytest.raises(ValueError, match="targetpad"):
        build_preprocess("squash", 32, (0.5,) * 3, (0.5,) * 3)
