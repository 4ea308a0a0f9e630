"""Images in (open_image, folders, features) and composed retrieval out (compose_queries, Retriever, LRU)."""

import io
import struct
import time
import warnings
import zlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import isearle.retrieval
from isearle.images import BadImage, extract_features, list_images, open_image
from isearle.oti import OTIConfig
from isearle.phi import Phi
from isearle.pseudo_word import encode_with_pseudo_tokens
from isearle.retrieval import METHODS, LRUCache, Retriever, compose_queries, image_key


def _png(image: Image.Image, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG", **kwargs)
    return buf.getvalue()


def _jpeg(image: Image.Image, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=95, **kwargs)
    return buf.getvalue()


def _close(pixel, expected, tol=12) -> bool:
    return all(abs(int(a) - int(b)) <= tol for a, b in zip(pixel, expected, strict=True))


# ----------------------------------------------------------------------------------- open_image
def test_rgba_png_is_composited_on_white():
    image = Image.new("RGBA", (10, 10), (255, 0, 0, 255))
    image.paste((0, 0, 255, 0), (5, 0, 10, 10))  # right half fully transparent
    out = open_image(_png(image))
    assert out.mode == "RGB" and out.size == (10, 10)
    assert out.getpixel((1, 5)) == (255, 0, 0)
    assert out.getpixel((8, 5)) == (255, 255, 255)


def test_palette_png():
    image = Image.new("RGB", (12, 6), (0, 200, 0)).convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    out = open_image(_png(image))
    assert out.mode == "RGB" and _close(out.getpixel((3, 3)), (0, 200, 0), tol=2)
    transparent = Image.new("P", (4, 4), 1)
    transparent.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    transparent.info["transparency"] = 1
    assert open_image(_png(transparent, transparency=1)).getpixel((0, 0)) == (255, 255, 255)


def test_cmyk_jpeg():
    image = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # red in CMYK
    data = _jpeg(image)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    out = open_image(data)
    assert out.mode == "RGB" and _close(out.getpixel((8, 8)), (255, 0, 0), tol=30)


def test_16_bit_png_is_scaled_not_clipped():
    values = (np.arange(32 * 32).reshape(32, 32) * 64).astype(np.uint16)  # 0 .. 65472
    data = _png(Image.fromarray(values))
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    out = np.asarray(open_image(data))
    assert out.shape == (32, 32, 3)
    expected = values.astype(np.float64) / 256
    assert np.abs(out[..., 0] - expected).max() <= 1.0
    assert np.array_equal(out[..., 0], out[..., 2])  # grey


def test_exif_rotated_jpeg_is_upright():
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    image.paste((0, 0, 255), (20, 0, 40, 20))  # stored: red left, blue right
    exif = Image.Exif()
    exif[274] = 6  # orientation: rotate 90 degrees clockwise to display
    out = open_image(_jpeg(image, exif=exif.tobytes()))
    assert out.size == (20, 40)
    assert _close(out.getpixel((10, 5)), (255, 0, 0), tol=40)  # left went to the top
    assert _close(out.getpixel((10, 35)), (0, 0, 255), tol=40)


def test_paths_and_pil_images(tmp_path):
    path = tmp_path / "a.png"
    Image.new("L", (6, 4), 128).save(path)
    assert open_image(path).getpixel((0, 0)) == (128, 128, 128)
    assert open_image(str(path)).size == (6, 4)
    assert open_image(Image.new("LA", (3, 3), (10, 255))).getpixel((1, 1)) == (10, 10, 10)


def _bad(source, **kwargs) -> str:
    with pytest.raises(BadImage) as info:
        open_image(source, **kwargs)
    message = str(info.value)
    assert message and "\n" not in message, message
    return message


def test_bad_images_raise_one_line_messages(tmp_path):
    assert "readable" in _bad(b"this is not an image at all")
    assert "readable" in _bad(b"")
    full = _png(Image.effect_noise((64, 64), 50).convert("RGB"))
    assert "readable" in _bad(full[: len(full) // 2])  # truncated PNG
    text = tmp_path / "fake.png"
    text.write_text("hello")
    _bad(text)


def _patch_png_size(data: bytes, width: int, height: int) -> bytes:
    """Rewrite the IHDR size of a PNG (and its CRC): a tiny file that claims a huge image."""
    assert data[12:16] == b"IHDR"
    ihdr = struct.pack(">II", width, height) + data[24:29]
    crc = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr) & 0xFFFFFFFF)
    return data[:16] + ihdr + crc + data[33:]


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_decompression_bombs_are_refused_without_decoding():
    small = _png(Image.new("RGB", (8, 8), "white"))
    start = time.perf_counter()
    assert "too large" in _bad(_patch_png_size(small, 20000, 20000))  # 400 Mpx: PIL's own guard
    assert "too large" in _bad(_patch_png_size(small, 7000, 7000))  # 49 Mpx: over our 40 Mpx limit
    assert time.perf_counter() - start < 1.0
    assert "too large" in _bad(small, max_pixels=32)
    assert open_image(small, max_pixels=64).size == (8, 8)


def test_bomb_warning_as_error_is_still_bad_image():
    """With warnings as errors (-W error), PIL's 40-80 Mpx bomb warning still becomes BadImage."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(BadImage):
            open_image(_patch_png_size(_png(Image.new("RGB", (8, 8))), 7000, 7000))


# ------------------------------------------------------------------------------- folders, features
def test_list_images(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ("b.png", "a.JPG", "sub/c.webp", "notes.txt", "sub/d.json"):
        (tmp_path / name).write_bytes(b"x")
    assert [p.relative_to(tmp_path).as_posix() for p in list_images(tmp_path)] == ["a.JPG", "b.png", "sub/c.webp"]
    with pytest.raises(FileNotFoundError):
        list_images(tmp_path / "missing")


def test_extract_features_in_order(tiny, tmp_path):
    colours = ["red", "green", "blue", "white", "black"]
    paths = []
    for c in colours:
        paths.append(tmp_path / f"{c}.png")
        Image.new("RGB", (48, 24), c).save(paths[-1])
    items = paths[:3] + [lambda c=c: Image.new("RGB", (48, 24), c) for c in colours[3:]]
    feats = extract_features(tiny, items, batch_size=2, progress=False)
    expected = tiny.encode_pil([Image.new("RGB", (48, 24), c) for c in colours])
    assert feats.shape == (5, tiny.embed_dim)
    assert float((feats - expected).abs().max()) <= 1e-5


# ------------------------------------------------------------------------------------ retrieval
@pytest.fixture
def ref_features(tiny):
    return torch.randn(3, tiny.embed_dim, generator=torch.Generator().manual_seed(0))


@pytest.fixture
def phi(tiny):
    torch.manual_seed(0)
    return Phi.for_backbone(tiny.embed_dim, tiny.token_width).eval()


CAPTIONS = ["is red", "has two dogs instead of one", "is smaller"]


@pytest.mark.parametrize("method", METHODS)
def test_compose_queries_unit_norm(tiny, ref_features, phi, method):
    tokens = torch.randn(3, tiny.token_width, generator=torch.Generator().manual_seed(1)) * 0.05
    q = compose_queries(tiny, method, ref_features, CAPTIONS, phi=phi, pseudo_tokens=tokens)
    assert q.shape == (3, tiny.embed_dim)
    assert torch.allclose(q.norm(dim=-1), torch.ones(3), atol=1e-5)


def test_compose_queries_values(tiny, ref_features, phi):
    tokens = torch.randn(3, tiny.token_width, generator=torch.Generator().manual_seed(1)) * 0.05
    image = F.normalize(ref_features, dim=-1)
    text = F.normalize(tiny.encode_texts(CAPTIONS), dim=-1)
    assert torch.allclose(compose_queries(tiny, "image", ref_features, CAPTIONS), image, atol=1e-6)
    assert torch.allclose(compose_queries(tiny, "text", ref_features, CAPTIONS), text, atol=1e-6)
    both = compose_queries(tiny, "image+text", ref_features, CAPTIONS)
    assert torch.allclose(both, F.normalize(image + text, dim=-1), atol=1e-6)
    prompts = [f"a photo of $ that {c}" for c in CAPTIONS]
    oti = compose_queries(tiny, "oti", ref_features, CAPTIONS, pseudo_tokens=tokens)
    assert torch.allclose(oti, F.normalize(encode_with_pseudo_tokens(tiny, prompts, tokens), dim=-1), atol=1e-6)
    with torch.no_grad():
        predicted = phi(ref_features)
    by_phi = compose_queries(tiny, "phi", ref_features, CAPTIONS, phi=phi)
    assert torch.allclose(by_phi, F.normalize(encode_with_pseudo_tokens(tiny, prompts, predicted), dim=-1), atol=1e-6)


def test_compose_queries_errors(tiny, ref_features):
    with pytest.raises(ValueError, match="unknown method"):
        compose_queries(tiny, "sketch", ref_features, CAPTIONS)
    with pytest.raises(ValueError, match="phi"):
        compose_queries(tiny, "phi", ref_features, CAPTIONS)
    with pytest.raises(ValueError, match="pseudo-tokens"):
        compose_queries(tiny, "oti", ref_features, CAPTIONS)
    with pytest.raises(ValueError, match="placeholder"):
        compose_queries(tiny, "oti", ref_features, ["costs 5$", "a", "b"], pseudo_tokens=torch.zeros(3, 48))


class FakeIndex:
    """The gallery-index interface the Retriever uses: search(q [Q, D], k, exclude_ids) and metadata."""

    def __init__(self, ids, features):
        self.ids, self.features = list(ids), F.normalize(features, dim=-1)
        self.metadata = {i: {"path": f"/gallery/{i}.png"} for i in self.ids}
        self.calls = []

    def search(self, query, k, exclude_ids=None):
        self.calls.append((k, exclude_ids))
        scores = torch.as_tensor(query) @ self.features.T
        out = []
        for row in scores:
            order = [j for j in row.argsort(descending=True).tolist() if self.ids[j] not in (exclude_ids or ())]
            out.append([(self.ids[j], float(row[j])) for j in order[:k]])
        return out


@pytest.fixture
def retriever(tiny, phi, monkeypatch):
    images = [Image.new("RGB", (40, 40), c) for c in ("red", "green", "blue", "yellow")]
    index = FakeIndex(["r", "g", "b", "y"], tiny.encode_pil(images))
    calls = {"images": 0, "texts": 0, "invert": 0}
    encode_pil, encode_texts, invert = tiny.encode_pil, tiny.encode_texts, isearle.retrieval.invert_steps

    def count(key, fn):
        def wrapper(*args, **kwargs):
            calls[key] += 1
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(tiny, "encode_pil", count("images", encode_pil))
    monkeypatch.setattr(tiny, "encode_texts", count("texts", encode_texts))
    monkeypatch.setattr(isearle.retrieval, "invert_steps", count("invert", invert))
    r = Retriever(tiny, index, phi=phi, cache_size=8)
    r.calls = calls
    return r


def test_retriever_caches_image_features_and_tokens(retriever):
    image = Image.new("RGB", (40, 40), "red")
    hits = retriever.query(image, "is blue", k=3, method="phi")
    assert [h.rank for h in hits] == [1, 2, 3]
    assert all(h.metadata["path"].startswith("/gallery/") for h in hits)
    assert retriever.calls["images"] == 1
    retriever.query(image, "is green", k=3, method="phi")
    retriever.query(Image.new("RGB", (40, 40), "red"), "is yellow", k=3, method="image+text")  # same pixels
    retriever.query(image, "is yellow", k=3, method="image")
    assert retriever.calls["images"] == 1  # the image encoder ran once for all four queries
    retriever.query(image, "is yellow", k=3, method="image+text")
    assert retriever.calls["texts"] == 1  # caption features are cached too
    retriever.query(Image.new("RGB", (40, 40), "blue"), "is red", k=3, method="phi")
    assert retriever.calls["images"] == 2


def test_retriever_oti_is_cached_and_warm_started(retriever):
    image = Image.new("RGB", (40, 40), "green")
    oti = OTIConfig(steps=3, batch_size=1)
    first = retriever.query_feature(image, "is red", method="oti", oti=oti)
    second = retriever.query_feature(image, "is red", method="oti", oti=oti)
    assert retriever.calls["invert"] == 1
    assert torch.equal(first, second)
    assert torch.allclose(first.norm(), torch.tensor(1.0), atol=1e-5)
    retriever.query_feature(image, "is red", method="oti", oti=OTIConfig(steps=4, batch_size=1))
    assert retriever.calls["invert"] == 2  # another step count is another pseudo-word


def test_retriever_search_excludes_and_ranks(retriever, tiny):
    image = Image.new("RGB", (40, 40), "red")
    hits = retriever.query(image, "anything", k=4, method="image")
    assert hits[0].id == "r" and hits[0].score == pytest.approx(1.0, abs=1e-5)
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    hits = retriever.query(image, "anything", k=2, method="image", exclude=["r"])
    assert "r" not in [h.id for h in hits] and len(hits) == 2
    assert retriever.index.calls[-1] == (2, ["r"])


def test_retriever_needs_image_and_phi(tiny):
    r = Retriever(tiny, FakeIndex(["a"], torch.randn(1, tiny.embed_dim)))
    with pytest.raises(ValueError, match="reference image"):
        r.query_feature(None, "is red", method="phi")
    with pytest.raises(ValueError, match="phi"):
        r.query_feature(Image.new("RGB", (8, 8)), "is red", method="phi")
    assert r.query_feature(None, "is red", method="text").shape == (tiny.embed_dim,)


def test_lru_cache_evicts_the_least_recently_used():
    cache = LRUCache(2)
    cache.put("a", 1)
    cache.put("b", 2)
    cache.put("c", 3)
    assert cache.get("a") is None and cache.get("b") == 2 and cache.get("c") == 3 and len(cache) == 2
    cache.get("b")  # b is now more recent than c
    cache.put("d", 4)
    assert cache.get("c") is None and cache.get("b") == 2 and cache.get("d") == 4
    cache.put("b", 20)
    assert cache.get("b") == 20 and len(cache) == 2


def test_image_key_is_a_content_hash():
    a = Image.new("RGB", (8, 8), "red")
    assert image_key(a) == image_key(Image.new("RGB", (8, 8), "red"))
    assert image_key(a) != image_key(Image.new("RGB", (8, 8), "blue"))
    assert image_key(a) != image_key(Image.new("RGB", (4, 16), "red"))
    assert image_key(a) != image_key(a.convert("RGBA"))



def test_jpeg_draft_decodes_at_the_reduced_size_the_model_needs(tmp_path):
    """draft=224 decodes a 640x480 JPEG at 1/2 scale (320x240: both sides >= 224, 1/4 would not be);
    other formats and draft=None decode at full size; the picture stays the same picture."""

    from isearle.images import open_image

    yy, xx = np.mgrid[0:480, 0:640]
    pixels = np.stack([xx % 256, yy % 256, (xx + yy) % 256], -1).astype(np.uint8)
    Image.fromarray(pixels).save(tmp_path / "a.jpg", quality=95)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    full, small = open_image(tmp_path / "a.jpg"), open_image(tmp_path / "a.jpg", draft=224)
    assert full.size == (640, 480) and small.size == (320, 240) and small.mode == "RGB"
    assert open_image(tmp_path / "a.png", draft=224).size == (640, 480)
    ref = np.asarray(full.resize((320, 240), Image.BILINEAR), dtype=np.float32)
    assert np.abs(np.asarray(small, dtype=np.float32) - ref).mean() < 12  # same content, downscaled


# ------------------------------------------------------------------------------------- decodings
def test_demo_uploads_keep_the_robust_decoding():
    """open_image's default is "robust" (what the demo's uploads get); "searle" keeps the file's mode."""
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    assert open_image(rgba).mode == "RGB" and open_image(rgba).getpixel((0, 0)) == (255, 255, 255)
    assert open_image(rgba, decode="searle").mode == "RGBA"
    with pytest.raises(ValueError, match="unknown decoding"):
        open_image(rgba, decode="other")


def test_gallery_index_records_its_precision_and_decoding(tiny, tmp_path):
    """`isearle index` records how a gallery was embedded; appending with another decoding is refused."""
    from isearle.errors import IsearleError
    from isearle.indexing import build_gallery_index

    items = [(f"i{k}", Image.new("RGB", (16, 12), (40 * k, 0, 0)), {}) for k in range(3)]
    index = build_gallery_index(tiny, items[:2], progress=False, decode="searle")
    assert index.info["decode"] == "searle" and index.info["precision"] == "fp32"
    with pytest.raises(IsearleError, match="--decode searle"):
        build_gallery_index(tiny, items[2:], progress=False, index=index, decode="robust")
    assert len(build_gallery_index(tiny, items[2:], progress=False, index=index, decode="searle")) == 3
    bf16 = build_gallery_index(tiny.with_precision("bf16"), items[:1], progress=False)
    assert bf16.info["precision"] == "bf16" and bf16.info["decode"] == "robust"
