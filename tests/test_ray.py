"""The Ray Data paths (local 2-worker Ray) give exactly the single-process results."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from PIL import Image

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("ray") is None, reason='ray is not installed: pip install "ray[data]"'
)


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray with 2 CPU workers for the module (started once: it takes seconds)."""
    import ray

    from isearle.scale import init_ray

    started = init_ray(num_cpus=2)
    yield
    if started:
        ray.shutdown()


@pytest.fixture
def one_thread():
    """The single-process reference with 1 torch thread, like each Ray actor (threads=1): CPU
    kernels split some reductions by thread count, and the comparison here is bit for bit."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def backbone(tiny):
    return tiny  # random init: the actors get its weights through the object store


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """11 small PNGs (not a multiple of the batch sizes, so the last batches are short)."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    paths = []
    for i in range(11):
        pixels = rng.integers(0, 256, size=(24 + i, 40, 3), dtype=np.uint8)
        path = folder / f"img{i:02d}.png"
        Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths


class StubConcepts:
    """Duck-typed concept bank: two concepts per image, chosen from the feature's sign."""

    def top_names(self, features: torch.Tensor, k: int) -> list[list[str]]:
        return [["circle", "square"] if float(f[0]) > 0 else ["square", "circle"] for f in features]


PHRASES = {"circle": ["a photo of circle that is red", "a photo of circle that is large"],
           "square": ["a photo of square that is blue", "a photo of square that is small"]}


def test_ray_oti_equals_single_process(local_ray, one_thread, backbone, images, tmp_path):
    from isearle.oti import OTIConfig
    from isearle.oti_runs import invert_images
    from isearle.scale import ray_oti

    ids = [p.stem for p in images]
    config = OTIConfig(steps=4, batch_size=4, seed=3)
    phi = torch.nn.Linear(backbone.embed_dim, backbone.token_width)
    args = (StubConcepts(), PHRASES, phi)
    ids1, tok1 = invert_images(backbone, ids, images, tmp_path / "single", config, *args, batch_size=5,
                               progress=False)
    ids2, tok2 = ray_oti(backbone, ids, images, tmp_path / "ray", config, *args, batch_size=5,
                         num_workers=2, progress=False)
    assert ids1 == ids2 == ids
    assert torch.equal(tok1, tok2)
    from safetensors.torch import load_file

    f1 = load_file(str(tmp_path / "single" / "features.safetensors"))["features"]
    f2 = load_file(str(tmp_path / "ray" / "features.safetensors"))["features"]
    assert torch.equal(f1, f2)
    assert (tmp_path / "single" / "concepts.json").read_text() == (tmp_path / "ray" / "concepts.json").read_text()
    # Resuming a finished run recomputes nothing and returns the same tokens.
    ids3, tok3 = ray_oti(backbone, ids, images, tmp_path / "ray", config, *args, batch_size=5,
                         num_workers=2, progress=False)
    assert ids3 == ids and torch.equal(tok3, tok1)


def test_ray_index_equals_single_process(local_ray, one_thread, backbone, images, tmp_path):
    from isearle.index import IndexConfig
    from isearle.indexing import build_gallery_index
    from isearle.scale import ray_build_gallery_index

    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    scene = Image.new("RGB", (30, 20), "red")
    triples = [(p.stem, p, {"n": i}) for i, p in enumerate(images)]
    triples += [("broken", broken, None), ("scene", lambda: scene, {"scene": {"shape": "circle"}})]
    config = IndexConfig(kind="flat")
    single = build_gallery_index(backbone, triples, batch_size=4, progress=False, config=config,
                                 thumbnails=tmp_path / "a")
    ray_index = ray_build_gallery_index(backbone, triples, batch_size=4, config=config, num_workers=2,
                                        thumbnails=tmp_path / "b", progress=False)
    assert single.ids == ray_index.ids and "broken" not in single.ids
    assert single.metadata == ray_index.metadata
    assert np.array_equal(single.vectors(), ray_index.vectors())
    assert single.info == ray_index.info and single.info["skipped"] == ["broken"]
    assert (tmp_path / "b" / single.metadata["scene"]["thumbnail"]).is_file()
    q = single.vectors()[:3]
    assert single.search(q, 5) == ray_index.search(q, 5)
