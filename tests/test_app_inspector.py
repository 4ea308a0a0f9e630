"""The demo's pseudo-word inspector end to end: `python app.py` driven through gradio_client.

Every view's endpoint is called and its values checked against the query path's own endpoints
(/search) or against each other; the served world is the offline one when it is in the checkout.
"""

from pathlib import Path

import pytest
from PIL import Image
from safetensors.torch import load_file

from isearle import demo as D
from isearle.explain import token_digest

gradio_client = pytest.importorskip("gradio_client")
import test_app  # noqa: E402
from gradio_client import handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402
from test_app import REAL_WORLD  # noqa: E402

app, client = test_app.app, test_app.client  # test_app's module fixtures: this module gets a server of its own

STEPS = 30


@pytest.fixture(scope="module")
def refs(tmp_path_factory):
    """Two benchmark example references (rendered as the app shows them) and one image from nowhere."""
    d = tmp_path_factory.mktemp("refs")
    examples = D.load_examples().references
    out = {}
    for name, ex in (("a", examples[0]), ("b", examples[3])):
        D.render_spec(ex.spec, D.REFERENCE_SIZE).save(d / f"{name}.png")
        out[name] = (d / f"{name}.png", ex)
    Image.new("RGB", (96, 96), (30, 140, 220)).save(d / "plain.png")
    out["plain"] = (d / "plain.png", None)
    return out


def ids(hits_json):
    return [h["id"] for h in hits_json]


def search(client, path, caption, k=10, method="phi", steps=STEPS):
    return client.predict(handle_file(str(path)), caption, k, method, steps, None, api_name="/search")


def file_path(value) -> Path:
    return Path(value["path"] if isinstance(value, dict) else value)


def test_streamed_oti_ends_with_the_non_streamed_token(client, refs):
    path, ex = refs["a"]
    # the non-streamed run first: /download_token computes S* by OTI as a search does (and caches it)
    exported, meta = client.predict(handle_file(str(path)), "oti", STEPS, None, api_name="/download_token")
    plain = load_file(str(file_path(exported)))["pseudo_word"]
    assert meta["digest"] == token_digest(plain) and meta["method"] == "oti"
    job = client.submit(handle_file(str(path)), ex.caption, STEPS, 10, True, None, True, api_name="/watch_oti")
    frames = [out[-1] for out in job]
    final = job.outputs()[-1][-1]
    assert final["done"] and final["step"] == STEPS
    assert [f["step"] for f in frames if f][-1] == STEPS and len(job.outputs()) >= 2  # it streamed
    assert final["digest"] == token_digest(plain)  # recomputed step by step: the very same S*
    assert final["hits"] == ids(search(client, path, ex.caption, 5, "oti")[2])
    loss_plot = job.outputs()[-1][0]
    assert loss_plot is not None


def test_alone_marks_ground_truth_and_excludes_the_reference(client, refs):
    path, ex = refs["a"]
    gallery, summary, data = client.predict(handle_file(str(path)), ex.caption, "phi", STEPS, 10, None, True,
                                            api_name="/alone")
    assert len(data["hits"]) == 10 and ex.reference_id not in data["hits"]
    if REAL_WORLD:
        assert set(data["ground_truth"]) == set(data["hits"]) & set(ex.gt_ids)
        assert f"{len(data['ground_truth'])} of {len(ex.gt_ids)}" in summary
    composed = ids(search(client, path, ex.caption)[2])
    assert data["hits"] != composed  # the caption changes the ranking
    assert "a photo of S\\*" in summary and len(gallery) == 10


def test_compare_matches_the_two_searches(client, refs):
    path, ex = refs["b"]
    phi_gallery, oti_gallery, table, summary, data = client.predict(
        handle_file(str(path)), ex.caption, STEPS, 10, None, True, api_name="/compare")
    assert data["phi_hits"] == ids(search(client, path, ex.caption, 10, "phi")[2])
    assert data["oti_hits"] == ids(search(client, path, ex.caption, 10, "oti")[2])
    assert data["overlap"] == pytest.approx(len(set(data["phi_hits"]) & set(data["oti_hits"])) / 10)
    assert -1 <= data["cosine"] <= 1 and f"{data['cosine']:.3f}" in summary
    assert len(table["data"]) == 10 and table["data"][0][1] == data["phi"]["concepts"][0][0]


def test_blend_ends_are_the_references_own_rankings(client, refs):
    (a, ex_a), (b, ex_b) = refs["a"], refs["b"]
    for caption in (ex_a.caption, ""):
        at0 = client.predict(handle_file(str(a)), handle_file(str(b)), 0.0, caption, "phi", STEPS, 10, None, True,
                             api_name="/blend")[2]
        at1 = client.predict(handle_file(str(a)), handle_file(str(b)), 1.0, caption, "phi", STEPS, 10, None, True,
                             api_name="/blend")[2]
        if caption:  # the composed rankings, with the other reference left out as the blend does
            own_a = [i for i in ids(search(client, a, caption, 11)[2]) if i != ex_b.reference_id][:10]
            own_b = [i for i in ids(search(client, b, caption, 11)[2]) if i != ex_a.reference_id][:10]
        else:  # S* alone
            own_a = [i for i in client.predict(handle_file(str(a)), "", "phi", STEPS, 11, None, True,
                                               api_name="/alone")[2]["hits"] if i != ex_b.reference_id][:10]
            own_b = [i for i in client.predict(handle_file(str(b)), "", "phi", STEPS, 11, None, True,
                                               api_name="/alone")[2]["hits"] if i != ex_a.reference_id][:10]
        assert at0["hits"] == own_a and at1["hits"] == own_b
    half = client.predict(handle_file(str(a)), handle_file(str(b)), 0.5, "", "phi", STEPS, 10, None, True,
                          api_name="/blend")[2]
    assert half["hits"] not in (at0["hits"], at1["hits"])
    with pytest.raises(AppError, match="no second reference"):
        client.predict(handle_file(str(a)), None, 0.5, "", "phi", STEPS, 10, None, True, api_name="/blend")


def test_word_effects(client, refs):
    path, ex = refs["a"]
    plot, table, summary, data = client.predict(handle_file(str(path)), ex.caption, "phi", STEPS, 10, "", None,
                                                True, api_name="/words")
    words = ex.caption.split()
    assert [r["word"] for r in data["effects"]] == [f"{i + 1}. {w}" for i, w in enumerate(words)]
    assert data["top"] == ids(search(client, path, ex.caption)[2])
    assert all(0 <= r["change"] <= 2 and 0 <= r["overlap"] <= 1 for r in data["effects"])
    # dropping a word that is not in the caption changes nothing measurable
    data = client.predict(handle_file(str(path)), ex.caption, "phi", STEPS, 10, "zebra", None, True,
                          api_name="/words")[3]
    (zebra,) = data["effects"]
    assert zebra["change"] < 1e-6 and zebra["top1_rank"] == 1 and zebra["overlap"] == 1.0


def test_downloaded_pseudo_word_loads_back_to_the_same_results(client, refs, tmp_path):
    path, _ = refs["plain"]  # not a gallery item: the search leaves nothing out
    exported, meta = client.predict(handle_file(str(path)), "phi", STEPS, None, api_name="/download_token")
    assert meta["model"] and meta["method"] == "phi" and len(meta["image_hash"]) == 32
    expected = ids(search(client, path, "is larger")[2])
    _, summary, data = client.predict(handle_file(str(file_path(exported))), "is larger", 10, None,
                                      api_name="/search_token")
    assert data["hits"] == expected and data["metadata"]["image_hash"] == meta["image_hash"]
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 64)
    with pytest.raises(AppError, match="not a pseudo-word file"):
        client.predict(handle_file(str(bad)), "is larger", 10, None, api_name="/search_token")
    assert search(client, path, "is larger")[2]  # still serving


def test_streamed_view_errors_are_one_line_messages(client, refs):
    with pytest.raises(AppError, match="no reference image"):
        client.predict(None, "is blue", STEPS, 10, True, None, True, api_name="/watch_oti")
    with pytest.raises(AppError, match="caption is empty"):
        client.predict(handle_file(str(refs["a"][0])), " ", STEPS, 10, True, None, True, api_name="/watch_oti")
    assert client.predict(handle_file(str(refs["a"][0])), "", "phi", STEPS, 3, None, True,
                          api_name="/alone")[2]["hits"]  # still serving
