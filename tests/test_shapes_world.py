"""The shapes world and the ShapesCIR benchmark: determinism, rendering, captions, edits, JSON shape."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from isearle.shapes import benchmark as bm
from isearle.shapes.captions import caption, edit_scene, phrases_for, relative_caption, vocabulary
from isearle.shapes.world import (
    BACKGROUNDS,
    COLOURS,
    EDIT_TYPES,
    PATTERNS,
    POSITIONS,
    SHAPES,
    SIZES,
    ObjectSpec,
    SceneSpec,
    jitter,
    random_scene,
    render,
    scene_source,
)


def test_vocab_sizes() -> None:
    assert len(SHAPES) >= 6 and len(COLOURS) >= 8 and len(SIZES) >= 2 and len(POSITIONS) >= 5
    assert len(BACKGROUNDS) >= 2 and "striped" in PATTERNS


def test_random_scene_is_deterministic_and_valid() -> None:
    a = [random_scene(random.Random(7)).to_dict() for _ in range(2)]
    assert a[0] == a[1]
    rng = random.Random(0)
    counts = set()
    for _ in range(300):
        s = random_scene(rng)
        counts.add(len(s.objects))
        assert 1 <= len(s.objects) <= 3
        assert len({o.position for o in s.objects}) == len(s.objects)
        assert len({o.key for o in s.objects}) == len(s.objects)
        assert SceneSpec.from_dict(json.loads(json.dumps(s.to_dict()))) == s
    assert counts == {1, 2, 3}


def test_render_is_deterministic_and_shows_every_attribute() -> None:
    spec = random_scene(random.Random(3))
    assert np.array_equal(np.asarray(render(spec)), np.asarray(render(spec)))
    assert render(spec, 48).size == (48, 48)
    base = ObjectSpec("circle", "red", "large", "center")
    ref = np.asarray(render(SceneSpec("white", [base])), dtype=np.int16)
    for attr, values in (("shape", SHAPES), ("colour", COLOURS), ("size", SIZES), ("position", POSITIONS),
                         ("pattern", PATTERNS)):
        for v in values:
            o = ObjectSpec(**{**base.__dict__, attr: v})
            im = np.asarray(render(SceneSpec("white", [o])), dtype=np.int16)
            assert (im != 245).any(axis=-1).sum() > 40, (attr, v)  # something was drawn
            if v != getattr(base, attr):
                assert np.abs(im - ref).sum() > 1000, (attr, v)  # and it looks different
    for bg in BACKGROUNDS:
        im = np.asarray(render(SceneSpec(bg, [base])))
        assert tuple(im[0, 0]) == BACKGROUNDS[bg]
    # anti-aliased: edge pixels take intermediate values
    im = np.asarray(render(SceneSpec("white", [base])))[..., 1]
    assert ((im > 60) & (im < 230)).sum() > 10


def test_captions_mention_attributes() -> None:
    rng = random.Random(1)
    spec = SceneSpec("gray", [ObjectSpec("star", "blue", "large", "left")])
    texts = [caption(spec, rng) for _ in range(200)]
    full = [t for t in texts if "star" in t and "blue" in t]
    assert len(full) > 50
    assert any(" that " in t for t in texts) and any("instead" in t or "now" in t for t in texts)
    for t in texts:
        assert not any(c in t for c in COLOURS if c != "blue") or " that " in t  # only edit forms name others
    words = " ".join(texts)
    assert all(w in words for w in ("star", "blue", "gray", "left"))


def test_jitter_keeps_attributes() -> None:
    rng = random.Random(2)
    for _ in range(50):
        s = random_scene(rng, jittered=False)
        j = jitter(s, rng)
        assert j.signature() == s.signature() and j != s


def test_edits_change_what_they_say() -> None:
    rng = random.Random(4)
    for etype in EDIT_TYPES:
        for _ in range(20):
            ref = bm._reference(rng, etype)
            target, changes = edit_scene(ref, etype, rng)
            assert target.signature() != ref.signature()
            assert len({o.position for o in target.objects}) == len(target.objects)
            text = relative_caption(ref, changes, rng)
            assert text and "  " not in text
            if etype == "colour":
                assert changes[0]["new"] in text
            if etype == "two":
                assert len(changes) == 2 and " and " in text


def test_vocabulary_and_phrases() -> None:
    vocab = vocabulary()
    assert "red circle" in vocab and "circle" in vocab and len(vocab) == len(set(vocab))
    phrases = phrases_for("red circle", random.Random(0), 16)
    assert len(phrases) == 16
    assert all(p.startswith("a photo of red circle that ") for p in phrases)


def test_scene_source_is_picklable() -> None:
    import pickle

    ids, items = scene_source(3, seed=5, size=32)
    assert len(ids) == 3 and items[0]().size == (32, 32)
    assert np.array_equal(np.asarray(pickle.loads(pickle.dumps(items[1]))()), np.asarray(items[1]()))


@pytest.fixture(scope="module")
def small_benchmark(tmp_path_factory):
    out = tmp_path_factory.mktemp("scir")
    stats = bm.build_benchmark(out, seed=3, n_val=16, n_test=24, n_gallery=2000)
    return out, stats


def test_benchmark_json_shape(small_benchmark) -> None:
    out, stats = small_benchmark
    assert stats["test"]["queries"] == 24 and set(stats["test"]["per_edit_type"]) == set(EDIT_TYPES)
    queries, gallery = bm.load_benchmark(out, "test")
    assert len(gallery) >= 2000 + 24
    keys = {"id", "reference_img_id", "target_img_id", "relative_caption", "gt_img_ids", "edit_type", "shared_concept"}
    for q in queries:
        assert keys <= set(q)
        assert q["target_img_id"] == q["gt_img_ids"][0] and len(q["gt_img_ids"]) >= 3
        assert q["reference_img_id"] in gallery and q["reference_img_id"] not in q["gt_img_ids"]
        sig = gallery[q["target_img_id"]].signature()
        for g in q["gt_img_ids"]:
            assert g in gallery and gallery[g].signature() == sig
        assert gallery[q["reference_img_id"]].signature() != sig
    # deterministic under the seed
    again = bm.build_benchmark(out / "again", seed=3, n_val=16, n_test=24, n_gallery=2000)
    assert again == stats
    assert (out / "again" / "gallery.json").read_text() == (out / "gallery.json").read_text()


def test_bundled_benchmark_if_present() -> None:
    if not (bm.BENCHMARK_DIR / "gallery.json").is_file():
        pytest.skip("assets/shapescir not generated")
    queries, gallery = bm.load_benchmark(bm.BENCHMARK_DIR, "test")
    assert len(gallery) >= 2000 and len(queries) >= 8 * 50
    assert all(set(q["gt_img_ids"]) <= gallery.keys() for q in queries)
