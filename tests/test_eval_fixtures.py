"""The evaluation on tiny datasets written on the fly in each official layout.

A table-driven fake backbone gives every fixture image a chosen feature, so that with the "image"
method (query = the reference's feature) every ranking, and so every metric, is known by hand:
ties, the reference-exclusion rule and CIRCO queries with more ground truths than K included. The
random-init tiny CLIP then runs every benchmark and method through the CLI for well-formed output.
"""

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import isearle.backbone
from isearle import datasets as D
from isearle.cli import main as cli_main
from isearle.evaluation import evaluate, format_table

S5 = math.sqrt(5)


def vec(*xs: float) -> list[float]:
    return list(xs) + [0.0] * (4 - len(xs))


def mix(c: float, axis_a: int = 0, axis_b: int = 1) -> list[float]:
    """A unit vector with cosine `c` to axis a, the rest on axis b."""
    v = [0.0] * 4
    v[axis_a], v[axis_b] = c, math.sqrt(1 - c * c)
    return v


E1, E2, E3, E4 = vec(1), vec(0, 1), vec(0, 0, 1), vec(0, 0, 0, 1)


class FakeBackbone:
    """Image features looked up by image content: {sha1 of the RGB bytes: 4-d vector}."""

    def __init__(self, table: dict[str, list[float]]) -> None:
        self.table = table
        self.name, self.pretrained, self.device = "fake", "fake-weights", torch.device("cpu")
        self.precision = "fp32"
        self.embed_dim, self.token_width, self.image_size = 4, 4, 32
        self.encoded = 0

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        return torch.tensor(self.table[digest(image)])

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        self.encoded += pixels.shape[0]
        return pixels.float()


def digest(image: Image.Image) -> str:
    return hashlib.sha1(image.convert("RGB").tobytes()).hexdigest()


def write_image(path: Path, table: dict, feature: list[float], size: tuple[int, int] = (20, 12)) -> None:
    """A PNG of a colour no other fixture image has (elongated: targetpad pads it) with fake feature `feature`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    n = len(table)
    image = Image.new("RGB", size, (n % 256, n // 256, 77))
    assert digest(image) not in table
    image.save(path, format="PNG")  # lossless even under a .jpg name (PIL reads the content)
    table[digest(image)] = feature


# ------------------------------------------------------------------------------- fixtures
CIRR_FEATURES = [E1, E1, [2 / S5, 1 / S5, 0, 0], E2, mix(1 / math.sqrt(2)), E3, [0, 1 / S5, 2 / S5, 0], E4]


def make_cirr(root: Path, table: dict) -> None:
    names = [f"dev-0-{i // 2}-img{i % 2}" for i in range(8)]
    for n, f in zip(names, CIRR_FEATURES, strict=True):
        write_image(root / "dev" / f"{n}.png", table, f)
    test_names = [f"test1-0-{i // 2}-img{i % 2}" for i in range(4)]
    for i, n in enumerate(test_names):
        write_image(root / "test1" / f"{n}.png", table, [E1, E2, E3, E4][i])
    n = names

    def trip(pairid, ref, target, members):
        return {"pairid": pairid, "reference": n[ref], "target_hard": n[target], "target_soft": {n[target]: 1.0},
                "caption": "has a different colour", "img_set": {"id": 1, "members": [n[m] for m in members]},
                "reference_rank": members.index(ref)}

    val = [trip(100, 0, 1, [0, 1, 3, 5, 7, 2]), trip(101, 1, 2, [1, 2, 3, 4, 6, 7]),
           trip(102, 3, 5, [3, 5, 6, 7, 0, 2]), trip(103, 6, 7, [6, 7, 0, 1, 2, 3])]
    test = [{"pairid": 200 + i, "reference": test_names[i], "caption": "is bigger",
             "img_set": {"id": 9, "members": test_names}, "reference_rank": i} for i in range(4)]
    (root / "cirr" / "captions").mkdir(parents=True)
    (root / "cirr" / "image_splits").mkdir(parents=True)
    (root / "cirr" / "captions" / "cap.rc2.val.json").write_text(json.dumps(val))
    (root / "cirr" / "captions" / "cap.rc2.test1.json").write_text(json.dumps(test))
    (root / "cirr" / "image_splits" / "split.rc2.val.json").write_text(json.dumps({x: f"./dev/{x}.png" for x in names}))
    (root / "cirr" / "image_splits" / "split.rc2.test1.json").write_text(
        json.dumps({x: f"./test1/{x}.png" for x in test_names}))


# CIRCO gallery: COCO ids 1..14 (row i = id i+1); cosines to e1 spaced by 0.05 for ids 2..11
CIRCO_FEATURES = [E1] + [mix(c) for c in (0.95, 0.90, 0.85, 0.80, 0.75, 0.70, 0.65, 0.60, 0.55, 0.50)] + [E3, E3, E4]


def make_circo(root: Path, table: dict) -> None:
    coco = root / "COCO2017_unlabeled"
    images = []
    for i, f in enumerate(CIRCO_FEATURES):
        name = f"{i + 1:012d}.jpg"
        write_image(coco / "unlabeled2017" / name, table, f)
        images.append({"file_name": name, "id": i + 1, "coco_url": "", "height": 12, "width": 20})
    (coco / "annotations").mkdir(parents=True)
    (coco / "annotations" / "image_info_unlabeled2017.json").write_text(json.dumps({"images": images}))
    val = [
        {"reference_img_id": 1, "target_img_id": 2, "relative_caption": "has two of them", "shared_concept": "x",
         "gt_img_ids": [2, 4, 5, 7, 9, 10, 11], "id": 0, "semantic_aspects": ["cardinality", "addition"]},
        {"reference_img_id": 12, "target_img_id": 13, "relative_caption": "is outdoors", "shared_concept": "y",
         "gt_img_ids": [13, 14], "id": 1, "semantic_aspects": ["addition"]},
        {"reference_img_id": 14, "target_img_id": 9, "relative_caption": "seen from above", "shared_concept": "z",
         "gt_img_ids": [9], "id": 2, "semantic_aspects": ["viewpoint"]},
    ]
    test = [{"reference_img_id": r, "relative_caption": "is red", "shared_concept": "w", "id": i}
            for i, r in enumerate((1, 12))]
    (root / "annotations").mkdir(parents=True)
    (root / "annotations" / "val.json").write_text(json.dumps(val))
    (root / "annotations" / "test.json").write_text(json.dumps(test))


def make_fashioniq(root: Path, table: dict) -> None:
    galleries = {
        "dress": [E1] + [E2] * 10 + [E3],  # d0 .. d11
        "shirt": [E1, mix(0.9), E3],
        "toptee": [E1] * 12 + [E2],
    }
    queries = {
        "dress": [("dress-0", "dress-11", ["is longer.", " has no sleeves?"]),
                  ("dress-1", "dress-5", ["is red", "is shorter,"])],
        "shirt": [("shirt-0", "shirt-1", ["is blue", "has a collar"])],
        "toptee": [("toptee-0", "toptee-12", ["is plain", "is green"])],
    }
    for cat, feats in galleries.items():
        names = [f"{cat}-{i}" for i in range(len(feats))]
        for n, f in zip(names, feats, strict=True):
            write_image(root / "images" / f"{n}.jpg", table, f)
        (root / "image_splits").mkdir(parents=True, exist_ok=True)
        (root / "captions").mkdir(parents=True, exist_ok=True)
        (root / "image_splits" / f"split.{cat}.val.json").write_text(json.dumps(names))
        caps = [{"target": t, "candidate": c, "captions": cc} for c, t, cc in queries[cat]]
        (root / "captions" / f"cap.{cat}.val.json").write_text(json.dumps(caps))


def make_imagenet_r(root: Path, table: dict) -> None:
    # gallery (targets file order): 0 cartoon c0 (e2), 1..11 sculpture c1 (e1), 12 cartoon c0 (e1), 13 toy c0 (.9)
    targets = [("n01/cartoon_0.jpg", 0, E2)]
    targets += [(f"n02/sculpture_{i}.jpg", 3001, E1) for i in range(11)]
    targets += [("n01/cartoon_1.jpg", 0, E1), ("n01/toy_0.jpg", 2000, mix(0.9))]
    lines = []
    for rel, label, f in targets:
        write_image(root / "imagenet-r" / rel, table, f)
        lines.append(f"imgnet/imagenet-r/{rel} {label} ")
    (root / "imgnet_targets.txt").write_text("\n".join(lines) + "\n")
    queries = [("n01/ILSVRC2012_val_00000001.JPEG", 0), ("n02/ILSVRC2012_val_00000002.JPEG", 1)]
    for rel, _ in queries:
        write_image(root / "real" / rel, table, E1)
    (root / "imgnet_real_query.txt").write_text("".join(f"imgnet/real/{r} {c} \n" for r, c in queries))


SHAPES_FEATURES = [E1, mix(0.95), mix(0.90), mix(0.85), E2, E2, E3, E4, [0, 0, 0.8, 0.6], E2, E4, mix(0.6)]


def make_shapes(root: Path, table: dict, size: int = 32) -> None:
    import random

    from isearle.shapes.world import random_scene, render_dict

    rng = random.Random(0)
    gallery = {}
    for i, f in enumerate(SHAPES_FEATURES):
        spec = random_scene(rng).to_dict()
        gallery[f"{i:06d}"] = spec
        table[digest(render_dict(spec, size))] = f
    assert len({digest(render_dict(s, size)) for s in gallery.values()}) == len(gallery)
    g = lambda i: f"{i:06d}"  # noqa: E731

    def q(qid, ref, target, gts, edit):
        return {"id": qid, "reference_img_id": g(ref), "target_img_id": g(target), "relative_caption": "is blue",
                "gt_img_ids": [g(x) for x in gts], "edit_type": edit, "shared_concept": "circle"}

    anns = [q(0, 0, 1, [1, 3, 5], "colour"), q(1, 6, 7, [7, 8], "shape"), q(2, 4, 9, [9, 5], "colour")]
    (root / "annotations").mkdir(parents=True)
    (root / "annotations" / "test.json").write_text(json.dumps(anns))
    (root / "annotations" / "val.json").write_text(json.dumps(anns[:2]))
    (root / "gallery.json").write_text(json.dumps(gallery))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("cir")
    table: dict = {}
    make_cirr(root / "CIRR", table)
    make_circo(root / "CIRCO", table)
    make_fashioniq(root / "fashionIQ_dataset", table)
    make_imagenet_r(root / "imgnet", table)
    make_shapes(root / "shapescir", table)
    return root, table


def run(data, benchmark: str, sub: str, split: str | None = None, **kw) -> dict:
    root, table = data
    out = evaluate(FakeBackbone(table), benchmark, split, "image", data=root / sub, cache_dir=None,
                   progress=False, **kw)
    assert format_table(out)
    return out


# ------------------------------------------------------------------------- loaders
def test_loaders_read_the_official_files(data):
    root, _ = data
    cirr = D.load_cirr(root / "CIRR", "val")
    assert len(cirr) == 4 and len(cirr.gallery) == 8
    assert cirr.queries[0].targets == ["dev-0-0-img1"] and len(cirr.queries[0].subset) == 6
    assert all(Path(cirr.images[g]).is_file() for g in cirr.gallery)
    test = D.load_cirr(root / "CIRR", "test")
    assert test.split == "test1" and not test.has_ground_truth
    circo = D.load_circo(root / "CIRCO", "val")
    assert circo.queries[0].targets[0] == "2" and len(circo.queries[0].targets) == 7
    assert circo.gallery == [str(i) for i in range(1, 15)] and circo.queries[0].groups == ["cardinality", "addition"]
    fiq = D.load_fashioniq(root / "fashionIQ_dataset", "dress")
    assert fiq.queries[0].caption == "is longer and has no sleeves"
    assert D.fashioniq_prompts(fiq.queries[0].captions) == ("is longer and has no sleeves", "has no sleeves and is longer")
    imr = D.load_imagenet_r(root / "imgnet")
    assert len(imr) == 8 and len(imr.gallery) == 14 and imr.queries[0].template == "a cartoon of $"
    assert imr.queries[0].targets == ["imagenet-r/n01/cartoon_0.jpg", "imagenet-r/n01/cartoon_1.jpg"]
    shapes = D.load_shapes(root / "shapescir", "test", size=32)
    assert len(shapes) == 3 and shapes.queries[1].groups == ["shape"]
    with pytest.raises(FileNotFoundError, match="cap.rc2.train.json"):
        D.load_cirr(root / "CIRR", "train")


def test_feature_cache_resumes_and_is_keyed_by_backbone(data, tmp_path):
    root, table = data
    bench = D.load_cirr(root / "CIRR", "val")
    ids = bench.image_ids()
    fake = FakeBackbone(table)
    cache = D.FeatureCache.for_backbone(tmp_path, fake, bench.cache_namespace)
    first = D.extract_features_cached(fake, ids[:3], bench.images, cache, batch_size=2, progress=False, flush_every=2)
    assert fake.encoded == 3 and len(list(cache.dir.glob("shard_*.safetensors"))) == 2
    again = D.FeatureCache.for_backbone(tmp_path, fake, bench.cache_namespace)  # a new process
    feats = D.extract_features_cached(fake, ids, bench.images, again, batch_size=4, progress=False)
    assert fake.encoded == 3 + len(ids) - 3  # only the missing images were encoded
    assert torch.equal(feats[:3], first) and torch.equal(feats[5], torch.tensor(CIRR_FEATURES[5]))
    other = D.FeatureCache(tmp_path, D.backbone_key("fake", "other-weights"), bench.cache_namespace)
    assert len(other) == 0


@pytest.mark.parametrize("part", ["weights", "precision", "decode", "preprocess", "random init"])
def test_each_part_of_the_feature_cache_key_misses_the_cache(data, tmp_path, part):
    """Features encoded with other weights, in another precision (an fp16 run read back by an fp32
    evaluation), decoded or preprocessed otherwise are never reused; random-init weights never cached."""
    root, table = data
    bench = D.load_cirr(root / "CIRR", "val")
    ids = bench.image_ids()
    fake = FakeBackbone(table)
    D.extract_features_cached(fake, ids, bench.images, D.FeatureCache.for_backbone(tmp_path, fake, bench.cache_namespace),
                              progress=False)
    same = D.FeatureCache.for_backbone(tmp_path, fake, bench.cache_namespace)
    assert len(same) == len(ids)  # the same settings hit
    kwargs = {}
    if part == "weights":
        fake.pretrained = "fake-weights-retrained"
    elif part == "precision":
        fake.precision = "bf16"
    elif part == "decode":
        kwargs["decode"] = "robust"
    elif part == "preprocess":
        kwargs["preprocess"] = "clip"
    else:
        fake.pretrained = None
    missed = D.FeatureCache.for_backbone(tmp_path, fake, bench.cache_namespace, **kwargs)
    assert len(missed) == 0
    if part == "random init":
        assert missed.dir is None  # memory only


# ----------------------------------------------------------------- metrics by hand
def test_cirr_by_hand(data, tmp_path):
    out = run(data, "cirr", "CIRR", submission_dir=tmp_path)
    # target ranks with the reference removed: 1, 2, 6 (tie at 1/sqrt5 and a block of zeros), 7
    assert {k: out[k] for k in ("R@1", "R@5", "R@10", "R@50")} == {"R@1": 25.0, "R@5": 50.0, "R@10": 100.0,
                                                                    "R@50": 100.0}
    # subset ranks (img_set members minus the reference): 1, 1, 4, 5
    assert {k: out[k] for k in ("Rs@1", "Rs@2", "Rs@3")} == {"Rs@1": 50.0, "Rs@2": 50.0, "Rs@3": 50.0}
    sub = json.loads((tmp_path / "cirr_val_image_recall.json").read_text())
    assert sub["version"] == "rc2" and sub["metric"] == "recall"
    names = [f"dev-0-{i // 2}-img{i % 2}" for i in range(8)]
    assert sub["100"] == [names[i] for i in (1, 2, 4, 3, 5, 6, 7)]  # no reference; zeros in gallery order
    assert sub["102"] == [names[i] for i in (4, 2, 6, 0, 1, 5, 7)]
    subset = json.loads((tmp_path / "cirr_val_image_recall_subset.json").read_text())
    assert subset["metric"] == "recall_subset" and subset["102"] == [names[2], names[6], names[0]]
    # keeping the reference in the gallery: ranks 2, 3, 7, 8
    kept = run(data, "cirr", "CIRR", exclude_reference=False)
    assert (kept["R@1"], kept["R@5"], kept["R@10"]) == (0.0, 50.0, 100.0)


def test_cirr_test_split_writes_only_submissions(data, tmp_path):
    out = run(data, "cirr", "CIRR", "test", submission_dir=tmp_path)
    assert "R@1" not in out and not out["meta"]["ground_truth"]
    sub = json.loads((tmp_path / "cirr_test1_image_recall.json").read_text())
    assert set(sub) == {"version", "metric", "200", "201", "202", "203"}
    assert "test1-0-0-img0" not in sub["200"] and len(sub["200"]) == 3
    assert "no ground truth" in format_table(out)


def test_circo_by_hand(data, tmp_path):
    out = run(data, "circo", "CIRCO", submission_dir=tmp_path)
    # CIRCO keeps the reference (official script). Ground-truth ranks:
    #   q0: 2, 4, 5, 7, 9, 10, 11 (7 GTs: more than K=5)   q1: 2, 14 (tie with the reference)   q2: 10
    ap = {
        5: [(1 / 2 + 2 / 4 + 3 / 5) / 5, (1 / 2) / 2, 0.0],
        10: [(1 / 2 + 2 / 4 + 3 / 5 + 4 / 7 + 5 / 9 + 6 / 10) / 7, (1 / 2) / 2, 1 / 10],
        25: [(1 / 2 + 2 / 4 + 3 / 5 + 4 / 7 + 5 / 9 + 6 / 10 + 7 / 11) / 7, (1 / 2 + 2 / 14) / 2, 1 / 10],
    }
    ap[50] = ap[25]
    for k, v in ap.items():
        assert out[f"mAP@{k}"] == pytest.approx(100 * sum(v) / 3)
    assert out["R@5"] == pytest.approx(200 / 3) and out["R@10"] == 100.0  # first targets at 2, 2, 10
    assert out["per_aspect"]["cardinality"] == pytest.approx(100 * ap[10][0])
    assert out["per_aspect"]["addition"] == pytest.approx(100 * (ap[10][0] + ap[10][1]) / 2)
    assert out["per_aspect"]["viewpoint"] == pytest.approx(10.0)
    sub = json.loads((tmp_path / "circo_val_image.json").read_text())
    assert sub["0"][:3] == [1, 2, 3] and all(isinstance(x, int) for x in sub["0"])
    # with the reference removed every rank moves up by one
    ex = run(data, "circo", "CIRCO", exclude_reference=True)
    assert ex["mAP@5"] == pytest.approx(100 * ((1 + 2 / 3 + 3 / 4) / 5 + (1 / 1) / 2 + 0.0) / 3)


def test_fashioniq_by_hand(data):
    out = run(data, "fashioniq", "fashionIQ_dataset")
    # dress: ranks 12 (behind ten tied images) and 5 (tie block, gallery order); shirt: 2; toptee: 13
    assert out["per_category"] == {"dress": {"R@10": 50.0, "R@50": 100.0}, "shirt": {"R@10": 100.0, "R@50": 100.0},
                                   "toptee": {"R@10": 0.0, "R@50": 100.0}}
    assert out["R@10"] == pytest.approx(50.0) and out["R@50"] == 100.0
    assert out["meta"]["n_queries"] == 4 and out["meta"]["categories"] == ["dress", "shirt", "toptee"]


def test_imagenet_r_by_hand(data):
    out = run(data, "imagenet-r", "imgnet")
    per = out["per_domain"]
    assert per["cartoon"] == {"R@10": 0.0, "R@50": 50.0}  # q0: 0/2 in the top 10, 2/2 in the top 50; q1: none
    assert per["toy"] == {"R@10": 0.0, "R@50": 50.0}
    assert per["origami"] == {"R@10": 0.0, "R@50": 0.0}
    assert per["sculpture"]["R@10"] == pytest.approx(100 * (10 / 11) / 2) and per["sculpture"]["R@50"] == 50.0
    assert out["R@10"] == pytest.approx(100 * (10 / 11) / 2 / 4) and out["R@50"] == pytest.approx(37.5)


def test_shapes_by_hand(data):
    out = run(data, "shapes", "shapescir", "test")
    # reference removed; GT ranks q0: 1, 3, 6   q1 (target 7): 8, 1   q2 (target 9): 2, 1 (tie, gallery order)
    ap5 = [(1 + 2 / 3) / 3, 1 / 2, 1.0]
    ap10 = [(1 + 2 / 3 + 3 / 6) / 3, (1 + 2 / 8) / 2, 1.0]
    assert (out["R@1"], out["R@5"], out["R@10"], out["R@50"]) == (100.0, 100.0, 100.0, 100.0)
    assert out["R_first@1"] == pytest.approx(100 / 3) and out["R_first@5"] == pytest.approx(200 / 3)
    assert out["mAP@5"] == pytest.approx(100 * sum(ap5) / 3)
    for k in (10, 25, 50):
        assert out[f"mAP@{k}"] == pytest.approx(100 * sum(ap10) / 3)
    assert out["per_edit"] == {"colour": pytest.approx(100 * (ap10[0] + ap10[2]) / 2), "shape": pytest.approx(62.5)}
    assert run(data, "shapes", "shapescir", "test", limit=1)["meta"]["n_queries"] == 1


# ------------------------------------------------------------------- through the CLI
def test_cli_with_the_fake_backbone_writes_the_hand_values(data, tmp_path, monkeypatch, capsys):
    root, table = data
    monkeypatch.setattr(isearle.backbone, "load_backbone", lambda *a, **k: FakeBackbone(table))
    rc = cli_main(["eval", "--benchmark", "cirr", "--data", str(root / "CIRR"), "--method", "image",
                   "--json", str(tmp_path / "cirr.json"), "--no-cache", "--quiet", "--num-workers", "0"])
    assert rc == 0
    res = json.loads((tmp_path / "cirr.json").read_text())
    assert (res["R@1"], res["R@5"], res["Rs@1"]) == (25.0, 50.0, 50.0)
    assert res["meta"]["precision"] == "fp32"  # SEARLE's validate.py: comparable with the papers
    assert "R@1" in capsys.readouterr().out
    assert cli_main(["eval", "--benchmark", "cirr", "--data", str(root / "CIRR"), "--method", "image", "--precision",
                     "fp16", "--json", str(tmp_path / "fp16.json"), "--no-cache", "--quiet", "--num-workers", "0"]) == 0
    assert json.loads((tmp_path / "fp16.json").read_text())["meta"]["precision"] == "fp16"


@pytest.mark.parametrize("preset,gamma", [("searle", 0.0), ("isearle", 0.1)])
def test_eval_oti_follows_the_preset(data, tmp_path, preset, gamma):
    from isearle.concepts import TEMPLATES

    root, _ = data
    out = tmp_path / "oti.json"
    assert cli_main(["eval", "--benchmark", "cirr", "--data", str(root / "CIRR"), "--method", "oti", *TINY,
                     "--preset", preset, "--oti-steps", "1", "--limit", "1", "--no-cache", "--json", str(out)]) == 0
    oti = json.loads(out.read_text())["meta"]["oti"]
    assert (oti["gamma"], oti["max_norm"], oti["steps"]) == (gamma, 0.0, 1)
    assert oti["templates"] == [t.format(" $ ") for t in TEMPLATES]


@pytest.fixture(scope="module")
def tiny_phi(tmp_path_factory) -> Path:
    from isearle.phi import Phi, save_phi

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("phi") / "tiny-phi.safetensors"
    return save_phi(Phi.for_backbone(64, 48), path, {"backbone": "isearle-tiny-test", "pretrained": "none"})


TINY = ["--model", "isearle-tiny-test", "--pretrained", "none", "--quiet", "--batch-size", "16", "--num-workers", "0"]


@pytest.mark.parametrize("name,sub,method,extra", [
    ("cirr", "CIRR", "phi", []),
    ("cirr", "CIRR", "oti", ["--oti-steps", "2"]),
    ("cirr", "CIRR", "text", []),
    ("circo", "CIRCO", "image+text", []),
    ("circo", "CIRCO", "phi", ["--split", "test"]),
    ("fashioniq", "fashionIQ_dataset", "oti", ["--oti-steps", "2", "--categories", "dress", "shirt"]),
    ("imagenet-r", "imgnet", "phi", []),
    ("imagenet-r", "imgnet", "text", ["--domains", "toy", "sculpture"]),
    ("shapes", "shapescir", "phi", ["--split", "test", "--limit", "2"]),
])
def test_cli_end_to_end_with_the_tiny_model(data, tiny_phi, tmp_path, capsys, name, sub, method, extra):
    root, _ = data
    out = tmp_path / "result.json"
    argv = ["eval", "--benchmark", name, "--data", str(root / sub), "--method", method, *TINY,
            "--json", str(out), "--cache-dir", str(tmp_path / "cache"), "--submission", str(tmp_path / "sub"), *extra]
    if method == "phi":
        argv += ["--phi", str(tiny_phi)]
    assert cli_main(argv) == 0
    printed = capsys.readouterr().out
    res = json.loads(out.read_text())
    meta = res["meta"]
    assert meta["benchmark"] == name and meta["method"] == method and meta["backbone"] == "isearle-tiny-test"
    expected = {
        "cirr": ["R@1", "R@5", "R@10", "R@50", "Rs@1", "Rs@2", "Rs@3"],
        "circo": ["mAP@5", "mAP@10", "mAP@25", "mAP@50", "R@5", "R@10", "R@25", "R@50", "per_aspect"],
        "fashioniq": ["R@10", "R@50", "per_category"],
        "imagenet-r": ["R@10", "R@50", "per_domain"],
        "shapes": ["R@1", "R@5", "R@10", "R@50", "mAP@5", "mAP@10", "mAP@25", "mAP@50", "per_edit"],
    }[name]
    if meta["ground_truth"]:
        assert set(expected) <= set(res)
        for key in expected:
            values = res[key].values() if isinstance(res[key], dict) else [res[key]]
            flat = [x for v in values for x in (v.values() if isinstance(v, dict) else [v])]
            assert all(x is None or 0.0 <= x <= 100.0 for x in flat), (key, res[key])
        assert expected[0] in printed
    files = sorted(p.name for p in (tmp_path / "sub").glob("*.json")) if (tmp_path / "sub").is_dir() else []
    if name == "cirr":
        assert files == [f"cirr_val_{method}_recall.json", f"cirr_val_{method}_recall_subset.json"]
        rec = json.loads((tmp_path / "sub" / files[0]).read_text())
        assert rec["version"] == "rc2" and all(len(v) == 7 for k, v in rec.items() if k not in ("version", "metric"))
    if name == "circo":
        sub_file = tmp_path / "sub" / f"circo_{meta['split']}_{method.replace('+', '_')}.json"
        subm = json.loads(sub_file.read_text())
        assert len(subm) == meta["n_queries"] and all(len(v) == 14 for v in subm.values())
    if method == "oti":
        # random-init weights have no cache key: nothing of theirs is kept on disk
        assert meta["oti"]["steps"] == 2 and not any((tmp_path / "cache").rglob("shard_*.safetensors"))


def test_train_phi_validates_on_cirr_val_and_keeps_the_best(data, tmp_path, capsys):
    from isearle.backbone import load_backbone
    from isearle.phi import load_phi

    root, _ = data
    images = tmp_path / "images"
    images.mkdir()
    for i, colour in enumerate(["red", "green", "blue", "yellow"]):
        Image.new("RGB", (32, 32 + i), colour).save(images / f"{colour}.png")
    model = ["--model", "isearle-tiny-test", "--pretrained", "none", "--device", "cpu"]
    assert cli_main(["oti", *model, "--images", str(images), "--vocabulary", "imagenet", "--steps", "2",
                     "--batch-size", "4", "--out", str(tmp_path / "oti")]) == 0
    out = tmp_path / "phi.safetensors"
    assert cli_main(["train-phi", *model, "--oti", str(tmp_path / "oti"), "--epochs", "3", "--batch-size", "2",
                     "--lr", "1e-2", "--val-every", "1", "--val-benchmark", "cirr", "--val-data", str(root / "CIRR"),
                     "--out", str(out)]) == 0
    from isearle.phi import phi_settings

    meta = phi_settings(out)
    last = out.with_name("phi.last.safetensors")
    assert last.is_file() and len(meta["val"]) == 3
    assert meta["best_val"] == max(meta["val"]) and meta["val"][meta["best_epoch"] - 1] == meta["best_val"]
    tiny = load_backbone("isearle-tiny-test", None, device="cpu")
    again = evaluate(tiny, "cirr", "val", "phi", load_phi(out), data=root / "CIRR", cache_dir=None, progress=False)
    assert again["R@1"] == meta["best_val"]  # the metric logged is the saved phi's
    assert "best validation" in capsys.readouterr().out


# ----------------------------------------------------------- gallery normalisation, CIRCO recall
def _scaled(table: dict) -> dict:
    """The same directions with norms from 0.2 to 5: ranking must not see the norms."""
    return {k: [x * (0.2 + 4.8 * (int(k[:4], 16) % 97) / 96) for x in v] for k, v in table.items()}


@pytest.mark.parametrize("bench,sub,split", [("cirr", "CIRR", None), ("circo", "CIRCO", None),
                                                 ("fashioniq", "fashionIQ_dataset", None),
                                                 ("imagenet-r", "imgnet", None), ("shapes", "shapescir", "test")])
def test_gallery_features_that_are_not_unit_norm_are_normalised(data, bench, sub, split):
    root, table = data
    scaled = _scaled(table)
    norms = [math.hypot(*v) for v in scaled.values()]
    assert max(norms) > 3 * min(norms)  # the fixture's features really are of many norms
    unit = evaluate(FakeBackbone(table), bench, split, "image", data=root / sub, cache_dir=None, progress=False)
    other = evaluate(FakeBackbone(scaled), bench, split, "image", data=root / sub, cache_dir=None, progress=False)
    flat = lambda r: {f"{k}/{j}": x for k, v in r.items() if k not in ("meta", "submissions")  # noqa: E731
                      for j, x in (_leaves(v) if isinstance(v, dict) else [("", v)])}
    assert len(flat(unit)) > 3 and flat(other) == pytest.approx(flat(unit), nan_ok=True)


def _leaves(d: dict, prefix: str = "") -> list[tuple[str, float]]:
    return [kv for k, v in d.items()
            for kv in (_leaves(v, f"{prefix}{k}/") if isinstance(v, dict) else [(f"{prefix}{k}", v)])]


def test_circo_recall_counts_the_annotated_target_only_at_every_k(data, tmp_path):
    root, table = data
    circo = tmp_path / "CIRCO"
    import shutil

    shutil.copytree(root / "CIRCO", circo)
    val = json.loads((circo / "annotations" / "val.json").read_text())
    val[0]["target_img_id"] = 11  # ground truths 2, 4, 5, ... rank before it: rank 11
    (circo / "annotations" / "val.json").write_text(json.dumps(val))
    out = evaluate(FakeBackbone(table), "circo", None, "image", data=circo, cache_dir=None, progress=False)
    # target ranks: q0 11, q1 2, q2 10 (any ground truth would give q0 rank 2)
    assert {k: out[f"R@{k}"] for k in (5, 10, 25, 50)} == pytest.approx({5: 100 / 3, 10: 200 / 3, 25: 100.0, 50: 100.0})


# ------------------------------------------- every benchmark x method against a reference written here
def _reference_queries(tiny, bench, method, feats, tokens):
    """Query features written from SPEC.md's protocol, independently of `compose_benchmark_queries`."""
    from isearle.pseudo_word import encode_with_pseudo_tokens

    out = []
    for q in bench.queries:
        ref = feats[q.reference]
        if q.captions:  # FashionIQ: both orders, stripped of ". ?,"
            c = [x.strip(".?, ") for x in q.captions]
            texts = [f"{c[0]} and {c[1]}", f"{c[1]} and {c[0]}"]
        else:
            texts = [q.caption]
        total = torch.zeros(tiny.embed_dim)
        for text in texts:
            if method == "image":
                f = F.normalize(ref, dim=-1)
            elif method in ("text", "image+text"):
                plain = text or " ".join(q.template.replace("$", " ").split())
                f = F.normalize(tiny.encode_texts([plain])[0], dim=-1)
                if method == "image+text":
                    f = F.normalize(f + F.normalize(ref, dim=-1), dim=-1)
            else:
                prompt = q.template if q.template else f"a photo of $ that {text}"
                f = F.normalize(encode_with_pseudo_tokens(tiny, [prompt], tokens[q.reference][None])[0], dim=-1)
            total = total + f
        out.append(F.normalize(total, dim=-1))
    return torch.stack(out)


def _reference_metrics(name, benches, queries_per_bench, gallery_feats):
    """Stable ranking by cosine to the L2-normalised gallery, then each benchmark's metrics by loops."""
    exclude = name in ("cirr", "shapes")
    per = []
    for bench, queries in zip(benches, queries_per_bench, strict=True):
        gallery = F.normalize(torch.stack([gallery_feats[g] for g in bench.gallery]), dim=-1)
        rows = []
        for q, query in zip(bench.queries, queries, strict=True):
            sims = gallery @ query
            order = [bench.gallery[i] for i in torch.argsort(-sims, stable=True).tolist()]
            if exclude:
                order = [g for g in order if g != q.reference]
            rank = {g: i + 1 for i, g in enumerate(order)}
            gts = list(dict.fromkeys(q.targets))
            row = {"first": rank.get(gts[0], 10**9) if gts else 10**9, "any": min(rank.get(g, 10**9) for g in gts)
                   if gts else 10**9}
            for k in (5, 10, 25, 50):
                hits = [1 if order[i] in gts else 0 for i in range(min(k, len(order)))]
                precisions = sum(sum(hits[: i + 1]) / (i + 1) * h for i, h in enumerate(hits))
                row[f"ap{k}"] = precisions / min(len(gts), k) if gts else 0.0
                row[f"found{k}"] = sum(hits) / len(gts) if gts else 0.0
            if q.subset is not None:
                members = [g for g in order if g in q.subset and g != q.reference]
                row["subset"] = members.index(gts[0]) + 1
            rows.append(row)
        per.append(rows)
    mean = lambda xs: 100.0 * sum(xs) / len(xs)  # noqa: E731
    rows = per[0]
    if name == "cirr":
        out = {f"R@{k}": mean([r["first"] <= k for r in rows]) for k in (1, 5, 10, 50)}
        out |= {f"Rs@{k}": mean([r["subset"] <= k for r in rows]) for k in (1, 2, 3)}
    elif name == "circo":
        out = {f"mAP@{k}": mean([r[f"ap{k}"] for r in rows]) for k in (5, 10, 25, 50)}
        out |= {f"R@{k}": mean([r["first"] <= k for r in rows]) for k in (5, 10, 25, 50)}
    elif name == "shapes":
        out = {f"R@{k}": mean([r["any"] <= k for r in rows]) for k in (1, 5, 10, 50)}
        out |= {f"mAP@{k}": mean([r[f"ap{k}"] for r in rows]) for k in (5, 10, 25, 50)}
    elif name == "fashioniq":
        out = {f"R@{k}": sum(mean([r["first"] <= k for r in rs]) for rs in per) / len(per) for k in (10, 50)}
    else:  # imagenet-r: per domain, the fraction of the class's images in that domain found, then the mean
        doms: dict = {}
        for q, r in zip(benches[0].queries, rows, strict=True):
            doms.setdefault(q.groups[0], []).append(r)
        out = {f"R@{k}": sum(mean([r[f"found{k}"] for r in rs]) for rs in doms.values()) / len(doms) for k in (10, 50)}
    return out


@pytest.mark.parametrize("method", ["image", "text", "image+text", "oti", "phi"])
@pytest.mark.parametrize("name,sub,split", [("cirr", "CIRR", "val"), ("circo", "CIRCO", "val"),
                                            ("fashioniq", "fashionIQ_dataset", "val"),
                                            ("imagenet-r", "imgnet", "val"), ("shapes", "shapescir", "test")])
def test_every_benchmark_and_method_equals_the_reference(data, tiny, tmp_path, monkeypatch, name, sub, split, method):
    import isearle.evaluation as E
    from isearle.phi import Phi

    root, _ = data
    torch.manual_seed(0)
    phi = Phi.for_backbone(tiny.embed_dim, tiny.token_width).eval()
    benches = D.load_benchmarks(name, root / sub, split, image_size=tiny.image_size)
    ids = list(dict.fromkeys(i for b in benches for i in b.image_ids()))
    images = {k: v for b in benches for k, v in b.images.items()}
    cache = D.FeatureCache.for_backbone(tmp_path, tiny, "reference")
    feats = dict(zip(ids, D.extract_features_cached(tiny, ids, images, cache, 8, 0, False), strict=True))
    gen = torch.Generator().manual_seed(1)
    tokens = {i: torch.randn(tiny.token_width, generator=gen) for i in ids}  # stand-in OTI tokens
    if method == "oti":
        monkeypatch.setattr(E, "oti_tokens", lambda backbone, refs, *a, **k: torch.stack([tokens[r] for r in refs]))
    if method == "phi":
        with torch.no_grad():
            tokens = {i: phi(f[None])[0] for i, f in feats.items()}
    out = evaluate(tiny, name, split, method, phi if method == "phi" else None, data=root / sub, cache_dir=None,
                   progress=False)
    with torch.no_grad():
        queries = [_reference_queries(tiny, b, method, feats, tokens) for b in benches]
    expected = _reference_metrics(name, benches, queries, feats)
    assert {k: out[k] for k in expected} == pytest.approx(expected)
    for bench, want in zip(benches, queries, strict=True):  # the query features themselves, not only the ranks
        refs = list(dict.fromkeys(q.reference for q in bench.queries))
        got = E.compose_benchmark_queries(
            tiny, bench, method, torch.stack([feats[r] for r in refs]), {r: j for j, r in enumerate(refs)},
            phi=phi, pseudo_tokens=torch.stack([tokens[r] for r in refs]), progress=False)
        assert float((got - want).abs().max()) <= 1e-5


@pytest.mark.parametrize("part", ["none", "steps", "templates", "precision", "decode", "features precision",
                                  "weights"])
def test_each_part_of_the_oti_cache_key_misses_the_cache(tiny_file, tmp_path, part):
    """The evaluation's OTI tokens are reused only when the weights, every OTI setting (templates and
    the precision OTI runs in included) and the way the reference features were made all match."""
    import dataclasses

    from isearle.evaluation import oti_tokens
    from isearle.oti import OTIConfig

    feats = torch.randn(2, tiny_file.embed_dim, generator=torch.Generator().manual_seed(0))
    config = OTIConfig(steps=1, gamma=0.0)
    kwargs = {"cache_root": tmp_path, "namespace": "bench", "progress": False}
    first = oti_tokens(tiny_file, ["a", "b"], feats, config, **kwargs)
    backbone = tiny_file
    if part == "steps":
        config = dataclasses.replace(config, steps=2)
    elif part == "templates":
        config = dataclasses.replace(config, templates=config.templates[:2])
    elif part == "precision":
        config = dataclasses.replace(config, precision="bf16")
    elif part == "decode":
        kwargs["decode"] = "robust"
    elif part == "features precision":
        kwargs["features_precision"] = "fp16"
    elif part == "weights":
        other = tmp_path / "retrained.pt"
        other.write_bytes(Path(tiny_file.pretrained).read_bytes() + b"\0")
        backbone = dataclasses.replace(tiny_file, pretrained=str(other))
    again = oti_tokens(backbone, ["a", "b"], feats, config, **kwargs)
    shards = {p.parent for p in (tmp_path / "oti").rglob("shard_*.safetensors")}
    if part == "none":  # the same settings: the cached run is read back, not inverted again
        assert len(shards) == 1 and torch.equal(again, first)
    else:
        assert len(shards) == 2


def test_unreadable_images_are_skipped_named_and_counted_up_to_a_threshold(data, tmp_path, monkeypatch, caplog):
    """As SEARLE's collate_fn, a run skips what it cannot read: an unreadable gallery image leaves the
    gallery, a query whose reference is unreadable is dropped; both are named in the log and in the
    result's meta. Above `MAX_UNREADABLE` (1 %) of the images the run fails with one line."""
    import shutil

    import isearle.images
    from isearle.images import UnreadableImages

    root, table = data
    copy = tmp_path / "CIRR"
    shutil.copytree(root / "CIRR", copy)
    names = [f"dev-0-{i // 2}-img{i % 2}" for i in range(8)]
    for i in (4, 6):  # 4: only in the gallery; 6: the reference of query 103
        (copy / "dev" / f"{names[i]}.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(UnreadableImages) as err:
        evaluate(FakeBackbone(table), "cirr", "val", "image", data=copy, cache_dir=None, progress=False)
    assert "2 of 8 images cannot be read" in str(err.value) and "\n" not in str(err.value)
    monkeypatch.setattr(isearle.images, "MAX_UNREADABLE", 0.3)
    with caplog.at_level("WARNING"):
        out = evaluate(FakeBackbone(table), "cirr", "val", "image", data=copy, cache_dir=tmp_path / "cache",
                       progress=False)
    assert "skipped 2 of 8 images that cannot be read" in caplog.text and names[6] in caplog.text
    meta = out["meta"]
    assert meta["unreadable"] == {"count": 2, "images": [names[4], names[6]], "queries_dropped": 1}
    assert meta["n_queries"] == 3 and meta["gallery_size"] == 6
    cached = D.FeatureCache.for_backbone(tmp_path / "cache" / "features", FakeBackbone(table),
                                         D.load_cirr(copy, "val").cache_namespace)
    assert len(cached) == 6  # what could not be read is not cached: a repaired file is read next time


def test_eval_oti_encodes_its_references_in_otis_precision(data, tiny, monkeypatch):
    """SEARLE's oti_inversion.py encodes the images it inverts under OTI's autocast: when OTI runs in
    another precision than the evaluation, the reference features are encoded again in OTI's."""
    import isearle.evaluation as E
    from isearle.oti import OTIConfig

    root, _ = data
    seen: list[tuple[str, int]] = []
    extract = E.extract_features_cached

    def spy(backbone, ids, *args, **kwargs):
        seen.append((backbone.precision, len(ids)))
        return extract(backbone, ids, *args, **kwargs)

    monkeypatch.setattr(E, "extract_features_cached", spy)
    out = evaluate(tiny, "cirr", "val", "oti", data=root / "CIRR", cache_dir=None, progress=False,
                   oti=OTIConfig(steps=1, precision="bf16"))
    assert seen == [("fp32", 8), ("bf16", 4)]  # every image in fp32, then the 4 references in bf16
    assert out["meta"]["precision"] == "fp32" and out["meta"]["oti"]["precision"] == "bf16"
    seen.clear()
    evaluate(tiny, "cirr", "val", "oti", data=root / "CIRR", cache_dir=None, progress=False, oti=OTIConfig(steps=1))
    assert seen == [("fp32", 8)]  # the same precision: the features are reused
