"""The pseudo-word inspector's library side (isearle.explain, isearle.report) and `isearle inspect`.

On the offline shapes world (bundled tiny CLIP, phi and gallery) when it is in the checkout, else on
the random-init stand-in; values are checked against the query path (`Retriever`) they must agree with.
"""

import json
import random
from collections import deque

import pytest
import torch
import torch.nn.functional as F

from isearle import demo as D
from isearle import explain as I
from isearle.concepts import ConceptBank, load_vocabulary
from isearle.images import open_image
from isearle.oti import OTIConfig, invert, invert_steps, token_norm
from isearle.paths import REPO_DIR
from isearle.retrieval import Hit, Retriever, image_key
from isearle.service import Session, load_service

REAL_WORLD = (REPO_DIR / "gallery_index" / "index.json").is_file() and (
    REPO_DIR / "assets" / "models" / "isearle-shapes.safetensors").is_file() and not D.offline_gallery_stale(
    REPO_DIR / "gallery_index")
STEPS = 20


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    if REAL_WORLD:
        return load_service(REPO_DIR / "gallery_index", device="cpu")
    world = D.build_test_world(tmp_path_factory.mktemp("world"))
    return load_service(world["gallery"], phi=str(world["phi"]), device="cpu")


@pytest.fixture(scope="module")
def bank(service):
    return ConceptBank.build(service.backbone, load_vocabulary("shapes"), progress=False)


@pytest.fixture
def insp(service, bank):
    """A fresh retriever (empty caches) over the module's backbone, gallery and phi."""
    return Session(service.backbone, service.index, service.phi, service.phi_name, bank=bank)


@pytest.fixture(scope="module")
def examples():
    return D.load_examples().references


def image_of(ex, service):
    return D.render_spec(ex.spec, service.backbone.image_size)


def oti_config(insp, steps=STEPS):
    return insp.oti_config(steps)


def word_token(backbone, word):
    """The token-embedding row of a one-token word."""
    ids = backbone.tokenizer.encode(word)
    assert len(ids) == 1, word
    return backbone.token_embedding.weight[ids[0]].detach().clone()


# ----------------------------------------------------------------------------------- OTI steps
def test_invert_is_invert_steps_run_to_the_end(tiny):
    feats = torch.randn(3, tiny.embed_dim, generator=torch.Generator().manual_seed(1))
    cfg = OTIConfig(steps=12, max_norm=0.5, gamma=0.1)
    history: list[float] = []
    plain = invert(tiny, feats, cfg, history=history)
    states = [(s.step, float(s.loss), s.token.clone()) for s in invert_steps(tiny, feats, cfg)]
    assert [s for s, _, _ in states] == list(range(13))
    assert torch.equal(states[-1][2], plain)
    assert [loss for _, loss, _ in states[1:]] == history
    init = torch.randn(3, tiny.token_width, generator=torch.Generator().manual_seed(0)) * 0  # zero init
    first = next(invert_steps(tiny, feats, cfg, init=init))
    assert first.step == 0 and torch.equal(first.token, torch.zeros_like(first.token))


def test_streamed_warm_run_fills_the_cache_with_the_plain_runs_token(insp, service, examples):
    image = image_of(examples[0], service)
    cfg = oti_config(insp)
    plain = Retriever(service.backbone, service.index, service.phi).pseudo_token(image, "oti", cfg)
    last = deque(insp.retriever.oti_steps(image, cfg), maxlen=1)[0]
    assert last.step == STEPS and torch.equal(last.token[0], plain)
    assert torch.equal(insp.retriever.tokens.get((image_key(image), "oti", STEPS)), plain)  # cached
    cold = deque(insp.retriever.oti_steps(image, cfg, warm=False), maxlen=1)[0].token[0]
    assert not torch.allclose(cold, plain)


# ------------------------------------------------------------------------------- describing S*
def test_describe_a_real_word(insp):
    blue = word_token(insp.backbone, "blue")
    view = I.describe(insp, blue, k=5)
    assert view.tokens[0][0] == "blue" and view.tokens[0][1] == pytest.approx(1.0, abs=1e-5)
    assert view.norm == pytest.approx(float(blue.norm()), rel=1e-6)
    assert view.relative_norm == pytest.approx(float(blue.norm()) / token_norm(insp.backbone), rel=1e-6)
    # the concepts are the bank's cosines with "a photo of S*", best first
    feat = I.token_features(insp.backbone, blue, ["a photo of $"])[0]
    sims = insp.bank.features @ feat
    assert [c for c, _ in view.concepts] == [insp.bank.names[i] for i in sims.topk(5).indices]
    if REAL_WORLD:  # the trained model reads its own word back
        assert all("blue" in c for c, _ in view.concepts[:3]), view.concepts


def test_alone_and_composed_rankings_follow_the_query_path(insp, service, examples):
    ex = examples[0]
    image = image_of(ex, service)
    token = insp.retriever.pseudo_token(image, "phi")
    composed = I.rank(insp, token, ex.caption, 10, exclude=[ex.reference_id])
    expected = insp.retriever.query(image, ex.caption, 10, "phi", exclude=[ex.reference_id])
    assert [h.id for h in composed] == [h.id for h in expected]
    assert [h.score for h in composed] == pytest.approx([h.score for h in expected], abs=1e-5)
    alone = I.rank(insp, token, None, 10, exclude=[ex.reference_id])
    feat = I.token_features(insp.backbone, token, ["a photo of $"])[0]
    assert [h.id for h in alone] == [h.id for h in insp.retriever.search(feat, 10, [ex.reference_id])]
    assert ex.reference_id not in {h.id for h in alone}


# --------------------------------------------------------------------------------- watching OTI
def test_watch_oti_frames_and_final_state(insp, service, examples):
    ex = examples[1]
    image = image_of(ex, service)
    cfg = oti_config(insp)
    frames = list(I.watch_oti(insp, image, ex.caption, cfg, every=5, k=5, exclude=[ex.reference_id]))
    assert [f.step for f in frames] == [0, 5, 10, 15, 20]
    assert frames[-1].done and not frames[0].done
    plain = Retriever(service.backbone, service.index, service.phi).pseudo_token(image, "oti", cfg)
    final = frames[-1]
    assert torch.equal(final.token, plain)  # the streamed run ends with the plain run's S*
    phi = insp.retriever.phi_token(image)  # the run started from phi's S*, projected into the norm cap
    assert float(F.cosine_similarity(frames[0].token, phi, dim=0)) == pytest.approx(1.0, abs=1e-6)
    cap = cfg.max_norm * token_norm(insp.backbone) if cfg.max_norm else float("inf")
    assert frames[0].view.norm == pytest.approx(min(float(phi.norm()), cap), rel=1e-5)
    assert set(final.losses) == {I.WARM_CURVE, I.COLD_CURVE}
    assert all(len(v) == STEPS for v in final.losses.values())
    assert [len(v) for v in frames[2].losses.values()] == [10, 10]
    assert final.view.norm == pytest.approx(float(plain.norm()), rel=1e-6)
    assert [h.id for h in final.hits] == [h.id for h in I.rank(insp, plain, ex.caption, 5, [ex.reference_id])]
    if REAL_WORLD:  # phi's start is already a good pseudo-word: its first losses are below noise's
        warm, cold = final.losses[I.WARM_CURVE], final.losses[I.COLD_CURVE]
        assert sum(warm[:5]) < sum(cold[:5])
    only_cold = list(I.watch_oti(insp, image, ex.caption, cfg, every=10, warm=False))
    assert set(only_cold[-1].losses) == {I.COLD_CURVE}
    assert not torch.equal(only_cold[-1].token, plain)


# ----------------------------------------------------------------------------- phi against OTI
def test_compare_phi_and_oti(insp, service, examples):
    ex = examples[2]
    image = image_of(ex, service)
    cfg = oti_config(insp)
    c = I.compare(insp, image, ex.caption, cfg, k=10, exclude=[ex.reference_id])
    phi, oti = insp.retriever.pseudo_token(image, "phi"), insp.retriever.pseudo_token(image, "oti", cfg)
    assert c.cosine == pytest.approx(float(F.cosine_similarity(phi, oti, dim=0)), abs=1e-6)
    assert c.phi.norm == pytest.approx(float(phi.norm()), rel=1e-6)
    assert [h.id for h in c.oti_hits] == [h.id for h in insp.retriever.query(
        image, ex.caption, 10, "oti", cfg, exclude=[ex.reference_id])]
    shared = len({h.id for h in c.phi_hits} & {h.id for h in c.oti_hits})
    assert c.overlap == pytest.approx(shared / 10)
    no_phi = Session(service.backbone, service.index, None, None, bank=insp.bank, trained_only=False)
    with pytest.raises(ValueError, match="no phi"):
        I.compare(no_phi, image, ex.caption, cfg)


def test_overlap():
    hits = [Hit(r + 1, i, 0.0, {}) for r, i in enumerate("abcd")]
    other = [Hit(r + 1, i, 0.0, {}) for r, i in enumerate("dxay")]
    assert I.overlap(hits, other, 4) == 0.5
    assert I.overlap(hits, other, 2) == 0.0
    assert I.overlap(hits, other, 3) == pytest.approx(1 / 3)  # "a" is in both top-3s
    assert I.overlap(hits, hits) == 1.0


# ------------------------------------------------------------------------------------ blending
def test_blend_ends_are_the_references_and_the_norm_is_interpolated():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(16, generator=g), 3 * torch.randn(16, generator=g)
    assert torch.equal(I.blend(a, b, 0.0), a) and torch.equal(I.blend(a, b, 1.0), b)
    for alpha in (0.25, 0.5, 0.9):
        mix = I.blend(a, b, alpha)
        assert float(mix.norm()) == pytest.approx((1 - alpha) * float(a.norm()) + alpha * float(b.norm()), rel=1e-5)
        plain = (1 - alpha) * a + alpha * b
        assert float(F.cosine_similarity(mix, plain, dim=0)) == pytest.approx(1.0, abs=1e-6)
    assert float(I.blend(a, -a, 0.5).norm()) == pytest.approx(0.0, abs=1e-3)  # opposite: nothing to keep
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        I.blend(a, b, 1.5)


def test_blended_rankings_at_the_ends_are_the_references_rankings(insp, service, examples):
    a, b = (insp.retriever.pseudo_token(image_of(ex, service), "phi") for ex in examples[:2])
    exclude = [examples[0].reference_id, examples[1].reference_id]
    for alpha, token in ((0.0, a), (1.0, b)):
        got = I.rank(insp, I.blend(a, b, alpha), "is blue instead", 10, exclude)
        assert [h.id for h in got] == [h.id for h in I.rank(insp, token, "is blue instead", 10, exclude)]
    middle = I.rank(insp, I.blend(a, b, 0.5), "is blue instead", 10, exclude)
    assert [h.id for h in middle] != [h.id for h in I.rank(insp, a, "is blue instead", 10, exclude)]


# -------------------------------------------------------------------------- which words mattered
def test_word_effects_match_the_query_path(insp, service, examples):
    ex = examples[0]  # "make the cross orange"
    image = image_of(ex, service)
    token = insp.retriever.pseudo_token(image, "phi")
    base, effects = I.word_effects(insp, token, ex.caption, k=10, exclude=[ex.reference_id])
    words = ex.caption.split()
    assert [e.word for e in effects] == words and [e.position for e in effects] == list(range(len(words)))
    assert [h.id for h in base] == [h.id for h in insp.retriever.query(image, ex.caption, 10, "phi",
                                                                        exclude=[ex.reference_id])]
    full = insp.retriever.query_feature(image, ex.caption, "phi")
    for i, e in enumerate(effects):
        dropped = " ".join(words[:i] + words[i + 1:])
        feat = insp.retriever.query_feature(image, dropped, "phi")
        assert e.change == pytest.approx(float(1 - feat @ full), abs=2e-5)
        hits = insp.retriever.query(image, dropped, 100, "phi", exclude=[ex.reference_id])
        rank = next((h.rank for h in hits if h.id == base[0].id), None)
        assert e.top1_rank == rank
        assert e.overlap == pytest.approx(len({h.id for h in hits[:10]} & {h.id for h in base}) / 10)
    if REAL_WORLD:  # the colour word moves the query more than the article does
        by_word = {e.word: e.change for e in effects}
        assert by_word["orange"] > by_word["the"]


def test_dropping_a_word_not_in_the_caption_changes_nothing(insp, service, examples):
    ex = examples[0]
    token = insp.retriever.pseudo_token(image_of(ex, service), "phi")
    _, effects = I.word_effects(insp, token, ex.caption, k=10, exclude=[ex.reference_id],
                                words=["zebra", "ORANGE", "cross"])
    zebra, orange, cross = effects
    assert zebra.change < 1e-6 and zebra.top1_rank == 1 and zebra.overlap == 1.0
    assert orange.change > 1e-4  # dropped whatever its case
    assert I.drop_word("make the cross orange", "ORANGE") == "make the cross"
    assert I.drop_word("the cross and the star", "the") == "cross and star"
    with pytest.raises(ValueError, match="empty"):
        I.word_effects(insp, token, "  ", k=10)


# ---------------------------------------------------------------------------------- S* as a file
def test_saved_pseudo_word_loads_back_to_the_same_results(insp, service, examples, tmp_path, tiny):
    ex = examples[3]
    image = image_of(ex, service)
    cfg = oti_config(insp)
    token = insp.retriever.pseudo_token(image, "oti", cfg)
    meta = I.token_metadata(insp, image, "oti", cfg)
    path = I.save_token(tmp_path / "s.safetensors", token, meta)
    loaded = I.load_token(path, insp.backbone)
    assert torch.equal(loaded.token, token.float())
    assert loaded.metadata["model"] == insp.backbone.name and loaded.metadata["method"] == "oti"
    assert loaded.metadata["image_hash"] == image_key(image)
    assert loaded.metadata["settings"]["steps"] == STEPS and loaded.metadata["format"] == I.TOKEN_FORMAT
    assert [h.id for h in I.rank(insp, loaded.token, ex.caption, 10)] == [
        h.id for h in insp.retriever.query(image, ex.caption, 10, "oti", cfg)]
    with pytest.raises(ValueError, match="was made for"):
        I.load_token(path, tiny)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match="not a pseudo-word file"):
        I.load_token(bad)


# ---------------------------------------------------------------------------- batch inspection
@pytest.fixture(scope="module")
def folder(tmp_path_factory, service, examples):
    d = tmp_path_factory.mktemp("images")
    (d / "sub").mkdir()
    for n, ex in enumerate(examples[:4]):
        image_of(ex, service).save(d / ("sub" if n % 2 else ".") / f"{ex.reference_id}.png")
    return d


def test_inspect_images_and_summary(insp, folder):
    cfg = oti_config(insp, 10)
    paths = sorted(folder.rglob("*.png"))
    records = I.inspect_images(insp, paths, ["phi", "oti"], cfg, k=5, progress=False)
    assert len(records) == 4
    for r, p in zip(records, paths, strict=True):
        image = open_image(p)
        phi, oti = insp.retriever.pseudo_token(image, "phi"), insp.retriever.pseudo_token(image, "oti", cfg)
        assert r.views["phi"].norm == pytest.approx(float(phi.norm()), rel=1e-6)
        assert r.cosine == pytest.approx(float(F.cosine_similarity(phi, oti, dim=0)), abs=1e-6)
    s = I.summarise(records)
    norms = [r.views["oti"].norm for r in records]
    assert s["norm"]["oti"]["mean"] == pytest.approx(sum(norms) / 4) and s["norm"]["oti"]["max"] == max(norms)
    assert s["phi_oti_cosine"]["n"] == 4
    cold = I.inspect_images(insp, paths[:1], ["phi", "oti"], cfg, k=5, warm=False, progress=False)[0]
    assert cold.cosine < records[0].cosine  # OTI from noise strays further from phi than a warm start
    with pytest.raises(ValueError, match="unknown method"):
        I.inspect_images(insp, paths, ["image"], cfg)


def test_cli_inspect_writes_the_report_and_its_json_twin(folder, tmp_path, capsys):
    from isearle.cli import main

    out = tmp_path / "report"
    args = ["inspect", "--images", str(folder), "--method", "phi", "oti", "--steps", "5", "--top-k", "4",
            "--json", "--out", str(out)]
    if REAL_WORLD:
        args += ["--model", "isearle-shapes", "--pretrained", "isearle-shapes"]
    else:
        pytest.skip("the CLI report is tested on the bundled offline world")
    assert main(args) == 0
    assert "index.html" in capsys.readouterr().out
    data = json.loads((out / "report.json").read_text())
    assert data["summary"]["images"] == 4 and data["info"]["methods"] == ["phi", "oti"]
    rows = data["images"]
    assert {r["path"] for r in rows} == {str(p.relative_to(folder)) for p in folder.rglob("*.png")}
    assert all(len(r["phi"]["tokens"]) == 4 and 0 < r["phi_oti_cosine"] <= 1 for r in rows)
    norms = [r["oti"]["norm"] for r in rows]
    assert data["summary"]["norm"]["oti"]["mean"] == pytest.approx(sum(norms) / len(norms), abs=1e-5)
    html = (out / "index.html").read_text()
    assert html.count("<tr class=image-row>") == 4 and html.count("<svg") == 2
    for row, cells in zip(rows, html.split("<tr class=image-row>")[1:], strict=True):  # each row its own numbers
        assert row["path"] in cells and f"{row['phi_oti_cosine']:.3f}" in cells
        assert f"{row['oti']['norm']:.3f}" in cells and row["phi"]["concepts"][0][0] in cells
    assert main(["inspect", "--images", str(tmp_path / "nothing"), "--out", str(out)] + args[-4:]) == 1


def test_random_order_of_views_gives_the_same_numbers(insp, service, examples):
    """Caches are shared by the views: asking in another order must not change any number."""
    ex = examples[4]
    image = image_of(ex, service)
    cfg = oti_config(insp)
    calls = [lambda: I.compare(insp, image, ex.caption, cfg).cosine,
             lambda: I.describe(insp, insp.retriever.pseudo_token(image, "oti", cfg)).norm,
             lambda: I.word_effects(insp, insp.retriever.pseudo_token(image, "phi"), ex.caption)[1][0].change]
    first = [c() for c in calls]
    order = list(range(3))
    random.Random(0).shuffle(order)
    again = {i: calls[i]() for i in order}
    assert [again[i] for i in range(3)] == pytest.approx(first, abs=1e-6)
