"""The contrastive trainer on a random-init tiny config: loss falls, checkpoints resume, export loads."""

from __future__ import annotations

import open_clip
import pytest
import torch

from isearle.backbone import register_model_configs
from isearle.clip_training import (
    ShapesCaptions,
    TrainConfig,
    backbone_from_model,
    composite_words,
    evaluate_zero_shot,
    export_weights,
    load_exported,
    train_clip,
)

NAME = "isearle-tiny-test"


@pytest.fixture(scope="module")
def data() -> ShapesCaptions:
    return ShapesCaptions(48, seed=1, size=32, context_length=77, progress=False, composite=0.3)


def _model() -> torch.nn.Module:
    register_model_configs()
    torch.manual_seed(0)
    return open_clip.create_model_and_transforms(NAME, pretrained=None)[0]


def test_loss_falls_and_resumes(data, tmp_path) -> None:
    torch.set_num_threads(1)
    model, tok = _model(), open_clip.get_tokenizer(NAME)
    config = TrainConfig(model=NAME, steps=30, batch_size=24, lr=2e-3, warmup=3, out_dir=str(tmp_path),
                         checkpoint_every=10, eval_every=0, log_every=1)
    meta = train_clip(model, data, tok, config, progress=False)
    losses = [h["batch_loss"] for h in meta["history"] if "batch_loss" in h]
    assert meta["step"] == 30 and sum(losses[-5:]) / 5 < sum(losses[:3]) / 3 - 0.3, losses
    other = _model()  # a different start: resuming must replace it by the checkpoint's weights
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn_like(p))
    again = train_clip(other, data, tok, TrainConfig(**{**config.__dict__, "steps": 32, "resume": True}),
                       progress=False)
    assert again["step"] == 32 and again["history"][: len(meta["history"])] == meta["history"]
    resumed = [h["batch_loss"] for h in again["history"] if "batch_loss" in h][-2:]
    assert len(resumed) == 2 and max(resumed) < sum(losses[:3]) / 3 - 0.3, (resumed, losses[:3])


def test_export_roundtrip_and_zero_shot(tmp_path) -> None:
    model = _model().eval()
    path = export_weights(model, tmp_path / "m.safetensors", {"steps": 0})
    assert path.with_suffix(".json").is_file()
    loaded = load_exported(_model(), path)
    for (k, a), b in zip(model.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.allclose(a.float(), b.float(), atol=1e-2, rtol=1e-2), k
    r = evaluate_zero_shot(backbone_from_model(model, NAME), n=40, seed=3)
    assert set(r) == {"full", "full_strict", "clause", "edit"} and all(0 <= v <= 1 for v in r.values())


def test_composite_captions_hold_one_placeholder() -> None:
    data = ShapesCaptions(20, seed=2, size=32, context_length=77, progress=False, composite=1.0)
    for i in range(len(data)):
        text, subject = data.caption(i)
        assert text.split().count("$") == 1 and text.startswith("a photo of $") and subject, (text, subject)
    plain = ShapesCaptions(20, seed=2, size=32, context_length=77, progress=False)
    assert all(s == "" and "$" not in t for t, s in (plain.caption(i) for i in range(20)))


def test_composite_word_is_the_mean_of_its_words() -> None:
    model, tok = _model(), open_clip.get_tokenizer(NAME)
    ids = tok(["a red circle", ""])
    emb = model.token_embedding
    words = composite_words(emb, ids, tok.sot_token_id)
    expected = emb(ids[0, 1:4]).mean(dim=0)  # [SOT, a, red, circle, EOT, 0, ...]
    assert int(ids[0, 4]) == tok.eot_token_id
    assert torch.allclose(words[0], expected, atol=1e-6) and torch.count_nonzero(words[1]) == 0
