"""The demo end to end: `python app.py` on a localhost port, driven through gradio_client.

The app serves the offline shapes world when its weights and gallery are in the checkout, else a
random-init stand-in built here (same code paths, same endpoints). Timings are not tested.
"""

import io
import os
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from PIL import Image

from isearle import demo as D
from isearle.paths import REPO_DIR
from isearle.testing import AppProcess

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

#: the offline world is served when its weights and an up-to-date gallery are in the checkout
#: (a stale gallery would be rebuilt by the app: not something a test should do to the checkout)
REAL_WORLD = (REPO_DIR / "gallery_index" / "index.json").is_file() and (
    REPO_DIR / "assets" / "models" / "isearle-shapes.safetensors").is_file() and not D.offline_gallery_stale(
    REPO_DIR / "gallery_index")


def app_arguments(tmp: Path) -> list[str]:
    """No arguments for the real offline world (what `python app.py` serves), else the stand-in's."""
    if REAL_WORLD:
        return []
    world = D.build_test_world(tmp / "world")
    return ["--gallery", str(world["gallery"]), "--phi", str(world["phi"])]


def app_environment(tmp: Path) -> dict[str, str]:
    """Offline; thumbnails and uploads under `tmp`, concept banks in a cache shared by the session."""
    return {"HF_HUB_OFFLINE": "1", "ISEARLE_CACHE": str(tmp.parent / "isearle-cache"), "TMPDIR": str(tmp),
            "GRADIO_TEMP_DIR": str(tmp / "gradio"), "GRADIO_ANALYTICS_ENABLED": "False"}


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("app")
    arguments = app_arguments(tmp)
    with AppProcess(arguments, app_environment(tmp), log=tmp / "app.log") as proc:
        proc.test_arguments = arguments  # what an in-process engine needs to serve the same world
        yield proc


@pytest.fixture(scope="module")
def client(app):
    return Client(app.url, verbose=False, download_files=False, analytics_enabled=False)


@pytest.fixture(scope="module")
def method(client):
    """phi when the served backbone has one, else OTI (with few steps, see `STEPS`)."""
    return client.predict(api_name="/info")["methods"][0]


STEPS = 10


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Reference files, good and bad."""
    d = tmp_path_factory.mktemp("inputs")

    def save(name, image, **kw):
        image.save(d / name, **kw)
        return d / name

    out = {f"colour{i}": save(f"colour{i}.png", Image.new("RGB", (64, 64), (20 * i, 255 - 12 * i, 90)))
           for i in range(10)}
    out["rgba"] = save("rgba.png", Image.new("RGBA", (48, 48), (255, 0, 0, 90)))
    out["palette"] = save("palette.png", Image.new("RGB", (48, 48), "green").convert("P"))
    out["cmyk"] = save("cmyk.jpg", Image.new("RGB", (48, 48), "blue").convert("CMYK"))
    out["16bit"] = save("16bit.png", Image.new("I;16", (48, 48), 30000))
    exif = Image.Exif()
    exif[274] = 6
    out["exif"] = save("exif.jpg", Image.new("RGB", (60, 30), "yellow"), exif=exif.tobytes())
    (d / "not_an_image.png").write_text("this is text, not a picture")
    out["text"] = d / "not_an_image.png"
    buf = io.BytesIO()
    Image.effect_noise((128, 128), 60).convert("RGB").save(buf, format="JPEG")
    (d / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 3])
    out["truncated"] = d / "truncated.jpg"
    (d / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(300))
    out["corrupt"] = d / "corrupt.png"
    (d / "bomb.png").write_bytes(_bomb_png())
    out["bomb"] = d / "bomb.png"
    (d / "empty.png").write_bytes(b"")
    out["empty"] = d / "empty.png"
    return out


def _bomb_png(side: int = 100_000) -> bytes:
    """A valid PNG header announcing side x side pixels (decoding would need ~30 GB)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def search(client, reference, caption, k=10, method="phi", steps=STEPS):
    ref = handle_file(str(reference)) if reference is not None else None
    return client.predict(ref, caption, k, method, steps, api_name="/search")


def test_query_returns_k_results_in_rank_order(client, method, files):
    gallery, status, hits, *_ = search(client, files["colour1"], "is a red star instead", k=7, method=method)
    assert len(gallery) == 7 and len(hits) == 7
    assert [h["rank"] for h in hits] == list(range(1, 8))
    scores = [h["score"] for h in hits]
    assert scores == sorted(scores, reverse=True)
    assert [g["caption"].split(" · ")[0] for g in gallery] == [f"#{r}" for r in range(1, 8)]
    assert "7 results" in status
    assert len({h["id"] for h in hits}) == 7


def test_explain_panel(client, method, files):
    search(client, files["colour2"], "is blue instead", method=method)
    tokens, concepts, image_only, text_only, summary = client.predict(
        handle_file(str(files["colour2"])), "is blue instead", method, STEPS, api_name="/explain")
    assert tokens and concepts and "S* reads as" in summary
    assert len(image_only) == 6 and len(text_only) == 6


def test_example_reference_is_left_out_and_ground_truth_counted(client, method, tmp_path):
    examples = D.load_examples()
    if examples is None:
        pytest.skip("assets/examples.json is missing")
    ex = examples.references[0]
    path = tmp_path / "example.png"
    D.render_spec(ex.spec, D.REFERENCE_SIZE).save(path)  # the pixels the app shows for the example
    gallery, status, hits, *_ = search(client, path, ex.caption, k=10, method=method)
    assert f"gallery item `{ex.reference_id}`" in status
    assert ex.reference_id not in [h["id"] for h in hits]
    assert "The benchmark's answers" in status
    if REAL_WORLD:
        assert sum(h["ground_truth"] for h in hits) == sum(h["id"] in ex.gt_ids for h in hits)


@pytest.mark.parametrize("name, message", [
    ("text", "not a readable image"),
    ("truncated", "not a readable image"),
    ("corrupt", "not a readable image"),
    ("bomb", "too large"),
    ("empty", "empty"),
])
def test_bad_files_get_a_message(client, method, files, name, message):
    with pytest.raises(AppError, match=message):
        search(client, files[name], "is blue instead", method=method)


@pytest.mark.parametrize("caption, message", [
    ("", "caption is empty"),
    ("   \t ", "caption is empty"),
    ("costs $5", 'may not contain the placeholder "\\$"'),
    ("costs ＄5", "placeholder"),
])
def test_bad_captions_get_a_message(client, method, files, caption, message):
    with pytest.raises(AppError, match=message):
        search(client, files["colour3"], caption, method=method)


def test_no_reference_gets_a_message(client, method):
    with pytest.raises(AppError, match="no reference image"):
        search(client, None, "is blue instead", method=method)


@pytest.mark.parametrize("name, note", [
    ("rgba", "transparency"), ("palette", "palette image converted"), ("cmyk", "CMYK image converted"),
    ("16bit", "16-bit image"), ("exif", "EXIF orientation applied"),
])
def test_unusual_images_work_and_say_what_was_converted(client, method, files, name, note):
    gallery, status, hits, *_ = search(client, files[name], "is blue instead", k=5, method=method)
    assert len(hits) == 5 and note in status


def test_long_and_unicode_captions(client, method, files):
    _, status, hits, *_ = search(client, files["colour4"], " ".join(["is blue and large"] * 40), k=5, method=method)
    assert len(hits) == 5 and "cut at the context length" in status
    for text in ("est plus grand 😀", "青くする", "اجعلها زرقاء", "Ｉｓ ｂｌｕｅ", "e\u0301\u200b\u202e ok", "&lt;b&gt;"):
        _, status, hits, *_ = search(client, files["colour4"], text, k=3, method=method)
        assert len(hits) == 3, text


def test_server_keeps_serving(app, client, method, files):
    for name in ("text", "bomb", "corrupt"):
        with pytest.raises(AppError):
            search(client, files[name], "is red", method=method)
    assert app.alive()
    _, _, hits, *_ = search(client, files["colour5"], "is red", k=4, method=method)
    assert len(hits) == 4


def test_twenty_concurrent_queries(app, method, files):
    queries = [(files[f"colour{i % 10}"], ("is blue instead", "is a large star")[i // 10]) for i in range(20)]
    clients = [Client(app.url, verbose=False, download_files=False, analytics_enabled=False) for _ in range(4)]
    expected = [search(clients[0], ref, cap, k=8, method=method)[2] for ref, cap in queries]
    jobs = [clients[i % 4].submit(handle_file(str(ref)), cap, 8, method, STEPS, api_name="/search")
            for i, (ref, cap) in enumerate(queries)]
    with ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(lambda job: job.result(timeout=120), jobs))
    assert len(answers) == 20
    for want, got in zip(expected, answers, strict=True):
        hits = got[2]
        assert [h["score"] for h in hits] == pytest.approx([h["score"] for h in want], abs=1e-4)
        # the same ids in the same order, up to items whose scores tie (near-identical scenes)
        ties = {h["id"] for h in want if sum(abs(h["score"] - o["score"]) < 1e-5 for o in want) > 1}
        assert [h["id"] for h in hits if h["id"] not in ties] == [h["id"] for h in want if h["id"] not in ties]
        assert {h["id"] for h in hits} == {h["id"] for h in want} or ties


# ------------------------------------------------------------------------- retrieval is right
def test_a_different_caption_gives_different_results(client, method, files):
    _, _, blue, *_ = search(client, files["colour6"], "is blue instead", k=10, method=method)
    _, _, star, *_ = search(client, files["colour6"], "has a large red star on the left", k=10, method=method)
    assert [h["id"] for h in blue] != [h["id"] for h in star]
    assert [h["score"] for h in blue] != pytest.approx([h["score"] for h in star], abs=1e-3)


def test_a_shapescir_example_finds_its_ground_truth_in_the_top_10(client, method, tmp_path):
    examples = D.load_examples()
    if not REAL_WORLD or examples is None:
        pytest.skip("needs the offline world's weights, gallery and examples")
    ex = examples.references[2]  # the README screenshot's example
    path = tmp_path / "example.png"
    D.render_spec(ex.spec, D.REFERENCE_SIZE).save(path)
    _, status, hits, *_ = search(client, path, ex.caption, k=10, method=method)
    found = [h["id"] for h in hits if h["id"] in ex.gt_ids]
    assert found and sum(h["ground_truth"] for h in hits) == len(found)
    assert f"**{len(found)} of {len(ex.gt_ids)}**" in status


def test_the_cached_reference_is_warm_and_answers_as_an_uncached_call(app, client, method, tmp_path):
    import argparse

    ref = tmp_path / "fresh.png"  # pixels no other test sends
    Image.new("RGB", (64, 64), (123, 45, 210)).save(ref)
    _, first, *_ = search(client, ref, "is green", k=8, method=method)
    assert "cached" not in first
    _, status, hits, *_ = search(client, ref, "has a small circle", k=8, method=method)
    assert "(reference cached)" in status  # S* of this reference was reused
    parser = argparse.ArgumentParser()
    D.add_arguments(parser)  # the app's settings: its environment is this process's (ISEARLE_PRECISION too)
    args = parser.parse_args([*app.test_arguments, "--no-warmup"])
    assert args.precision == "fp32"  # `auto` may choose another engine than the app's fp32
    engine = D.DemoEngine.start(args, warm=False)
    fresh = engine.search(None, ref, "has a small circle", k=8, method=method, steps=STEPS)
    assert fresh.cached == ""
    assert [h["id"] for h in hits] == [it.id for it in fresh.items]
    assert [h["score"] for h in hits] == pytest.approx([it.score for it in fresh.items], abs=1e-4)


def test_the_app_on_precision_auto_measures_its_engines_and_answers_as_fp32(tmp_path):
    """`python app.py` with the default `--precision auto`: /info reports what was measured for each
    tower and for the warm captions (ONNX Runtime where installed), and a warm query (a new caption
    for a cached reference: the continuation path) ranks as an fp32 engine does uncached."""
    import argparse
    import importlib.util

    arguments = app_arguments(tmp_path)
    env = {**app_environment(tmp_path), "ISEARLE_PRECISION": "auto"}
    with AppProcess(arguments, env, log=tmp_path / "app.log") as proc:
        client = Client(proc.url, verbose=False, download_files=False, analytics_enabled=False)
        info = client.predict(api_name="/info")
        method = info["methods"][0]
        assert "auto:" in info["precision"]
        if importlib.util.find_spec("onnxruntime") is not None:
            assert "warm captions on" in info["precision"] and "ONNX Runtime" in info["precision"]
        ref = tmp_path / "ref.png"
        Image.new("RGB", (64, 64), (200, 30, 90)).save(ref)
        search(client, ref, "is green", k=8, method=method)
        _, status, hits, *_ = search(client, ref, "has a small circle", k=8, method=method)
    assert "(reference cached)" in status
    parser = argparse.ArgumentParser()
    D.add_arguments(parser, {})
    engine = D.DemoEngine.start(parser.parse_args([*arguments, "--no-warmup", "--precision", "fp32"]), warm=False)
    fresh = engine.search(None, ref, "has a small circle", k=8, method=method, steps=STEPS)
    report = info["precision"]
    bf16 = report.startswith(("bf16", "text bf16")) or "images bf16" in report  # where bf16 was kept
    tol = 5e-3 if bf16 else 1e-4  # bf16 moves scores; ONNX Runtime and fp32 agree to rounding
    assert [h["score"] for h in hits] == pytest.approx([it.score for it in fresh.items], abs=tol)
    if tol == 1e-4:
        assert [h["id"] for h in hits] == [it.id for it in fresh.items]
