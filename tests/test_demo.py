"""The demo's library side (isearle.demo): inputs, the pseudo-word panel, the engine, settings."""

import argparse
import io
import json
import struct
import zlib

import pytest
import torch
from PIL import Image

from isearle import demo as D
from isearle.images import BadImage
from isearle.testing import latency_stats, split_app_args
from isearle.weights import file_digest, weights_file, weights_fingerprint


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A random-init stand-in of the offline world: tiny CLIP checkpoint, 300-scene gallery, phi."""
    return D.build_test_world(tmp_path_factory.mktemp("world"))


@pytest.fixture(scope="module")
def engine(world, tmp_path_factory):
    entry = D.GalleryEntry(world["gallery"], phi=str(world["phi"]))
    return D.DemoEngine([entry], "cpu", cache_size=16, thumbs_dir=tmp_path_factory.mktemp("thumbs"),
                        examples=D.load_examples())


def _png(image: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=kw.pop("format", "PNG"), **kw)
    return buf.getvalue()


def _bomb_png(side: int = 100_000) -> bytes:
    """A valid PNG header announcing side x side pixels (decoding it would need ~30 GB)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


# ------------------------------------------------------------------------------- references
@pytest.mark.parametrize("make, note", [
    (lambda: _png(Image.new("RGBA", (20, 10), (255, 0, 0, 90))), "transparency"),
    (lambda: _png(Image.new("P", (20, 10))), "palette"),
    (lambda: _png(Image.new("RGB", (20, 10)).convert("CMYK"), format="JPEG"), "CMYK"),
    (lambda: _png(Image.new("I;16", (20, 10), 40000)), "16-bit"),
    (lambda: _png(Image.new("1", (20, 10), 1)), "1-bit"),
])
def test_load_reference_converts_modes_with_a_note(make, note):
    image, notes = D.load_reference(make())
    assert image.mode == "RGB" and image.size == (20, 10)
    assert any(note in n for n in notes), notes


def test_load_reference_applies_exif_orientation():
    exif = Image.Exif()
    exif[274] = 6  # rotate 90° clockwise on display
    data = _png(Image.new("RGB", (40, 20), "red"), format="JPEG", exif=exif.tobytes())
    image, notes = D.load_reference(data)
    assert image.size == (20, 40)
    assert any("EXIF orientation" in n for n in notes)


def test_load_reference_plain_rgb_and_grayscale_have_no_notes():
    image, notes = D.load_reference(_png(Image.new("RGB", (64, 64), "blue")))
    assert image.mode == "RGB" and notes == []
    image, notes = D.load_reference(_png(Image.new("L", (64, 64), 9)))
    assert image.mode == "RGB" and notes == []


@pytest.mark.parametrize("data, message", [
    (b"this is not an image", "not a readable image"),
    (_png(Image.effect_noise((64, 64), 50).convert("RGB"), format="JPEG")[:300], "not a readable image"),
    (b"\x89PNG\r\n\x1a\n" + b"\x00" * 50, "not a readable image"),
    (_bomb_png(), "too large"),
])
def test_load_reference_refuses_bad_files(data, message):
    with pytest.raises(BadImage, match=message):
        D.load_reference(data)


def test_load_reference_files(tmp_path):
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(BadImage, match="empty"):
        D.load_reference(empty)
    with pytest.raises(BadImage, match="gone"):
        D.load_reference(tmp_path / "missing.png")
    big = tmp_path / "big.png"
    big.write_bytes(b"\0" * 2048)
    with pytest.raises(BadImage, match="too large"):
        D.load_reference(big, max_bytes=1024)


# --------------------------------------------------------------------------------- captions
def test_clean_caption_normalises_like_the_tokenizer():
    assert D.clean_caption("  is\tblue\x00 instead\u200b ") == "is blue instead\u200b"
    assert D.clean_caption("costs ＄5") == "costs $5"
    assert D.clean_caption("&#36;") == "$"
    assert D.clean_caption("bad \ud800 surrogate") == "bad surrogate"
    assert D.clean_caption(None) == ""


@pytest.mark.parametrize("caption, message", [
    ("", "empty"), ("   \n\t", "empty"), (None, "empty"),
    ("costs $5", "placeholder"), ("costs ＄5", "placeholder"), ("&#36; sign", "placeholder"),
])
def test_prepare_caption_refuses(tiny, caption, message):
    with pytest.raises(D.CaptionError, match=message):
        D.prepare_caption(tiny, caption)


def test_prepare_caption_says_when_cut(tiny):
    long = " ".join(["is blue"] * 60)
    cap = D.prepare_caption(tiny, long)
    assert cap.cut and "context length" in cap.notes[0]
    assert len(tiny.tokenizer.encode(cap.used)) <= tiny.context_length - 2
    assert cap.used.startswith("a photo of $ that is blue")
    short = D.prepare_caption(tiny, "is blue")
    assert not short.cut and short.notes == [] and short.prompt == "a photo of $ that is blue"


def test_prepare_caption_any_unicode_and_unknown_words(tiny):
    known = D.world_token_ids(tiny.tokenizer)
    for text in ("est bleu 😀", "青くする", "اجعلها زرقاء", "e\u0301 ü ß ﬁ", "\u202eright-to-left"):
        cap = D.prepare_caption(tiny, text, known_ids=known)
        assert cap.prompt.startswith("a photo of $ that")
    cap = D.prepare_caption(tiny, "is blue chien 😀", known_ids=known)
    assert "“chien”" in cap.notes[-1] and "“😀”" in cap.notes[-1] and "“blue”" not in cap.notes[-1]
    too_long = D.prepare_caption(tiny, "x " * 800)
    assert any("characters" in n for n in too_long.notes)


# ------------------------------------------------------------------------------ vocabulary
def test_readable_token(tiny):
    tok = tiny.tokenizer
    blue = tok.encode("blue")[0]
    assert D.readable_token(tok, blue) == "blue"
    pieces = tok.encode("bluish")
    assert D.readable_token(tok, pieces[0]).endswith("-")  # a word start, not a whole word
    emoji = tok.encode("日")[0]  # a byte piece of a multi-byte character
    assert D.readable_token(tok, emoji).startswith(("⟨", "日"))


def test_world_token_ids_cover_the_grammar(tiny):
    import random

    from isearle.shapes.captions import edit_scene, relative_caption
    from isearle.shapes.world import EDIT_TYPES, random_scene

    ids = D.world_token_ids(tiny.tokenizer)
    tok = tiny.tokenizer
    for word in ("blue", "circle", "instead", "background", "left"):
        assert set(tok.encode(word)) <= ids
    assert not set(tok.encode("dog")) <= ids
    rng = random.Random(12345)  # another seed than the sample's: relative captions of every edit
    for i in range(400):
        ref = random_scene(rng, n_objects=2)
        _, changes = edit_scene(ref, EDIT_TYPES[i % len(EDIT_TYPES)], rng)
        assert set(tok.encode(relative_caption(ref, changes, rng))) <= ids


def test_token_table_nearest(tiny):
    table = D.TokenTable(tiny)
    blue = tiny.tokenizer.encode("blue")[0]
    row = tiny.token_embedding.weight[blue].detach()
    top = table.nearest(row, 5)
    assert top[0] == ("blue", pytest.approx(1.0, abs=1e-5))
    assert [s for _, s in top] == sorted((s for _, s in top), reverse=True)
    red = tiny.tokenizer.encode("red")[0]
    only = table.nearest(row, 5, allowed={red})
    assert [w for w, _ in only] == ["red"]
    placeholder = tiny.token_embedding.weight[tiny.placeholder_id].detach()
    assert "$" not in [w for w, _ in table.nearest(placeholder, 5)]


def test_bar_chart_is_an_image():
    img = D.bar_chart(["blue", "😀", "日本", "x" * 60], [0.9, -0.2, 0.1, 0.0], "title")
    assert img.mode == "RGB" and img.width > 200 and img.height > 100
    assert D.bar_chart([], [], "empty").mode == "RGB"


# ---------------------------------------------------------------------------------- engine
def test_search_returns_k_ranked_hits(engine, tmp_path):
    ref = tmp_path / "ref.png"
    Image.new("RGB", (50, 50), (40, 80, 225)).save(ref)
    result = engine.search(None, ref, "is red instead", k=7, method="phi")
    assert [it.rank for it in result.items] == list(range(1, 8))
    scores = [it.score for it in result.items]
    assert scores == sorted(scores, reverse=True)
    assert all(it.caption.startswith(f"#{it.rank} · ") for it in result.items)
    assert all(Image.open(it.image).size == (D.THUMB_SIZE, D.THUMB_SIZE) for it in result.items)
    assert result.reference_id is None and "7 results" in result.summary()
    assert result.cached == ""
    again = engine.search(None, ref, "is red instead", k=7, method="phi")
    assert again.cached == "query" and [it.id for it in again.items] == [it.id for it in result.items]
    assert "(query cached)" in again.summary()
    other = engine.search(None, ref, "is a star", k=3, method="phi")
    assert other.cached == "reference" and len(other.items) == 3


def test_oti_and_missing_phi(engine, tmp_path, world):
    ref = tmp_path / "ref.png"
    Image.new("RGB", (50, 50), "orange").save(ref)
    result = engine.search(None, ref, "is a star", k=3, method="oti", steps=10)
    assert len(result.items) == 3 and result.method == "oti"
    no_phi = D.DemoEngine([D.GalleryEntry(world["gallery"])], "cpu", thumbs_dir=tmp_path / "t")
    assert no_phi.load().phi is None
    with pytest.raises(ValueError, match="choose OTI"):
        no_phi.search(None, ref, "is a star", method="phi")
    with pytest.raises(BadImage, match="no reference"):
        engine.search(None, None, "is a star")


def test_gallery_item_as_reference_is_left_out_and_ground_truth_marked(engine):
    loaded = engine.load()
    ref_id, gt = loaded.index.ids[5], loaded.index.ids[:4]
    path, image = engine.reference_image(engine.default_key, ref_id)
    assert image.size == (D.REFERENCE_SIZE, D.REFERENCE_SIZE)
    engine.truth.table[(ref_id, D.caption_key("is a star instead"))] = gt
    result = engine.search(None, path, "  Is a STAR instead ", k=len(loaded.index) - 1, method="phi")
    ids = [it.id for it in result.items]
    assert ref_id not in ids and len(ids) == len(loaded.index) - 1
    assert result.reference_id == ref_id and result.gt_ids == gt and result.gt_found == 4
    assert all(it.ground_truth == (it.id in gt) for it in result.items)
    assert next(it.caption for it in result.items if it.ground_truth).endswith(" ✓")
    # the canonical image (what the gallery was embedded from) is queried: image-only finds its twin
    _, feats = loaded.retriever.image_features(engine.reference(engine.default_key, image))
    vec = torch.nn.functional.normalize(feats, dim=-1).numpy()
    assert loaded.index.search(vec[None], 1)[0][0][0] == ref_id


def test_examples_are_registered(engine):
    paths = engine.example_paths()
    assert len(paths) == len(engine.examples.references) == 12
    assert paths[0][1] == engine.examples.references[0].caption and paths[0][2] == "colour"
    engine.load()
    image = Image.open(paths[0][0]).convert("RGB")
    ref_id = engine.reference(engine.default_key, image).item_id
    assert ref_id == engine.examples.references[0].reference_id


def test_explain_panel(engine, tmp_path):
    ref = tmp_path / "ref.png"
    Image.new("RGB", (50, 50), (220, 40, 40)).save(ref)
    ex = engine.explain(None, ref, "is blue instead", "phi", k=4, trained_only=True)
    assert ex.tokens_chart.mode == "RGB" and ex.concepts_chart is not None
    trained = engine.load().trained
    assert len(ex.tokens) == 10 and trained is not None
    ids = {engine.load().backbone.tokenizer.encode(w.rstrip("-"))[0] for w, _ in ex.tokens if not w.endswith("-")}
    assert ids <= trained | {0}
    assert len(ex.concepts) == 10 and len(ex.image_only) == 4 and len(ex.text_only) == 4
    assert "S* reads as" in ex.summary
    wide = engine.explain(None, ref, "is blue instead", "phi", k=4, trained_only=False)
    assert wide.tokens[0][1] >= ex.tokens[0][1]


def test_weights_fingerprint_follows_the_file(tiny, world, tmp_path):
    import dataclasses
    import os

    assert weights_fingerprint(tiny.pretrained) is None  # random init: never cached
    ck = tmp_path / "w.pt"
    ck.write_bytes(world["checkpoint"].read_bytes())
    b = dataclasses.replace(tiny, pretrained=str(ck))
    first = weights_fingerprint(b.pretrained)
    assert first == weights_fingerprint(b.pretrained)
    os.utime(ck, ns=(1, 1))  # a checkout: same content, same id
    assert weights_fingerprint(b.pretrained) == first
    ck.write_bytes(ck.read_bytes()[:-1] + b"x")  # a retrained model
    assert weights_fingerprint(b.pretrained) != first
    assert weights_fingerprint("openai") == "openai"


def test_offline_gallery_staleness(tmp_path):
    bundled = weights_file("isearle-shapes")
    if bundled is None:
        pytest.skip("no bundled shapes weights in this checkout")

    def gallery(**info):
        (tmp_path / "index.json").write_text(json.dumps({"info": info}))
        return tmp_path

    current = file_digest(bundled)
    assert not D.offline_gallery_stale(gallery(pretrained="isearle-shapes", weights=current))
    assert D.offline_gallery_stale(gallery(pretrained="isearle-shapes", weights="0" * 12))
    assert not D.offline_gallery_stale(gallery(pretrained="isearle-shapes"))  # unknown: left alone
    assert not D.offline_gallery_stale(gallery(pretrained="/some/other.pt", weights="0" * 12))
    assert not D.offline_gallery_stale(tmp_path / "missing")


def test_engine_label_and_paths(engine, world):
    assert "isearle-tiny-test" in engine.label(engine.default_key)
    assert "offline shapes world (300 images)" in engine.label(engine.default_key)
    assert str(engine.thumbs.root) in engine.served_paths()
    with pytest.raises(ValueError, match="unknown backbone"):
        engine.load("nope")


# -------------------------------------------------------------------------------- settings
def test_settings_from_environment_and_flags():
    p = argparse.ArgumentParser()
    D.add_arguments(p, {"ISEARLE_PORT": "9999", "ISEARLE_GALLERY": "a,b", "ISEARLE_NO_WARMUP": "1"})
    args = p.parse_args([])
    assert args.port == 9999 and args.gallery == "a,b" and args.no_warmup is True
    assert p.parse_args(["--port", "1234"]).port == 1234
    entries = D.entries_from_args(args)
    assert [e.directory.name for e in entries] == ["a", "b"]
    args = p.parse_args(["--hf-dataset", "user/photos", "--hf-limit", "500", "--phi", "searle"])
    entries = D.entries_from_args(args)
    assert entries[0].hf_dataset == "user/photos" and entries[0].directory.name.startswith("hub-vit-b-32-openai-photos")
    assert entries[0].phi == "searle" and entries[1].phi is None
    table = D.settings_table()
    assert all(s.env in table and s.flag in table for s in D.SETTINGS)


def test_start_falls_back_to_what_can_be_loaded(world, tmp_path):
    p = argparse.ArgumentParser()
    D.add_arguments(p, {})
    args = p.parse_args(["--gallery", f"{tmp_path / 'missing'},{world['gallery']}", "--examples", str(tmp_path / "x.json"),
                         "--no-warmup"])
    engine = D.DemoEngine.start(args, warm=False)
    assert list(engine.entries) == [D.public_name(world["gallery"])]  # no server path on the page
    args = p.parse_args(["--gallery", str(tmp_path / "missing")])
    with pytest.raises(FileNotFoundError, match="nothing to serve"):
        D.DemoEngine.start(args, warm=False)


def test_gallery_built_from_an_image_folder_once(world, tmp_path):
    """--images: the gallery is embedded at start-up, cached under --hub-cache, and reused."""
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    for i, colour in enumerate(["red", "green", "blue", "white", "black"]):
        Image.new("RGB", (40 + i, 30), colour).save(folder / ("sub" if i % 2 else "") / f"{colour}.jpg")
    (folder / "broken.png").write_text("not an image")
    p = argparse.ArgumentParser()
    D.add_arguments(p, {})
    args = p.parse_args(["--images", str(folder), "--model", "isearle-tiny-test", "--pretrained", str(world["checkpoint"]),
                         "--hub-cache", str(tmp_path / "cache"), "--gallery", str(world["gallery"]),
                         "--examples", str(tmp_path / "none.json")])
    engine = D.DemoEngine.start(args, warm=True)
    key = engine.default_key
    assert key.startswith("cache/hub-isearle-tiny-test-")  # named without the server path
    loaded = engine.load()
    assert len(loaded.index) == 5 and not loaded.benchmark and loaded.phi is None
    result = engine.search(None, folder / "red.jpg", "is blue", k=3, method="oti", steps=5)
    assert len(result.items) == 3 and Image.open(result.items[0].image).size[0] <= D.THUMB_SIZE
    assert str(folder) not in engine.served_paths() and str(folder) in engine.private_paths()  # never served
    assert [e[2] for e in engine.example_paths()][:2] == loaded.index.ids[:2]  # gallery items as examples
    assert engine.info()["methods"] == ["oti"] and len(engine.info()["backbones"]) == 2
    again = D.DemoEngine.start(args, warm=False)  # cached: nothing is embedded twice
    assert (engine.entries[key].directory / "index.json").stat().st_mtime == (
        again.entries[again.default_key].directory / "index.json").stat().st_mtime


def test_unavailable_hub_backbone_falls_back_to_the_offline_world(world, tmp_path, caplog):
    p = argparse.ArgumentParser()
    D.add_arguments(p, {})
    args = p.parse_args(["--images", str(tmp_path), "--model", "ViT-B-32", "--pretrained", str(tmp_path / "no.pt"),
                         "--hub-cache", str(tmp_path / "cache"), "--gallery", str(world["gallery"])])
    engine = D.DemoEngine.start(args, warm=False)
    assert list(engine.entries) == [D.public_name(world["gallery"])]
    assert "skipping" in caplog.text


# -------------------------------------------------------------------------- benchmark files
def test_make_examples_and_ground_truth(tmp_path):
    from isearle.shapes.benchmark import build_benchmark

    build_benchmark(tmp_path / "bench", seed=3, n_val=16, n_test=8, n_gallery=2000)
    out = D.make_examples(tmp_path / "bench", tmp_path / "examples.json", n=10)
    data = json.loads(out.read_text())
    refs = data["references"]
    assert len(refs) == 10 and len({r["edit_type"] for r in refs}) == 8
    assert all(r["reference_spec"]["objects"] for r in refs)
    examples = D.load_examples(out)
    truth = D.GroundTruth.load(tmp_path / "bench", examples)
    first = refs[0]
    assert truth.get(first["reference_img_id"], first["relative_caption"].upper() + " ") == first["gt_img_ids"]
    assert truth.get(first["reference_img_id"], "something else") is None
    assert len(truth.table) == 24


def test_latency_stats():
    s = latency_stats([10, 20, 30, 40, 100])
    assert s["n"] == 5 and s["p50"] == 30 and 40 < s["p95"] <= 100 and s["max"] == 100
    assert latency_stats([])["n"] == 0
    assert split_app_args(["--n", "5", "--", "--gallery", "g"]) == (["--n", "5"], ["--gallery", "g"])
    assert split_app_args(["--n", "5"]) == (["--n", "5"], [])


# ------------------------------------------------------------------ one Reference per request
def _counting(monkeypatch, module, name, calls):
    real = getattr(module, name)

    def counted(*args, **kwargs):
        calls[name] = calls.get(name, 0) + 1
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)


def test_search_then_explain_decode_and_hash_the_upload_once(engine, tmp_path, monkeypatch):
    """The explanation panel (a second request with the same upload) reuses the search's Reference
    and its S*, image feature and query: no decode, no hash, no image encoder, no phi pass again."""
    import isearle.reference as R
    from isearle.phi import Phi

    session = engine.load()
    path = tmp_path / "upload.jpg"
    Image.new("RGB", (640, 480), (200, 40, 90)).save(path, quality=90)
    calls: dict[str, int] = {}
    _counting(monkeypatch, R, "open_image", calls)
    _counting(monkeypatch, R, "image_key", calls)
    _counting(monkeypatch, type(session.backbone), "encode_pil", calls)
    _counting(monkeypatch, Phi, "forward", calls)
    engine.search(None, str(path), "is a star instead", k=5, method="phi")
    assert calls == {"open_image": 1, "image_key": 1, "encode_pil": 1, "forward": 1}
    calls.clear()
    import isearle.explain as X

    _counting(monkeypatch, X, "encode_tokens", calls)
    _counting(monkeypatch, type(session.backbone), "encode_texts", calls)
    ex = engine.explain(None, str(path), "is a star instead", "phi", k=4)
    # one text pass for "a photo of S*" and the caption alone (the text-only ranking) together
    assert calls == {"encode_tokens": 1} and len(ex.image_only) == len(ex.text_only) == 4
    with torch.inference_mode():
        alone = torch.nn.functional.normalize(session.backbone.encode_texts(["is a star instead"]), dim=-1)[0]
    assert float((session.retriever.texts.get("is a star instead") - alone).abs().max()) <= 1e-5
    calls.clear()
    engine.search(None, str(path), "is blue instead", k=5, method="phi")  # a new caption: text pass only
    assert calls == {}


def test_a_large_jpeg_is_decoded_at_the_models_scale(engine, tmp_path):
    """A 4000x3000 phone photo (EXIF-rotated) is decoded at 1/8 scale by the JPEG decoder itself,
    turned upright, and encodes to nearly the feature of the full decode."""
    from isearle.reference import DECODE_SCALE, MIN_DECODE, load_reference

    session = engine.load()
    big = Image.radial_gradient("L").resize((4000, 3000)).convert("RGB")
    exif = Image.Exif()
    exif[274] = 6  # rotate 90 degrees clockwise on display
    path = tmp_path / "phone.jpg"
    big.save(path, quality=85, exif=exif)
    ref = session.reference(str(path))
    w, h = ref.image.size
    target = max(int(DECODE_SCALE * session.backbone.image_size), MIN_DECODE)
    assert h > w and target <= w < 2 * target  # upright, and only as large as the model needs
    assert any("EXIF orientation" in n for n in ref.notes)
    full, _ = load_reference(str(path))  # no size: the full 3000x4000 decode
    assert full.size == (3000, 4000)
    with torch.inference_mode():
        a, b = session.backbone.encode_pil([ref.image])[0], session.backbone.encode_pil([full])[0]
    assert float(torch.nn.functional.cosine_similarity(a, b, dim=0)) > 0.99
