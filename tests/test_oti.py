"""OTI: loss decreases, determinism, warm start, fused objective == naive SEARLE loss, resumable shards."""

import json
import random
import shutil
import statistics

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open

from isearle.concepts import ConceptBank
from isearle.oti import OTIConfig, OTIObjective, invert, phrase_tasks, replace_concept, token_norm
from isearle.oti_runs import invert_dataset, invert_images, load_run, load_runs, load_tokens
from isearle.pseudo_word import encode_with_pseudo_tokens, normalize_prompt

PHRASE_BANK = {
    "dog": ["a photo of dog that is on the grass", "a photo of dog that sleeps", "a photo of dog, running"],
    "cat": ["a photo of cat that is black", "a photo of a cat on a sofa"],
    "car": ["a photo of car that is red and parked in a very long street next to many other cars"],
    "tree": ["a photo of tree that has no leaves"],
}
IMAGE_CONCEPTS = [["dog", "cat"], ["car"], ["cat", "car", "tree"], ["dog"], ["unknown"]]


def _features(n: int, dim: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- phrase helpers
def test_replace_concept():
    assert normalize_prompt(replace_concept("a photo of dog that sleeps", "dog")) == "a photo of $ that sleeps"
    assert replace_concept("a photo of Dog that sleeps", "dog") is None  # case-sensitive, as SEARLE's str.replace
    assert normalize_prompt(replace_concept("a photo of dog, running", "dog")) == "a photo of $ , running"
    assert normalize_prompt(replace_concept("a hot dog and a dog", "hot dog")) == "a $ and a dog"
    assert normalize_prompt(replace_concept("a dog near a dog", "dog")) == "a $ near a dog"  # OTI: the first
    assert normalize_prompt(replace_concept("a dog near a dog", "dog", count=0)) == "a $ near a $"  # phi: every
    assert replace_concept("a photo of a hotdog", "dog") is None
    assert replace_concept("a photo of dogs", "dog") is None
    assert replace_concept("a photo of a cat", "dog") is None
    assert normalize_prompt(replace_concept("my t-shirt is red", "t-shirt")) == "my $ is red"


def test_phrase_tasks_drop_a_concept_one_of_whose_phrases_lost_it():
    """SEARLE's filter: a concept is unusable when one of its phrases no longer contains it."""
    bank = {"dog": ["a photo of dog that runs", "a photo of a puppy"], "cat": ["a photo of cat that naps"]}
    tasks = phrase_tasks([["dog", "cat"], [" cat ", "cat", "dog"]], bank, top_k=2)
    assert tasks[0].phrases == ["a photo of cat that naps"]
    assert tasks[1].phrases == ["a photo of cat that naps"]  # stripped and de-duplicated, then top-k


def test_phrase_tasks_pairs_and_top_k():
    tasks = phrase_tasks(IMAGE_CONCEPTS, PHRASE_BANK, top_k=2)
    assert len(tasks) == len(IMAGE_CONCEPTS)
    assert len(tasks[0].phrases) == 5 and len(tasks[0].pseudo_phrases) == 5
    assert tasks[2].phrases == PHRASE_BANK["cat"] + PHRASE_BANK["car"]  # "tree" is the 3rd concept
    assert tasks[4].phrases == []
    for task in tasks:
        for phrase, pseudo in zip(task.phrases, task.pseudo_phrases, strict=True):
            assert normalize_prompt(pseudo).split().count("$") == 1
            assert "$" not in phrase


# ------------------------------------------------------------------------------- optimisation
@pytest.mark.parametrize("gamma", [0.0, 0.2])
@pytest.mark.parametrize("with_phrases", [False, True])
def test_oti_lowers_its_loss(tiny, gamma, with_phrases):
    feats = _features(5, tiny.embed_dim)
    tasks = phrase_tasks(IMAGE_CONCEPTS, PHRASE_BANK) if with_phrases else None
    history: list[float] = []
    tokens = invert(tiny, feats, OTIConfig(steps=40, gamma=gamma), tasks, history=history)
    assert tokens.shape == (5, tiny.token_width)
    assert torch.isfinite(tokens).all()
    assert len(history) == 40
    first, last = statistics.mean(history[:10]), statistics.mean(history[-10:])
    assert last < first - 0.02, (first, last)


def test_oti_same_seed_same_tokens(tiny):
    feats = _features(3, tiny.embed_dim)
    tasks = phrase_tasks(IMAGE_CONCEPTS[:3], PHRASE_BANK)
    cfg = OTIConfig(steps=8, gamma=0.1)
    a = invert(tiny, feats, cfg, tasks)
    b = invert(tiny, feats, cfg, tasks)
    c = invert(tiny, feats, OTIConfig(steps=8, gamma=0.1, seed=1), tasks)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_oti_warm_start_is_used(tiny):
    feats = _features(3, tiny.embed_dim)
    init = _features(3, tiny.token_width, seed=5) * 0.3
    kept = init.clone()
    frozen = invert(tiny, feats, OTIConfig(steps=3, lr=0.0), init=init)  # lr 0: v never moves
    assert torch.allclose(frozen, init, atol=1e-6)
    warm = invert(tiny, feats, OTIConfig(steps=5), init=init)
    cold = invert(tiny, feats, OTIConfig(steps=5))
    assert torch.equal(init, kept)  # the caller's tensor is not modified
    assert (warm - init).norm() < (cold - init).norm()
    assert not torch.allclose(warm, cold)



def test_oti_norm_cap_keeps_tokens_in_the_ball(tiny):
    """max_norm c keeps every S* within c x the mean token-embedding norm; 0 (SEARLE) does not cap."""
    feats = _features(4, tiny.embed_dim)
    cap = 0.5 * token_norm(tiny)
    free = invert(tiny, feats, OTIConfig(steps=30, lr=0.1))
    capped = invert(tiny, feats, OTIConfig(steps=30, lr=0.1, max_norm=0.5))
    assert free.norm(dim=-1).max() > cap  # the cap binds in this setting ...
    assert capped.norm(dim=-1).max() <= cap * (1 + 1e-5)  # ... and holds
    history: list[float] = []
    invert(tiny, feats, OTIConfig(steps=40, max_norm=0.5), history=history)
    assert statistics.mean(history[-10:]) < statistics.mean(history[:10])  # still optimises


def test_oti_returns_the_ema_of_adamw_iterates(tiny):
    """invert == SEARLE's loop written out: AdamW on v, EMA (decay 0.99) of v is the result."""
    feats = _features(3, tiny.embed_dim)
    tasks = phrase_tasks(IMAGE_CONCEPTS[:3], PHRASE_BANK)
    cfg = OTIConfig(steps=6, gamma=0.1, seed=4)
    init = _features(3, tiny.token_width, seed=6) * 0.02
    objective = OTIObjective(tiny, feats, tasks, cfg, random.Random(cfg.seed))
    v = torch.nn.Parameter(init.clone())
    ema = init.clone()
    optimizer = torch.optim.AdamW([v], lr=cfg.lr, weight_decay=cfg.weight_decay)
    for step in range(cfg.steps):
        optimizer.zero_grad()
        objective.loss(step, v).backward()
        optimizer.step()
        ema = cfg.ema_decay * ema + (1 - cfg.ema_decay) * v.detach()
    result = invert(tiny, feats, cfg, tasks, init=init)
    assert float((result - ema).abs().max()) <= 1e-6
    assert float((result - v.detach()).abs().max()) > 1e-4  # the EMA, not the last iterate

# ------------------------------------------------------------------ fused objective == naive loss
def _naive_searle_loss(backbone, objective: OTIObjective, step: int, v: torch.Tensor,
                       noise: torch.Tensor | None = None) -> torch.Tensor:
    """SEARLE's OTI step written plainly: separate template and phrase passes over the FULL context,
    phrase targets re-encoded with open_clip's own text encoder, same sampled prompts."""
    cfg = objective.config
    templates = [cfg.templates[int(c)] for c in objective.template_choice[step]]
    text = F.normalize(encode_with_pseudo_tokens(backbone, templates, v, truncate=False), dim=-1)
    if noise is not None:
        text = text + noise
    image = objective.image_features
    content = (1 - F.cosine_similarity(text, image, dim=-1)).mean()
    rows = [i for i, c in enumerate(objective.phrase_choice[step]) if c >= 0]
    if not rows:
        return content
    picks = [objective.phrase_choice[step][i] for i in rows]
    phrases = [objective.tasks[i].phrases[c] for i, c in zip(rows, picks, strict=True)]
    pseudo = [objective.tasks[i].pseudo_phrases[c] for i, c in zip(rows, picks, strict=True)]
    with torch.no_grad():
        targets = backbone.model.encode_text(backbone.tokenize(phrases))
    feats = encode_with_pseudo_tokens(backbone, pseudo, v[rows], truncate=False)
    gpt = (1 - F.cosine_similarity(feats, targets, dim=-1)).mean()
    return (cfg.lambda_content * content + cfg.lambda_gpt * gpt) / (cfg.lambda_content + cfg.lambda_gpt)


def test_fused_objective_equals_naive_searle_loss(tiny):
    feats = _features(5, tiny.embed_dim)
    tasks = phrase_tasks(IMAGE_CONCEPTS, PHRASE_BANK)
    objective = OTIObjective(tiny, feats, tasks, OTIConfig(steps=12, gamma=0.0), random.Random(3))
    assert objective.template_choice.shape == (12, 5)
    assert all(row[4] == -1 for row in objective.phrase_choice)  # image 4 has no phrases
    assert any(len({row[i] for row in objective.phrase_choice}) > 1 for i in range(4))  # phrases vary
    v = torch.nn.Parameter(_features(5, tiny.token_width, seed=9) * 0.05)
    for step in (0, 4, 7, 11):
        fused = objective.loss(step, v)
        naive = _naive_searle_loss(tiny, objective, step, v)
        assert abs(fused.item() - naive.item()) <= 1e-5, step
    # the gradients agree too (what the optimiser sees)
    g_fused = torch.autograd.grad(objective.loss(5, v), v)[0]
    g_naive = torch.autograd.grad(_naive_searle_loss(tiny, objective, 5, v), v)[0]
    assert float((g_fused - g_naive).abs().max()) <= 1e-5


def test_fused_objective_noise_matches_reference(tiny):
    feats = _features(4, tiny.embed_dim)
    tasks = phrase_tasks(IMAGE_CONCEPTS[:4], PHRASE_BANK)
    objective = OTIObjective(tiny, feats, tasks, OTIConfig(steps=4, gamma=0.3), random.Random(0))
    v = torch.nn.Parameter(_features(4, tiny.token_width, seed=2) * 0.05)
    state = objective.noise_gen.get_state()
    fused = objective.loss(2, v)
    gen = torch.Generator().manual_seed(0)
    gen.set_state(state)
    noise = torch.randn(4, tiny.embed_dim, generator=gen) * 0.3
    assert abs(fused.item() - _naive_searle_loss(tiny, objective, 2, v, noise).item()) <= 1e-5
    assert abs(fused.item() - _naive_searle_loss(tiny, objective, 2, v).item()) > 1e-4  # noise is applied


def test_objective_without_phrases_is_content_only(tiny):
    feats = _features(3, tiny.embed_dim)
    objective = OTIObjective(tiny, feats, None, OTIConfig(steps=3, gamma=0.0), random.Random(0))
    assert objective.phrase_targets is None
    assert all(c == -1 for row in objective.phrase_choice for c in row)
    v = torch.nn.Parameter(_features(3, tiny.token_width, seed=1) * 0.05)
    assert abs(objective.loss(1, v).item() - _naive_searle_loss(tiny, objective, 1, v).item()) <= 1e-5


# ------------------------------------------------------------------------- resumable dataset run
def test_invert_dataset_resumes_and_skips_existing_shards(tiny, tmp_path):
    n = 5
    ids = [f"img{i}" for i in range(n)]
    feats = _features(n, tiny.embed_dim)
    tasks = phrase_tasks(IMAGE_CONCEPTS, PHRASE_BANK)
    cfg = OTIConfig(steps=6, batch_size=2)
    out = tmp_path / "oti"
    done: list[int] = []
    got_ids, tokens = invert_dataset(tiny, ids, feats, out, cfg, tasks, progress=False,
                                     on_batch=lambda b, loss: done.append(b))
    assert done == [0, 1, 2]
    assert got_ids == ids and tokens.shape == (n, tiny.token_width)
    shards = sorted(out.glob("shard_*.safetensors"))
    assert [s.name for s in shards] == [f"shard_{b:06d}.safetensors" for b in range(3)]
    # shards are safetensors with their ids in the metadata: no pickle anywhere
    for shard in shards:
        head = shard.read_bytes()[:16]
        assert not head.startswith(b"\x80") and not head.startswith(b"PK")
        with safe_open(str(shard), "pt") as f:
            assert list(f.keys()) == ["tokens"]
            assert len(json.loads(f.metadata()["ids"])) == f.get_tensor("tokens").shape[0]
    assert not list(out.glob("*.pt")) and not list(out.glob("*.pkl")) and not list(out.glob("*.tmp"))
    assert json.loads((out / "config.json").read_text())["backbone"] == tiny.name

    shards[1].unlink()  # an interrupted run: batch 1 missing
    done.clear()
    got_ids2, tokens2 = invert_dataset(tiny, ids, feats, out, cfg, tasks, progress=False,
                                       on_batch=lambda b, loss: done.append(b))
    assert done == [1]  # existing shards are skipped
    assert got_ids2 == ids
    assert torch.equal(tokens2, tokens)
    assert load_tokens(out)[0] == ids

    done.clear()
    invert_dataset(tiny, ids, feats, out, cfg, tasks, progress=False, on_batch=lambda b, loss: done.append(b))
    assert done == []


def test_invert_dataset_uses_per_row_init(tiny, tmp_path):
    feats = _features(3, tiny.embed_dim)
    init = _features(3, tiny.token_width, seed=4)
    _, tokens = invert_dataset(tiny, ["a", "b", "c"], feats, tmp_path, OTIConfig(steps=2, lr=0.0, batch_size=2),
                               init=init, progress=False)
    assert torch.allclose(tokens, init, atol=1e-6)


def test_load_tokens_without_shards_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="isearle oti"):
        load_tokens(tmp_path)


def test_invert_images_writes_a_loadable_run(tiny, tmp_path):
    colours = ["red", "green", "blue", "yellow", "white"]
    items = [lambda c=c: Image.new("RGB", (40, 30), c) for c in colours]
    ids = [f"{c}.png" for c in colours]
    names = ["dog", "cat", "car", "tree"]
    bank = ConceptBank.build(tiny, names, progress=False)
    cfg = OTIConfig(steps=4, batch_size=2, top_k_concepts=2)
    out = tmp_path / "run"
    got_ids, tokens = invert_images(tiny, ids, items, out, cfg, bank, PHRASE_BANK, store_top_k=3,
                                    batch_size=2, progress=False)
    assert got_ids == ids and tokens.shape == (5, tiny.token_width)
    run_ids, features, run_tokens, concepts = load_run(out)
    assert run_ids == ids
    assert features.shape == (5, tiny.embed_dim)
    assert torch.allclose(features, tiny.encode_pil([it() for it in items]), atol=1e-5)
    assert torch.equal(run_tokens, tokens)
    assert concepts is not None and all(len(c) == 3 and set(c) <= set(names) for c in concepts)

    both = load_runs([out, out])  # concatenated, with the settings they share
    assert both[0] == ids + ids and torch.equal(both[2], torch.cat([tokens, tokens])) and both[3] == concepts * 2
    assert both[4] == {"steps": 4, "gamma": cfg.gamma, "max_norm": 0.0, "lambda_gpt": cfg.lambda_gpt,
                       "templates": list(cfg.templates)}
    other = tmp_path / "capped"
    shutil.copytree(out, other)
    (other / "config.json").write_text(json.dumps({**json.loads((out / "config.json").read_text()), "max_norm": 2.0}))
    with pytest.raises(ValueError, match="same OTI settings"):
        load_runs([out, other])


# ------------------------------------------------------------------------------------ precision
def test_oti_under_fp16_autocast_scales_its_gradients(tiny, monkeypatch):
    """SEARLE runs OTI under fp16 autocast with a GradScaler: S*'s gradients cannot underflow. The same
    path runs on the CPU (torch's CPU fp16 autocast), so it is not GPU-only code that no test runs."""
    import isearle.oti as oti_module
    from isearle.precision import fp16_autocast_supported

    if not fp16_autocast_supported("cpu"):
        pytest.skip("this torch has no CPU fp16 autocast")
    assert tiny.precision == "fp32"  # load_backbone's CPU default: fp32, not an fp16 that means fp32
    assert not oti_module.grad_scaler(tiny).is_enabled()  # fp32: nothing to scale
    assert not oti_module.grad_scaler(tiny, OTIConfig(precision="bf16")).is_enabled()
    assert oti_module.grad_scaler(tiny, OTIConfig(precision="fp16")).is_enabled()
    scaled: list[float] = []
    scale = torch.amp.GradScaler.scale

    def spy(self, outputs):
        out = scale(self, outputs)
        scaled.append(float(out.detach() / outputs.detach()))
        return out

    monkeypatch.setattr(torch.amp.GradScaler, "scale", spy)
    feats = _features(2, tiny.embed_dim)
    fp32 = invert(tiny, feats, OTIConfig(steps=3, gamma=0.0))
    assert scaled == [1.0, 1.0, 1.0]  # fp32: a pass-through scaler
    scaled.clear()
    tokens = invert(tiny, feats, OTIConfig(steps=3, gamma=0.0, precision="fp16"))
    assert len(scaled) == 3 and scaled[0] == 2.0**16  # every step's loss was scaled before backward
    assert torch.isfinite(tokens).all() and not torch.equal(tokens, fp32)  # fp16 did run
    assert (tokens - fp32).abs().max() < 1e-2  # and stays close to fp32


def test_the_gpt_loss_weight_is_the_configured_one(tiny):
    """L(lambda) = (L_content + lambda L_gpt) / (1 + lambda) with the same draws."""
    feats = _features(4, tiny.embed_dim)
    tasks = phrase_tasks(IMAGE_CONCEPTS[:4], PHRASE_BANK)
    v = torch.nn.Parameter(_features(4, tiny.token_width, seed=2) * 0.05)

    def loss(**kw):
        return OTIObjective(tiny, feats, tasks, OTIConfig(steps=3, gamma=0.0, **kw), random.Random(1)).loss(2, v).item()

    gpt = loss(lambda_content=0.0, lambda_gpt=1.0)
    content = loss(lambda_gpt=0.5) * 1.5 - 0.5 * gpt
    assert abs(content - gpt) > 1e-3
    assert loss(lambda_gpt=2.0) == pytest.approx((content + 2.0 * gpt) / 3.0, abs=1e-6)


def test_oti_options_reach_the_run_configuration(tiny, tmp_path):
    from isearle.cli import main
    from isearle.shapes.captions import OTI_TEMPLATES

    images = tmp_path / "images"
    images.mkdir()
    for colour in ("red", "blue"):
        Image.new("RGB", (32, 32), colour).save(images / f"{colour}.png")
    out = tmp_path / "run"
    assert main(["oti", "--model", "isearle-tiny-test", "--pretrained", "none", "--device", "cpu", "--preset",
                 "searle", "--images", str(images), "--vocabulary", "imagenet", "--steps", "2", "--batch-size", "1",
                 "--lr", "0.1", "--gamma", "0.3", "--max-norm", "1.5", "--templates", "shapes", "--seed", "4",
                 "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert {k: config[k] for k in ("steps", "batch_size", "lr", "gamma", "max_norm", "seed")} == {
        "steps": 2, "batch_size": 1, "lr": 0.1, "gamma": 0.3, "max_norm": 1.5, "seed": 4}
    assert config["templates"] == list(OTI_TEMPLATES) and config["lambda_gpt"] == 0.0  # no --phrases


def test_oti_run_skips_unreadable_images_and_records_them(tiny, tmp_path, monkeypatch):
    """`isearle oti` over a folder: a file it cannot read is skipped, listed in config.json with the
    decoding, and a resumed run keeps the same images; above the threshold the run fails."""
    import isearle.images
    from isearle.images import UnreadableImages
    from isearle.oti_runs import invert_images

    paths = []
    for i, colour in enumerate(("red", "blue", "green")):
        paths.append(tmp_path / f"{i}.png")
        Image.new("RGB", (32, 24), colour).save(paths[-1])
    paths[1].write_bytes(b"not an image")
    ids = [p.name for p in paths]
    out = tmp_path / "run"
    with pytest.raises(UnreadableImages, match="1 of 3 images cannot be read"):
        invert_images(tiny, ids, paths, out, OTIConfig(steps=1, batch_size=2), progress=False, decode="searle")
    monkeypatch.setattr(isearle.images, "MAX_UNREADABLE", 0.5)
    got, tokens = invert_images(tiny, ids, paths, tmp_path / "run2", OTIConfig(steps=1, batch_size=2),
                                progress=False, decode="searle")
    assert got == ["0.png", "2.png"] and tokens.shape[0] == 2
    config = json.loads((tmp_path / "run2" / "config.json").read_text())
    assert config["unreadable"] == ["1.png"] and config["decode"] == "searle" and config["precision"] == "fp32"
    again, same = invert_images(tiny, ids, paths, tmp_path / "run2", OTIConfig(steps=1, batch_size=2),
                                progress=False, decode="searle")  # resumed: the stored features are reused
    assert again == got and torch.equal(same, tokens)


def test_an_oti_folder_of_another_backbone_is_refused(tiny, vitb32, tmp_path):
    """A run folder records its backbone: resuming it with another one, or distilling phi from it with
    another one, is refused (its shards would mix two kinds of token)."""
    import dataclasses

    from isearle.artifacts import ArtifactError

    out = tmp_path / "run"
    invert_dataset(tiny, ["a", "b"], _features(2, tiny.embed_dim), out, OTIConfig(steps=1, batch_size=2),
                   progress=False)
    other = dataclasses.replace(tiny, name="isearle-tiny-other")
    with pytest.raises(ArtifactError, match=r"other settings \(backbone differ\)"):
        invert_dataset(other, ["a", "b"], _features(2, tiny.embed_dim), out, OTIConfig(steps=1, batch_size=2),
                       progress=False)
    retrained = dataclasses.replace(tiny, pretrained="retrained.pt")
    with pytest.raises(ArtifactError, match=r"other settings \(pretrained differ\)"):
        invert_dataset(retrained, ["a", "b"], _features(2, tiny.embed_dim), out, OTIConfig(steps=1, batch_size=2),
                       progress=False)
    from safetensors.torch import save_file

    save_file({"features": _features(2, tiny.embed_dim)}, str(out / "features.safetensors"),
              metadata={"ids": json.dumps(["a", "b"])})
    with pytest.raises(ArtifactError, match="is an OTI run of isearle-tiny-test"):
        load_runs([out], vitb32)


def test_a_shard_holding_other_images_is_redone(tiny, tmp_path):
    """A second run with new ids in the same folder inverts them: it never returns the first run's ids
    and tokens from a shard of the same number."""
    out = tmp_path / "run"
    cfg = OTIConfig(steps=2, batch_size=2)
    first_ids, first = invert_dataset(tiny, ["a", "b"], _features(2, tiny.embed_dim), out, cfg, progress=False)
    new = _features(2, tiny.embed_dim, seed=5)
    ids, tokens = invert_dataset(tiny, ["c", "d"], new, out, cfg, progress=False)
    fresh_ids, fresh = invert_dataset(tiny, ["c", "d"], new, tmp_path / "fresh", cfg, progress=False)
    assert ids == fresh_ids == ["c", "d"] and torch.equal(tokens, fresh) and not torch.equal(tokens, first)
