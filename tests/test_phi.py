"""phi: SEARLE architecture, distillation training, NT-Xent, token penalty, checkpoints (ours and official)."""

import json
import math
import os
import time

import numpy as np
import pytest
import torch

import isearle.paths
import isearle.phi
from isearle.artifacts import ArtifactError
from isearle.backbone import WeightsUnavailable
from isearle.oti import OTIConfig
from isearle.phi import (
    Phi,
    PhiConfig,
    load_official_searle,
    load_phi,
    official_checkpoint,
    resolve_phi,
    save_phi,
)
from isearle.phi_training import PhiTrainConfig, nt_xent, similar_batches, token_penalty, train_phi

B32_SHAPES = {"layers.0.weight": (2048, 512), "layers.0.bias": (2048,), "layers.3.weight": (2048, 2048),
              "layers.3.bias": (2048,), "layers.6.weight": (512, 2048), "layers.6.bias": (512,)}


# ------------------------------------------------------------------------------- architecture
def test_phi_architecture_matches_searle_b32():
    phi = Phi.for_backbone(512, 512)
    state = phi.state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == B32_SHAPES
    kinds = [type(m).__name__ for m in phi.layers]
    assert kinds == ["Linear", "GELU", "Dropout", "Linear", "GELU", "Dropout", "Linear"]
    assert phi.layers[2].p == 0.5 and phi.layers[5].p == 0.5


def test_phi_l14_and_tiny_sizes(tiny):
    l14 = Phi.for_backbone(768, 768).state_dict()
    assert tuple(l14["layers.0.weight"].shape) == (3072, 768)
    assert tuple(l14["layers.3.weight"].shape) == (3072, 3072)
    assert tuple(l14["layers.6.weight"].shape) == (768, 3072)
    phi = Phi.for_backbone(tiny.embed_dim, tiny.token_width).eval()
    out = phi(torch.randn(3, tiny.embed_dim))
    assert out.shape == (3, tiny.token_width) == (3, 48)


# ---------------------------------------------------------------------------------- NT-Xent
def test_nt_xent_hand_computed_2x2():
    eye = torch.eye(2)
    swapped = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    # aligned: each row sees its pair at cos 1 (logit 4) and two negatives at cos 0 (logit 0)
    assert nt_xent(eye, eye, 0.25).item() == pytest.approx(math.log(1 + 2 * math.exp(-4)), abs=1e-6)
    # swapped: the pair is at cos 0, one negative at cos 1
    assert nt_xent(eye, swapped, 0.25).item() == pytest.approx(math.log(2 + math.exp(4)), abs=1e-5)
    # scale does not matter (both sides are L2-normalised)
    assert nt_xent(3 * eye, 0.5 * eye, 0.25).item() == pytest.approx(math.log(1 + 2 * math.exp(-4)), abs=1e-6)


def test_nt_xent_general_2x2_against_explicit_formula():
    pred = torch.tensor([[1.0, 2.0], [-1.0, 0.5]])
    target = torch.tensor([[2.0, 1.0], [0.3, -1.0]])
    t = 0.25
    z = [v / v.norm() for v in (*pred, *target)]
    pair = {0: 2, 1: 3, 2: 0, 3: 1}
    losses = []
    for i in range(4):
        logits = {j: float(z[i] @ z[j]) / t for j in range(4) if j != i}
        losses.append(-logits[pair[i]] + math.log(sum(math.exp(v) for v in logits.values())))
    assert nt_xent(pred, target, t).item() == pytest.approx(sum(losses) / 4, abs=1e-5)


def test_nt_xent_is_lowest_for_aligned_pairs():
    gen = torch.Generator().manual_seed(0)
    target = torch.randn(6, 16, generator=gen)
    aligned = nt_xent(target, target).item()
    for scale in (0.1, 0.5, 1.0, 3.0):
        noisy = target + scale * torch.randn(6, 16, generator=gen)
        assert nt_xent(noisy, target).item() > aligned
    shuffled = target[torch.tensor([1, 2, 3, 4, 5, 0])]
    assert nt_xent(shuffled, target).item() > aligned + 1.0


# ------------------------------------------------------------------------------ token penalty
def test_token_penalty_forms():
    gen = torch.Generator().manual_seed(0)
    vocab = torch.randn(100, 8, generator=gen)
    mean_norm = vocab.norm(dim=-1).mean()
    on_shell = torch.nn.functional.normalize(torch.randn(5, 8, generator=gen), dim=-1) * mean_norm
    assert token_penalty(on_shell, vocab, "norm").item() == pytest.approx(0.0, abs=1e-10)
    assert token_penalty(3 * on_shell, vocab, "norm").item() == pytest.approx(4.0, rel=1e-5)
    assert token_penalty(vocab[:5], vocab, "knn", k=1).item() == pytest.approx(0.0, abs=1e-6)
    assert token_penalty(vocab[:5], vocab, "knn", k=8).item() > 0
    assert token_penalty(on_shell, vocab, "none").item() == 0.0
    with pytest.raises(ValueError, match="reg_form"):
        token_penalty(on_shell, vocab, "l2")


# -------------------------------------------------------------------------------- batching
def test_similar_batches_hold_similar_images():
    gen = torch.Generator().manual_seed(0)
    centres = torch.randn(8, 16, generator=gen) * 10
    labels = torch.arange(128) % 8
    feats = centres[labels] + 0.1 * torch.randn(128, 16, generator=gen)
    unit = torch.nn.functional.normalize(feats, dim=-1)

    def within(batches) -> float:
        return float(np.mean([(unit[torch.as_tensor(b)] @ unit[torch.as_tensor(b)].T).mean() for b in batches]))

    for seed in range(3):
        batches = similar_batches(feats, 16, np.random.default_rng(seed))
        assert sorted(np.concatenate(batches).tolist()) == list(range(128))  # every image once
        assert all(len(b) <= 16 for b in batches)
        perm = np.random.default_rng(seed).permutation(128)
        assert within(batches) > within([perm[i : i + 16] for i in range(0, 128, 16)]) + 0.2
        purity = np.mean([np.bincount(labels[torch.as_tensor(b)].numpy()).max() / len(b) for b in batches])
        assert purity > 0.5  # random batches: about 0.3


# ---------------------------------------------------------------------------------- training
def _synthetic(tiny, n=64):
    """Learnable data: OTI tokens are a fixed random linear map of the image features."""
    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(n, tiny.embed_dim, generator=gen)
    proj = torch.randn(tiny.embed_dim, tiny.token_width, generator=gen) / 8
    return feats, feats @ proj


@pytest.mark.parametrize("reg_form", ["norm", "knn", "none"])
@pytest.mark.parametrize("hard_negatives", [True, False])
def test_train_phi_lowers_the_distillation_loss(tiny, hard_negatives, reg_form):
    feats, tokens = _synthetic(tiny)
    cfg = PhiTrainConfig(epochs=6, batch_size=16, lr=2e-3, hard_negatives=hard_negatives, reg_form=reg_form)
    phi, history = train_phi(tiny, feats, tokens, cfg, progress=False)
    assert len(history) == 6
    first, last = history[0]["distil"], history[-1]["distil"]
    assert last < 0.75 * first, (first, last)
    assert not phi.training
    if reg_form == "none":
        assert all(h["reg"] == 0.0 for h in history)
    else:
        assert history[0]["reg"] > 0
    if reg_form == "norm":
        assert history[-1]["reg"] < history[0]["reg"]  # the penalty pulls tokens to the vocabulary's norm
    with torch.no_grad():
        pred = phi(feats)
    assert pred.shape == tokens.shape
    # phi's tokens now identify their image's OTI token among the others better than chance
    sims = torch.nn.functional.normalize(pred, dim=-1) @ torch.nn.functional.normalize(tokens, dim=-1).T
    assert (sims.argmax(dim=1) == torch.arange(len(feats))).float().mean() > 0.5


def test_train_phi_with_gpt_loss(tiny):
    feats, tokens = _synthetic(tiny, 32)
    bank = {"dog": ["a photo of dog that is on the grass", "a photo of Dog that sleeps"],
            "cat": ["a photo of cat that is black"]}
    concepts = [["dog", "cat"] if i % 2 else ["cat"] for i in range(32)]
    cfg = PhiTrainConfig(epochs=3, batch_size=8, lr=1e-3)
    phi, history = train_phi(tiny, feats, tokens, cfg, concepts, bank, progress=False)
    assert all(h["gpt"] > 0 for h in history)
    assert all(math.isfinite(h["loss"]) for h in history)
    assert history[-1]["loss"] < history[0]["loss"]


def test_train_phi_is_seeded(tiny):
    feats, tokens = _synthetic(tiny, 32)
    cfg = PhiTrainConfig(epochs=2, batch_size=8, lr=1e-3)
    a, _ = train_phi(tiny, feats, tokens, cfg, progress=False)
    b, _ = train_phi(tiny, feats, tokens, cfg, progress=False)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)


# ------------------------------------------------------------------------------- checkpoints
def test_save_and_load_phi_round_trip(tiny, tmp_path):
    torch.manual_seed(0)
    phi = Phi.for_backbone(tiny.embed_dim, tiny.token_width).eval()
    path = save_phi(phi, tmp_path / "sub" / "phi.pt", {"backbone": tiny.name})
    assert path == tmp_path / "sub" / "phi.safetensors"
    assert path.is_file() and not path.with_suffix(".json").exists()  # one self-describing file
    assert path.read_bytes()[:1] != b"\x80"  # safetensors, not a pickle
    loaded = load_phi(path)
    assert loaded.config == phi.config
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    x = torch.randn(4, tiny.embed_dim)
    assert torch.equal(loaded(x), phi(x))
    from isearle.phi import phi_settings

    meta = phi_settings(path)
    assert meta["backbone"] == tiny.name and meta["phi"]["output_dim"] == tiny.token_width
    assert loaded.oti_settings == {}  # no record: SEARLE's OTI


def test_phi_carries_the_oti_settings_of_its_targets(tiny, tmp_path):
    """OTI warm-started from phi (demo, `isearle query`) reuses the cap/noise phi was distilled under."""
    phi = Phi.for_backbone(tiny.embed_dim, tiny.token_width)
    path = save_phi(phi, tmp_path / "phi.safetensors", {"oti": {"steps": 350, "gamma": 0.2, "max_norm": 2.0}})
    assert load_phi(path).oti_settings == {"gamma": 0.2, "max_norm": 2.0}


def test_official_checkpoint_layout_round_trips(tmp_path, monkeypatch):
    torch.manual_seed(0)
    phi = Phi(PhiConfig(512, 2048, 512)).eval()
    path = tmp_path / "SEARLE_ViT-B32.pt"
    torch.save({"epoch": 3, "Phi": phi.state_dict()}, path)
    loaded = load_official_searle(path)
    assert {k: tuple(v.shape) for k, v in loaded.state_dict().items()} == B32_SHAPES
    assert not loaded.training
    x = torch.randn(2, 512)
    assert torch.equal(loaded(x), phi(x))
    assert torch.equal(load_phi(path)(x), phi(x))  # an official .pt by path
    # by name, from the cache, with no network
    monkeypatch.setattr(isearle.paths, "CACHE_DIR", tmp_path)
    assert official_checkpoint("searle") == path
    assert torch.equal(load_phi("searle")(x), phi(x))


class _Payload:
    """A pickled object that would run code when unpickled."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_official_loader_refuses_pickled_objects(tmp_path):
    phi = Phi(PhiConfig(8, 32, 4))
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.pt"
    torch.save({"epoch": 3, "Phi": phi.state_dict(), "extra": _Payload(str(marker))}, path)
    with pytest.raises(ArtifactError, match="evil.pt is not a readable SEARLE checkpoint .*Weights only load failed"):
        load_official_searle(path)  # torch.load(weights_only=True) refused the pickled object: one line
    with pytest.raises(ArtifactError, match="evil.pt is not a readable SEARLE checkpoint"):
        load_phi(path)
    assert not marker.exists()


def test_official_checkpoint_offline_without_cache_fails_fast(tmp_path, monkeypatch):
    monkeypatch.setattr(isearle.paths, "CACHE_DIR", tmp_path / "empty")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(WeightsUnavailable, match="SEARLE_ViT-B32.pt"):
        official_checkpoint("searle")
    with pytest.raises(WeightsUnavailable, match="SEARLE_ViT-L14.pt"):
        load_phi("searle-xl")
    assert time.perf_counter() - start < 1.0
    assert not (tmp_path / "empty").exists()  # nothing downloaded, nothing created


def test_load_phi_missing_file(tmp_path):
    with pytest.raises(WeightsUnavailable, match="train-phi"):
        load_phi(tmp_path / "nope.safetensors")


def test_resolve_phi_named_default_and_missing(tiny, tmp_path, monkeypatch):
    """One default-phi rule: a named phi must load; a missing default only disables phi unless required."""
    import dataclasses

    phi = Phi.for_backbone(tiny.embed_dim, tiny.token_width)
    path = save_phi(phi, tmp_path / "phi.safetensors")
    got, name = resolve_phi(tiny, str(path))
    assert name == str(path)
    assert all(torch.equal(a, b) for a, b in zip(got.state_dict().values(), phi.state_dict().values(), strict=True))
    assert resolve_phi(tiny) == (None, None)  # random init: no default
    assert resolve_phi(tiny, phi)[0] is phi
    shapes = dataclasses.replace(tiny, name="isearle-shapes", pretrained="isearle-shapes")
    monkeypatch.setitem(isearle.phi.DEFAULT_PHI, ("isearle-shapes", "isearle-shapes"), str(tmp_path / "gone.safetensors"))
    assert resolve_phi(shapes) == (None, None)
    with pytest.raises(WeightsUnavailable):
        resolve_phi(shapes, required=True)
    with pytest.raises(WeightsUnavailable):
        resolve_phi(tiny, str(tmp_path / "gone.safetensors"))


def test_validation_keeps_the_best_and_the_last_epoch(tiny, tmp_path):
    from isearle.phi import load_phi
    from isearle.phi_training import Selection, last_path, save_trained

    feats, tokens = _synthetic(tiny, 32)
    scores = iter([1.0, 5.0, 3.0])
    seen: list[bool] = []

    def validate(phi):
        seen.append(phi.training)
        return next(scores)

    cfg = PhiTrainConfig(epochs=3, batch_size=8, lr=1e-3, val_every=1)
    selection = Selection()
    phi, history = train_phi(tiny, feats, tokens, cfg, validate=validate, selection=selection, progress=False)
    assert [h["val"] for h in history] == [1.0, 5.0, 3.0] and seen == [False] * 3  # phi validated in eval mode
    assert (selection.epoch, selection.metric) == (2, 5.0)
    paths = save_trained(phi, tmp_path / "phi.safetensors", {"backbone": tiny.name}, selection)
    assert paths == [tmp_path / "phi.safetensors", last_path(tmp_path / "phi.safetensors")]
    best, last = load_phi(paths[0]), load_phi(paths[1])
    two, _ = train_phi(tiny, feats, tokens, PhiTrainConfig(epochs=2, batch_size=8, lr=1e-3), progress=False)
    for key, value in two.state_dict().items():
        assert torch.equal(best.state_dict()[key], value), key  # the epoch-2 weights
        assert torch.equal(last.state_dict()[key], phi.state_dict()[key])
    from isearle.phi import phi_settings

    assert phi_settings(paths[0])["best_epoch"] == 2
    every_other = iter([2.0])
    _, history = train_phi(tiny, feats, tokens, PhiTrainConfig(epochs=2, batch_size=8, val_every=2),
                           validate=lambda phi: next(every_other), progress=False)
    assert "val" not in history[0] and history[1]["val"] == 2.0


# ---------------------------------------------------------------- every training option is used
def test_hard_negative_batches_are_the_ones_trained_on(tiny, monkeypatch):
    from isearle import phi_training

    gen = torch.Generator().manual_seed(0)
    centres = torch.randn(4, tiny.embed_dim, generator=gen) * 3
    labels = torch.arange(128) % 4
    feats = centres[labels] + 0.3 * torch.randn(128, tiny.embed_dim, generator=gen)
    tokens = torch.randn(128, tiny.token_width, generator=gen)
    seen: list[list[int]] = []
    step = phi_training.phi_step
    monkeypatch.setattr(phi_training, "phi_step", lambda *a, **k: (seen.append(list(a[4])), step(*a, **k))[1])

    def purity(hard: bool) -> float:
        seen.clear()
        train_phi(tiny, feats, tokens, PhiTrainConfig(epochs=1, batch_size=16, hard_negatives=hard), progress=False)
        return float(np.mean([np.bincount(labels[b].numpy()).max() / len(b) for b in seen]))

    assert purity(True) > 0.9 and purity(False) < 0.6


@pytest.mark.parametrize("lambda_gpt,lambda_reg", [(0.75, 0.1), (2.0, 0.0), (0.0, 1.5)])
def test_the_loss_weights_are_the_configured_ones(tiny, lambda_gpt, lambda_reg):
    feats, tokens = _synthetic(tiny, 16)
    bank = {"dog": ["a photo of dog that is on the grass"], "cat": ["a photo of cat that is black"]}
    concepts = [["dog", "cat"]] * 16
    cfg = PhiTrainConfig(epochs=1, batch_size=8, lambda_gpt=lambda_gpt, lambda_reg=lambda_reg, reg_form="norm")
    _, history = train_phi(tiny, feats, tokens, cfg, concepts, bank, progress=False)
    h = history[0]
    assert h["reg"] > 0 and (h["gpt"] > 0) == (lambda_gpt > 0)
    assert h["loss"] == pytest.approx(h["distil"] + lambda_gpt * h["gpt"] + lambda_reg * h["reg"], rel=1e-6)


def test_train_phi_options_reach_the_configuration(tiny, tmp_path):
    """Each `isearle train-phi` option lands in the recorded (= used) configuration."""
    from isearle.cli import main
    from isearle.oti_runs import invert_dataset

    ids = [f"i{k}" for k in range(8)]
    feats, tokens = _synthetic(tiny, 8)
    run = tmp_path / "oti"
    invert_dataset(tiny, ids, feats, run, OTIConfig(steps=1, batch_size=8), progress=False)
    from safetensors.torch import save_file

    save_file({"features": feats}, str(run / "features.safetensors"), metadata={"ids": json.dumps(ids)})
    out = tmp_path / "phi.safetensors"
    assert main(["train-phi", "--model", "isearle-tiny-test", "--pretrained", "none", "--device", "cpu",
                 "--preset", "searle", "--oti", str(run), "--epochs", "2", "--batch-size", "4", "--lr", "0.002",
                 "--temperature", "0.5", "--lambda-gpt", "0.3", "--lambda-reg", "0.2", "--reg-form", "knn",
                 "--reg-norm", "1.5", "--seed", "3", "--out", str(out)]) == 0
    from isearle.phi import phi_settings

    train = phi_settings(out)["train"]
    assert {k: train[k] for k in ("epochs", "batch_size", "lr", "temperature", "lambda_gpt", "lambda_reg",
                                  "reg_form", "reg_norm", "seed", "hard_negatives")} == {
        "epochs": 2, "batch_size": 4, "lr": 0.002, "temperature": 0.5, "lambda_gpt": 0.3, "lambda_reg": 0.2,
        "reg_form": "knn", "reg_norm": 1.5, "seed": 3, "hard_negatives": False}


# ------------------------------------------------------------------------------- training records
def test_train_phi_keeps_periodic_checkpoints_and_a_per_epoch_csv(tiny, tmp_path):
    """--save-frequency N keeps phi every N epochs (SEARLE's save_frequency); OUT.metrics.csv holds every
    epoch's losses, rewritten atomically after each epoch. The epoch-2 checkpoint of a 4-epoch run is
    the phi a 2-epoch run ends with."""
    import csv

    from isearle.cli import main
    from isearle.oti_runs import invert_dataset
    from isearle.phi import load_phi

    ids = [f"i{k}" for k in range(8)]
    feats, tokens = _synthetic(tiny, 8)
    run = tmp_path / "oti"
    invert_dataset(tiny, ids, feats, run, OTIConfig(steps=1, batch_size=8), progress=False)
    from safetensors.torch import save_file

    save_file({"features": feats}, str(run / "features.safetensors"), metadata={"ids": json.dumps(ids)})
    common = ["train-phi", "--model", "isearle-tiny-test", "--pretrained", "none", "--device", "cpu", "--oti",
              str(run), "--batch-size", "4", "--lr", "0.002", "--preset", "searle"]  # no penalty: the random
    # backbone of each run (its token embeddings) plays no part
    out = tmp_path / "phi.safetensors"
    assert main([*common, "--epochs", "4", "--save-frequency", "2", "--out", str(out)]) == 0
    assert sorted(p.name for p in tmp_path.glob("phi.*")) == [
        "phi.epoch002.safetensors", "phi.epoch004.safetensors", "phi.metrics.csv", "phi.safetensors"]
    rows = list(csv.DictReader((tmp_path / "phi.metrics.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4] and all(float(r["loss"]) > 0 for r in rows)
    assert rows[0]["val"] == ""  # no validation asked for
    short = tmp_path / "short" / "phi.safetensors"
    assert main([*common, "--epochs", "2", "--out", str(short)]) == 0
    two, at_two = load_phi(short), load_phi(tmp_path / "phi.epoch002.safetensors")
    for (k, a), b in zip(two.state_dict().items(), at_two.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    assert not list((tmp_path / "short").glob("*.epoch*"))  # --save-frequency 0: none


def test_train_phi_in_fp16_runs_autocast_with_a_grad_scaler(tiny, monkeypatch):
    """SEARLE's train_phi.py: fp16 autocast + GradScaler (here on the CPU), fp32 on the CPU by default."""
    from isearle.precision import fp16_autocast_supported

    if not fp16_autocast_supported("cpu"):
        pytest.skip("this torch has no CPU fp16 autocast")
    scales: list[float] = []
    scale = torch.amp.GradScaler.scale
    monkeypatch.setattr(torch.amp.GradScaler, "scale",
                        lambda self, out: scales.append(self.get_scale() if self.is_enabled() else 1.0) or scale(self, out))
    feats, tokens = _synthetic(tiny, 16)
    bank = {"dog": ["a photo of dog that is on the grass"], "cat": ["a photo of cat that is black"]}
    concepts = [["dog", "cat"]] * 16
    fp32, _ = train_phi(tiny, feats, tokens, PhiTrainConfig(epochs=1, batch_size=8), concepts, bank, progress=False)
    assert scales == [1.0, 1.0]  # the CPU default: fp32, a pass-through scaler
    scales.clear()
    cfg = PhiTrainConfig(epochs=1, batch_size=8, precision="fp16")
    phi, history = train_phi(tiny, feats, tokens, cfg, concepts, bank, progress=False)
    assert len(scales) == 2 and scales[0] == 2.0**16 and min(scales) > 1  # scaled (and backed off on an overflow)
    assert all(math.isfinite(h["loss"]) for h in history)
    assert any(not torch.equal(a, b) for a, b in zip(phi.state_dict().values(), fp32.state_dict().values(), strict=True))
