"""What a stranger can and cannot do with the running demo, and the inspector's promises, through
its HTTP API (`python app.py` on a localhost port, driven by gradio_client and plain HTTP).

Only the thumbnail folder is served (never a gallery index or an image folder); no answer holds an
absolute server path; every image input goes through the same checks; the inspector's word effects
are what two searches give; a pseudo-word file of a gallery item searches like the item itself;
the cold OTI curve draws what an unwatched cold run draws.
"""

import dataclasses
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import test_app
from PIL import Image
from test_app import REAL_WORLD, STEPS, search

from isearle import demo as D
from isearle.paths import REPO_DIR

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

app, client, method, files = test_app.app, test_app.client, test_app.method, test_app.files  # test_app's fixtures


def ids(hits):
    return [h["id"] for h in hits]


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    """A ShapesCIR example reference as the app shows it (a known gallery item), with its query."""
    if not REAL_WORLD:
        pytest.skip("needs the offline world (its examples are gallery items there)")
    ex = [e for e in D.load_examples().references if e.reference_id == "000108"][0]
    path = tmp_path_factory.mktemp("example") / "000108.png"
    D.render_spec(ex.spec, D.REFERENCE_SIZE).save(path)
    return path, ex


def _gallery_dir(app) -> Path:
    args = app.test_arguments
    return Path(args[args.index("--gallery") + 1]) if "--gallery" in args else REPO_DIR / "gallery_index"


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as err:
        return err.code


def _file_url(app, path: Path | str) -> str:
    return f"{app.url}gradio_api/file={urllib.parse.quote(str(path))}"


def test_only_what_the_page_shows_is_served(app, client, method, files):
    hits = search(client, files["colour1"], "is blue instead", method=method)[0]
    thumb = hits[0]["image"]
    assert _status(thumb["url"]) == 200  # the thumbnails, at display size, are served
    gallery = _gallery_dir(app)
    private = [gallery / "index.faiss", gallery / "items.json", gallery / "index.json",
               REPO_DIR / "assets" / "models" / "checksums.json", REPO_DIR / "app.py"]
    for path in private:
        assert path.is_file(), path
        assert _status(_file_url(app, path)) in (403, 404), path


def test_the_served_folders_are_the_thumbnails_only(tmp_path):
    """An --images folder and every gallery folder are never an allowed path, and are blocked."""
    images, gallery = tmp_path / "photos", tmp_path / "gallery"
    engine = D.DemoEngine([D.GalleryEntry(gallery, images=images), D.GalleryEntry(tmp_path / "other")],
                          thumbs_dir=tmp_path / "thumbs")
    assert engine.served_paths() == [str(tmp_path / "thumbs")]
    assert set(engine.private_paths()) == {str(images), str(gallery), str(tmp_path / "other")}


def _strings(value, out):
    """Every string of a JSON answer, except inside Gradio's own file records (its cache)."""
    if isinstance(value, dict):
        if "url" in value and "path" in value:  # gradio.FileData: served from Gradio's cache by URL
            return out
        for v in value.values():
            _strings(v, out)
    elif isinstance(value, (list, tuple)):
        for v in value:
            _strings(v, out)
    elif isinstance(value, str):
        out.append(value)
    return out


def test_no_answer_holds_an_absolute_server_path(app, client, method, files, tmp_path):
    answers = [client.predict(api_name="/info"), search(client, files["colour2"], "is larger", method=method),
               client.predict(handle_file(str(files["colour2"])), "is larger", method, STEPS, None, True,
                              api_name="/explain")]
    exported, meta = client.predict(handle_file(str(files["colour2"])), method, STEPS, None, api_name="/download_token")
    answers += [meta, client.predict(handle_file(str(exported["path"] if isinstance(exported, dict) else exported)),
                                     "is larger", 10, None, api_name="/search_token")]
    roots = {str(REPO_DIR), str(Path.home()), "/tmp/", str(tmp_path.parent.parent)}
    for text in _strings(answers, []):
        assert not any(root in text for root in roots), text
    from safetensors import safe_open

    with safe_open(exported["path"] if isinstance(exported, dict) else exported, "pt") as f:
        for text in (f.metadata() or {}).values():
            assert not any(root in text for root in roots), text


@pytest.mark.parametrize(("name", "message"), [("text", "not a readable image"), ("bomb", "too large"),
                                               ("truncated", "not a readable image"), ("empty", "empty")])
def test_blend_b_gets_the_upload_checks_and_their_messages(client, method, files, name, message):
    with pytest.raises(AppError, match=message) as caught:
        client.predict(handle_file(str(files["colour1"])), handle_file(str(files[name])), 0.5, "", method, STEPS, 10,
                       None, True, api_name="/blend")
    assert "\n" not in str(caught.value).strip()


def test_a_tiny_image_is_accepted_with_a_warning(client, method, tmp_path):
    tiny = tmp_path / "one-pixel.png"
    Image.new("RGB", (1, 1), "red").save(tiny)
    status = search(client, tiny, "is blue instead", method=method)[1]
    assert "only 1×1 px" in status


def test_words_rows_are_what_two_searches_give(client, method, example):
    """/words' top-1 rank and overlap of each dropped word, against /search with and without it."""
    path, ex = example
    data = client.predict(handle_file(str(path)), ex.caption, method, STEPS, 10, "", None, True, api_name="/words")[3]
    base = ids(search(client, path, ex.caption, 10, method=method)[2])
    assert data["top"] == base
    words = ex.caption.split()
    for i, row in enumerate(data["effects"]):
        without = " ".join(words[:i] + words[i + 1:])
        ranking = ids(search(client, path, without, 50, method=method)[2])
        assert row["overlap"] == pytest.approx(len(set(base) & set(ranking[:10])) / 10), row
        want = ranking.index(base[0]) + 1 if base[0] in ranking else None
        if want is not None or row["top1_rank"] is None or row["top1_rank"] > 50:
            assert row["top1_rank"] == want or (want is None and row["top1_rank"] > 50), row
    assert len({(r["top1_rank"], r["overlap"]) for r in data["effects"]}) > 1  # not the same row for every word


def test_a_gallery_items_pseudo_word_file_searches_like_the_item(client, method, example):
    """The file keeps the reference's id: its search leaves the item out and marks the ground truth."""
    path, ex = example
    exported, meta = client.predict(handle_file(str(path)), method, STEPS, None, api_name="/download_token")
    assert meta["reference_id"] == ex.reference_id
    direct = search(client, path, ex.caption, 10, method=method)[2]
    file = exported["path"] if isinstance(exported, dict) else exported
    _, summary, data = client.predict(handle_file(str(file)), ex.caption, 10, None, api_name="/search_token")
    assert data["hits"] == ids(direct) and ex.reference_id not in data["hits"]
    assert data["ground_truth"] == [h["id"] for h in direct if h["ground_truth"]] and data["ground_truth"]


def test_the_ground_truth_strip_ranks_every_answer(client, method, example):
    """Example 000108 finds 3 of its 5 ground truths in the top 10: the other two get their ranks too."""
    path, ex = example
    out = search(client, path, ex.caption, 10, method=method)
    hits, truth = out[2], out[5]
    assert sorted(t["id"] for t in truth) == sorted(ex.gt_ids)
    ranking = ids(search(client, path, ex.caption, 50, method=method)[2])
    for t in truth:
        assert t["id"] not in ranking or ranking.index(t["id"]) + 1 == t["rank"]
        assert (t["rank"] <= 10) == (t["id"] in ids(hits))
    assert any(t["rank"] > 10 for t in truth)


def test_the_cold_oti_curve_draws_what_an_unwatched_cold_run_draws(tmp_path):
    """Watched with a warm start, the run from noise beside it uses the same seed (templates, noise) as
    the warm run and `isearle inspect --cold`: its losses are those of a plain cold run with that seed."""
    from isearle import explain as I
    from isearle.oti import invert_steps
    from isearle.service import load_service

    world = D.build_test_world(tmp_path / "world", n=60)
    session = load_service(world["gallery"], phi=str(world["phi"]), device="cpu")
    image = Image.new("RGB", (64, 64), (200, 40, 40))
    oti = session.oti_config(12)
    *_, last = I.watch_oti(session, image, "is blue instead", oti, every=4, k=3)
    cold = last.losses[I.COLD_CURVE]
    _, feats = session.retriever.image_features(session.retriever.reference(image))
    plain = [float(s.loss) for s in invert_steps(session.backbone, feats[None].clone(), oti) if s.step > 0]
    other = [float(s.loss) for s in invert_steps(session.backbone, feats[None].clone(),
                                                 dataclasses.replace(oti, seed=oti.seed + 1)) if s.step > 0]
    assert cold == pytest.approx(plain, rel=1e-5) and cold != pytest.approx(other, rel=1e-5)
    tokens = I.pseudo_tokens(session, image, ["oti"], oti, warm=False)  # what `isearle inspect --cold` makes
    assert I.token_digest(tokens["oti"]) == I.token_digest(
        list(invert_steps(session.backbone, feats[None].clone(), oti))[-1].token[0])


def test_an_image_folder_app_serves_no_source_image_and_no_index(tmp_path):
    """`python app.py --images FOLDER`: the folder's pictures and the gallery built from them are not
    downloadable; the thumbnails the page shows are."""
    from isearle.testing import AppProcess

    world = D.build_test_world(tmp_path / "world", n=30)
    folder = tmp_path / "private-photos"
    folder.mkdir()
    for i, colour in enumerate(["red", "green", "blue", "white"]):
        Image.new("RGB", (48 + i, 40), colour).save(folder / f"{colour}.png")
    args = ["--images", str(folder), "--model", "isearle-tiny-test", "--pretrained", str(world["checkpoint"]),
            "--hub-cache", str(tmp_path / "cache"), "--gallery", "", "--examples", str(tmp_path / "none.json")]
    with AppProcess(args, test_app.app_environment(tmp_path), log=tmp_path / "app.log") as proc:
        c = gradio_client.Client(proc.url, verbose=False, download_files=False, analytics_enabled=False)
        hits = c.predict(handle_file(str(folder / "red.png")), "is blue", 3, "oti", STEPS, api_name="/search")[0]
        assert _status(hits[0]["image"]["url"]) == 200
        built = next((tmp_path / "cache").glob("hub-*"))
        for path in [folder / "red.png", folder / "blue.png", built / "index.json", built / "items.json"]:
            assert path.is_file(), path
            assert _status(_file_url(proc, path)) in (403, 404), path
