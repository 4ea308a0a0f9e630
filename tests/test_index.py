"""GalleryIndex: exact and approximate search, incremental adds, memory-mapped storage, building from images."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from isearle.index import BackboneMismatch, GalleryIndex, IndexConfig
from isearle.indexing import build_gallery_index


def unit(n: int, d: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def exact_top(x: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-(q @ x.T), axis=1, kind="stable")[:, :k]


INFO = {"model": "isearle-tiny-test", "pretrained": None}


def test_flat_is_exact_with_ids_metadata_and_exclusion():
    x, q = unit(500, 32), unit(7, 32, seed=1)
    ids = [f"img{i}" for i in range(500)]
    index = GalleryIndex.build(x, ids, [{"path": f"/g/{i}.jpg"} for i in range(500)], IndexConfig(kind="flat"), INFO)
    assert index.kind == "flat" and len(index) == 500 and "img3" in index
    hits = index.search(q, 10)
    expected = exact_top(x, q, 10)
    assert [[i for i, _ in row] for row in hits] == [[ids[j] for j in row] for row in expected]
    scores = np.array([[s for _, s in row] for row in hits])
    assert np.allclose(scores, np.take_along_axis(q @ x.T, expected, axis=1), atol=1e-5)
    # One query as [D] (a torch tensor, not normalised: cosine all the same), the best hit excluded.
    best = hits[0][0][0]
    one = index.search(torch.from_numpy(q[0] * 3), 10, exclude_ids=[best, "not-there"])[0]
    assert [i for i, _ in one] == [i for i, _ in hits[0][1:]] + [ids[exact_top(x, q[:1], 11)[0, 10]]]
    assert index.metadata["img3"] == {"path": "/g/3.jpg"}
    assert len(index.search(q[0], 1000)[0]) == 500


def test_incremental_adds_equal_one_build_and_refuse_duplicates():
    x = unit(300, 16)
    ids = [str(i) for i in range(300)]
    whole = GalleryIndex.build(x, ids, None, IndexConfig(kind="flat"), INFO)
    parts = GalleryIndex(16, IndexConfig(kind="flat"), INFO)
    for s in range(0, 300, 70):
        parts.add(x[s : s + 70], ids[s : s + 70], {i: {"n": int(i)} for i in ids[s : s + 70]})
    assert parts.ids == whole.ids and parts.metadata["42"] == {"n": 42}
    assert np.array_equal(parts.vectors(), whole.vectors())
    with pytest.raises(ValueError, match="already in the index"):
        parts.add(x[:1], ["5"])
    with pytest.raises(ValueError, match="does not match"):
        parts.add(unit(1, 8), ["new"])


def test_auto_switches_to_hnsw_above_the_threshold_and_keeps_recall():
    x, q = unit(3000, 32), unit(50, 32, seed=1)
    ids = [f"v{i}" for i in range(3000)]
    index = GalleryIndex(32, IndexConfig(kind="auto", flat_threshold=1000, hnsw_ef_search=64), INFO)
    index.add(x[:1000], ids[:1000])
    assert index.kind == "flat"
    index.add(x[1000:], ids[1000:])
    assert index.kind == "hnsw" and len(index) == 3000
    got = [{i for i, _ in row} for row in index.search(q, 10)]
    want = [{ids[j] for j in row} for row in exact_top(x, q, 10)]
    recall = np.mean([len(g & w) / 10 for g, w in zip(got, want, strict=True)])
    assert recall > 0.9
    assert index.search(x[2500], 1)[0][0][0] == "v2500"


def test_ivfpq_with_refine():
    x, q = unit(4000, 32), unit(30, 32, seed=1)
    ids = [str(i) for i in range(4000)]
    index = GalleryIndex.build(x, ids, None, IndexConfig(kind="ivfpq", pq_m=8, ivf_nprobe=40, refine="Flat", refine_k_factor=8), INFO)
    assert index.kind == "ivfpq"
    got = [{i for i, _ in row} for row in index.search(q, 10)]
    want = [{ids[j] for j in row} for row in exact_top(x, q, 10)]
    assert np.mean([len(g & w) / 10 for g, w in zip(got, want, strict=True)]) > 0.7
    index.add(unit(10, 32, seed=5), [f"new{i}" for i in range(10)])
    assert len(index) == 4010
    with pytest.raises(ValueError, match="at least 256"):
        GalleryIndex.build(x[:100], ids[:100], None, IndexConfig(kind="ivfpq", pq_m=8))


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_save_mmap_load_add_and_resave(tmp_path, kind):
    x, q = unit(400, 24), unit(5, 24, seed=1)
    ids = [f"i{i}" for i in range(400)]
    meta = [{"path": f"{i}.png", "scene": {"shapes": [{"kind": "circle", "color": "red"}]}} for i in range(400)]
    index = GalleryIndex.build(x[:300], ids[:300], meta[:300], IndexConfig(kind=kind), INFO)
    index.save(tmp_path)
    assert json.loads((tmp_path / "index.json").read_text())["info"]["model"] == "isearle-tiny-test"
    loaded = GalleryIndex.load(tmp_path, mmap=True)
    assert loaded.kind == kind and loaded.ids == index.ids and loaded.metadata == index.metadata
    assert loaded.search(q, 7) == index.search(q, 7)
    # Adding to a memory-mapped index copies it first (FAISS would abort writing to the map)...
    loaded.add(x[300:], ids[300:], meta[300:])
    index.add(x[300:], ids[300:], meta[300:])
    assert loaded.search(q, 7) == index.search(q, 7)
    # ...and saving over the mapped files is safe for an index still reading them.
    reader = GalleryIndex.load(tmp_path, mmap=True)
    loaded.save(tmp_path)
    assert len(reader.search(q, 3)[0]) == 3
    again = GalleryIndex.load(tmp_path, mmap=False)
    assert len(again) == 400 and again.search(q, 7) == index.search(q, 7)


def test_expect_backbone(tmp_path):
    GalleryIndex.build(unit(10, 8), range(10), None, IndexConfig(kind="flat"),
                       {"model": "ViT-B-32-quickgelu", "pretrained": "openai"}).save(tmp_path)
    assert len(GalleryIndex.load(tmp_path, expect_backbone=("ViT-B-32", "openai"))) == 10
    assert len(GalleryIndex.load(tmp_path, expect_backbone="ViT-B-32-quickgelu")) == 10
    with pytest.raises(BackboneMismatch, match="ViT-B-32-quickgelu/openai"):
        GalleryIndex.load(tmp_path, expect_backbone=("ViT-L-14", "openai"))
    with pytest.raises(BackboneMismatch):
        GalleryIndex.load(tmp_path, expect_backbone=("ViT-B-32", None))


def test_build_gallery_index_from_paths_pil_and_callables(tiny, tmp_path):
    backbone = tiny
    rng = np.random.default_rng(0)
    folder = tmp_path / "images"
    folder.mkdir()
    triples = []
    for i in range(9):
        image = Image.fromarray(rng.integers(0, 256, (20 + i, 30, 3), dtype=np.uint8))
        if i % 3 == 0:
            image.save(folder / f"{i}.png")
            triples.append((f"p{i}", folder / f"{i}.png", None))
        elif i % 3 == 1:
            triples.append((f"m{i}", image, {"note": "in memory"}))
        else:
            triples.append((f"c{i}", lambda image=image: image, {"scene": {"seed": i}}))
    (folder / "bad.png").write_bytes(b"\x89PNG broken")
    triples.append(("bad", folder / "bad.png", None))
    index = build_gallery_index(backbone, triples, batch_size=4, num_workers=0, progress=False,
                                thumbnails=tmp_path / "gallery")
    assert index.ids == [t[0] for t in triples[:-1]] and index.info["skipped"] == ["bad"]
    assert index.info["model"] == "isearle-tiny-test" and index.dim == backbone.embed_dim
    assert index.metadata["p0"]["path"] == str(folder / "0.png")
    assert (tmp_path / "gallery" / index.metadata["c2"]["thumbnail"]).is_file()
    # The stored vectors are the normalised image features, and each image finds itself.
    feats = torch.nn.functional.normalize(backbone.encode_pil([Image.open(folder / "3.png").convert("RGB")]), dim=-1)
    assert np.allclose(index.vectors()[3], feats[0].numpy(), atol=1e-5)
    assert index.search(feats, 1)[0][0][0] == "p3"
    # DataLoader workers give the same index.
    workers = build_gallery_index(backbone, triples, batch_size=4, num_workers=2, progress=False)
    assert workers.ids == index.ids and np.array_equal(workers.vectors(), index.vectors())
    with pytest.raises(BackboneMismatch):
        build_gallery_index(backbone, triples[:1], index=GalleryIndex(backbone.embed_dim, info={"model": "other"}))


def test_cli_index_then_query_service(tmp_path):
    from isearle.cli import main
    from isearle.service import load_service

    folder = tmp_path / "images" / "sub"
    folder.mkdir(parents=True)
    for color in ["red", "green", "blue", "white"]:
        Image.new("RGB", (40, 30), color).save(folder / f"{color}.jpg")
    out = tmp_path / "gallery"
    args = ["index", "--images", str(tmp_path / "images"), "--model", "isearle-tiny-test", "--pretrained", "none",
            "--out", str(out), "--num-workers", "0", "--batch-size", "3"]
    torch.manual_seed(0)  # random init: the service must rebuild the same random model as `index`
    assert main(args) == 0
    before = (out / "index.faiss").read_bytes()
    assert main([*args, "--append"]) == 0  # the same ids again: all skipped, the saved index is unchanged
    assert (out / "index.faiss").read_bytes() == before and not (out / ".index-progress").exists()
    torch.manual_seed(0)
    service = load_service(out)
    assert len(service.index) == 4 and service.index.ids[0] == "sub/blue.jpg"
    hits = service.retriever.query(Image.open(folder / "red.jpg"), "is blue", k=2, method="image")
    assert hits[0].id == "sub/red.jpg" and hits[0].metadata["path"].endswith("red.jpg")
    hits = service.retriever.query(Image.open(folder / "red.jpg"), "is blue", k=3, method="image+text",
                                   exclude=["sub/red.jpg"])
    assert len(hits) == 3 and "sub/red.jpg" not in [h.id for h in hits]


def test_cli_index_shapes_keeps_scene_specs(tmp_path):
    from isearle.cli import main

    out = tmp_path / "shapes"
    assert main(["index", "--shapes", "5", "--model", "isearle-tiny-test", "--pretrained", "none",
                 "--out", str(out), "--num-workers", "0"]) == 0
    index = GalleryIndex.load(out, expect_backbone=("isearle-tiny-test", None))
    assert len(index) == 5
    assert all("objects" in index.metadata[i]["spec"] for i in index.ids)


def clustered(n: int, d: int, seed: int = 0, centres: int = 20) -> np.ndarray:
    """Points around random centres (like image features: neighbourhoods exist)."""
    rng = np.random.default_rng(seed)
    c = np.random.default_rng(99).standard_normal((centres, d)).astype(np.float32)
    x = c[rng.integers(0, centres, n)] + rng.standard_normal((n, d)).astype(np.float32) * 0.5
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_auto_picks_by_size_flat_then_hnsw_then_ivfsq(tmp_path):
    """kind auto: flat up to flat_threshold, the approximate kind up to large_threshold, IVF-SQ8 above
    (one byte per dimension: the file shrinks below the vectors' fp32 size), recall kept, reloadable."""
    x, q = clustered(6000, 32), clustered(40, 32, seed=1)
    ids = [f"v{i}" for i in range(6000)]
    cfg = IndexConfig(kind="auto", flat_threshold=1000, large_threshold=3000, ivf_nprobe=16)
    assert [cfg.auto_kind(n) for n in (1000, 1001, 3000, 3001)] == ["flat", "hnsw", "hnsw", "ivfsq"]
    index = GalleryIndex(32, cfg, INFO)
    kinds = []
    for s in range(0, 6000, 1000):
        index.add(x[s : s + 1000], ids[s : s + 1000])
        kinds.append(index.kind)
    assert kinds == ["flat", "hnsw", "hnsw", "ivfsq", "ivfsq", "ivfsq"] and len(index) == 6000
    got = [{i for i, _ in row} for row in index.search(q, 10)]
    want = [{ids[j] for j in row} for row in exact_top(x, q, 10)]
    assert np.mean([len(g & w) / 10 for g, w in zip(got, want, strict=True)]) >= 0.95
    index.save(tmp_path)
    assert (tmp_path / "index.faiss").stat().st_size < 6000 * 32 * 4 * 0.5  # SQ8 codes, not fp32 vectors
    loaded = GalleryIndex.load(tmp_path)
    assert loaded.kind == "ivfsq" and loaded.search(q, 10) == index.search(q, 10)


def test_draft_decoding_and_bf16_encoding_stay_close_to_the_plain_gallery(tiny, tmp_path):
    """build_gallery_index(draft=True) with a bf16 backbone: JPEG files decoded at reduced size,
    encoded in bf16; the gallery vectors stay within cosine 0.99 of the plain fp32 ones."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:480, 0:640].astype(np.float32)
    items = []
    for i in range(4):
        base = np.stack([np.sin(xx / (30 + 10 * i)), np.cos(yy / 40), np.sin((xx + yy) / 70)], -1)
        pixels = np.clip(127 + 100 * base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(tmp_path / f"{i}.jpg", quality=90)
        items.append((str(i), tmp_path / f"{i}.jpg", {}))
    plain = build_gallery_index(tiny, items, 4, progress=False).vectors()
    fast = build_gallery_index(tiny.with_precision("bf16"), items, 4, progress=False, draft=True).vectors()
    cos = (plain * fast).sum(1)
    assert cos.min() > 0.99 and np.abs(plain - fast).max() > 1e-4, cos  # close, and not the same path


def test_faiss_threads_follow_the_batch_and_leave_torch_alone():
    """One FAISS thread for a few query rows, torch's count for a batch; torch's count is kept."""
    import faiss

    from isearle.runtime import faiss_threads

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with faiss_threads(1):
            assert faiss.omp_get_max_threads() == 1
        with faiss_threads(64):
            assert faiss.omp_get_max_threads() == 2
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
