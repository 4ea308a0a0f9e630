"""`--preset searle` against the authors' code (miccunifi/SEARLE src/) as the executable definition.

The reference values below are transcribed from SPEC.md and SEARLE's scripts, never taken from the
project's constants; the reference OTI and phi steps are written the way src/oti_inversion.py and
src/train_phi.py write them (global-style `random` draws, `str.replace`, nn.CosineEmbeddingLoss,
utils.contrastive_loss, encode_with_pseudo_tokens on the first "$"), with the same phrases and seed.
"""

from __future__ import annotations

import copy
import random
import re
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from isearle import phi_training
from isearle.concepts import TEMPLATES as CONCEPT_TEMPLATES
from isearle.concepts import ConceptBank
from isearle.oti import TEMPLATES as OTI_TEMPLATES
from isearle.oti import OTIObjective, invert, phrase_tasks
from isearle.phi import Phi
from isearle.phi_training import PhraseSampler, phi_step, train_phi
from isearle.phrases import generate_phrases, load_phrase_bank
from isearle.presets import PRESETS

# SPEC.md / SEARLE src/utils.py get_templates(): PALAVRA's 24, spelling as in the source.
SPEC_TEMPLATES = [
    "This is a photo of a {}", "This photo contains a {}", "A photo of a {}", "This is an illustration of a {}",
    "This illustration contains a {}", "An illustrations of a {}", "This is a sketch of a {}",
    "This sketch contains a {}", "A sketch of a {}", "This is a diagram of a {}", "This diagram contains a {}",
    "A diagram of a {}", "A {}", "We see a {}", "{}", "We see a {} in this photo", "We see a {} in this image",
    "We see a {} in this illustration", "We see a {} photo", "We see a {} image", "We see a {} illustration",
    "{} photo", "{} image", "{} illustration",
]
# SPEC.md pipeline 3 (OTI) and 4 (phi), SEARLE's argparse defaults where the paper agrees.
# "substring": SEARLE finds a concept with str.replace (oti_inversion.py, train_phi.py).
SPEC_OTI = {"steps": 350, "lr": 2e-2, "weight_decay": 0.01, "ema_decay": 0.99, "init_std": 0.02,
            "lambda_content": 1.0, "lambda_gpt": 0.5, "top_k_concepts": 15, "batch_size": 32,
            "gamma": 0.0, "max_norm": 0.0, "concept_match": "substring"}
SPEC_PHI = {"epochs": 100, "batch_size": 256, "lr": 1e-4, "weight_decay": 0.01, "temperature": 0.25,
            "lambda_distil": 1.0, "lambda_gpt": 0.75, "top_k_concepts": 150, "dropout": 0.5,
            "hard_negatives": False, "lambda_reg": 0.0, "concept_match": "substring"}

# What the language model returns, before any preparation: newlines (single and in runs), runs of dots,
# duplicate phrases, phrases holding "$", "cat" inside another word ("category") and "hot" inside the
# prompt's own "photo" (SEARLE's first-occurrence replace puts S* there: "a p $ o of hot that ...").
RAW = {
    "dog": ["a photo of dog that runs on the grass\n\nand barks", "a photo of dog that sleeps...",
            "a photo of dog that sleeps...", "a photo of dog near a dog", "a photo of dog that costs $5"],
    "cat": ["a photo of cat that is black\nand sits on a category sign", "a photo of cat on a category.. list"],
    "car": ["a photo of car that is red and parked..\n"],
    "tree": ["a photo of tree that has no leaves", "a photo of a plant"],  # filtered: a phrase lost "tree"
    "ball": ["a photo of ball that is round", "a photo of ball on a ball", "a photo of ball that is round"],
    "hot": ["a photo of hot that is spicy", "a photo of hot soup.\n"],
}


def searle_process_phrase(phrase: str) -> str:
    """src/gpt_phrases_generation.py process_phrase."""
    phrase = re.sub("(\n)+", ". ", phrase)
    return re.sub("\\.+", ".", phrase)


# SEARLE's bank: every generated text processed, duplicates kept. Phrases holding "$" are left out: SEARLE
# would put S* on their own "$" (a documented departure, kept in both presets).
BANK = {k: [searle_process_phrase(p) for p in v if "$" not in p] for k, v in RAW.items()}
FILTERED = {k for k, v in BANK.items() for p in v if "$" not in p.replace(k, " $ ", 1)}  # SEARLE's filter
assert FILTERED == {"tree"} and BANK["dog"][1] == BANK["dog"][2] == "a photo of dog that sleeps."


@pytest.fixture(scope="module")
def our_bank(tmp_path_factory) -> dict[str, list[str]]:
    """The same texts through the project's own path: `isearle phrases --preset searle` preparation,
    written to a JSON bank and read back by `load_phrase_bank` (what OTI and train-phi load)."""
    path = tmp_path_factory.mktemp("phrases") / "bank.json"
    generate_phrases(list(RAW), lambda concept: list(RAW[concept]), cache=path, progress=False,
                     style=PRESETS["searle"].phrases)
    return load_phrase_bank(path)


def test_searle_phrase_banks_are_prepared_as_searles(our_bank):
    assert our_bank == BANK  # newlines, dots, duplicates as SEARLE; "$" phrases dropped


# ------------------------------------------------------------------------------ SEARLE, written out
def searle_encode(backbone, text: torch.Tensor, pseudo_tokens: torch.Tensor) -> torch.Tensor:
    """encode_with_pseudo_tokens: S* at the first "$" (259) of each row, full 77-token context."""
    tower = backbone.text
    x = tower.token_embedding(text)
    _, counts = torch.unique((text == 259).nonzero(as_tuple=True)[0], return_counts=True)
    cum_sum = torch.cat((torch.zeros(1).int(), torch.cumsum(counts, dim=0)[:-1]))
    first = (text == 259).nonzero()[cum_sum][:, 1]
    x = x.clone()
    x[torch.arange(x.shape[0]), first] = pseudo_tokens.to(x.dtype)
    x = x + tower.positional_embedding
    x = tower.transformer(x, attn_mask=tower.attn_mask)  # open_clip is batch-first: no permutes
    x = tower.ln_final(x)
    x = x[torch.arange(x.shape[0]), text.argmax(dim=-1)]
    proj = tower.text_projection
    return proj(x) if isinstance(proj, nn.Linear) else x @ proj


def searle_contrastive(v1: torch.Tensor, v2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SEARLE src/utils.py contrastive_loss (from PALAVRA)."""
    v1, v2 = F.normalize(v1, dim=1), F.normalize(v2, dim=1)
    v2 = v2.to(v1.dtype)  # under fp16 autocast phi's output is fp16: CUDA's autocast casts this product, the CPU's not
    numerator = torch.exp(torch.diag(torch.inner(v1, v2)) / temperature)
    numerator = torch.cat((numerator, numerator), 0)
    joint = torch.cat((v1, v2), 0)
    pairs = torch.exp(torch.mm(joint, joint.t()) / temperature)
    denominator = torch.sum(pairs - pairs * torch.eye(joint.shape[0]), 0)
    return -torch.mean(torch.log(numerator / denominator))


def searle_oti(backbone, image_features, name_to_concepts, init, steps, seed, top_k=15, amp=False):
    """src/oti_inversion.py's loop for one batch: per step (loss, grad), and the EMA result. `amp`: its
    CUDA mixed precision (fp16 autocast around the step's encoding and loss, a GradScaler), on the CPU."""
    criterion, target = nn.CosineEmbeddingLoss(), torch.as_tensor([1])
    batch_gpt_phrases, batch_concepts = [], []
    for similar in name_to_concepts:
        l_phrases, l_concepts = [], []
        for w in list(dict.fromkeys(str(w).strip() for w in similar))[:top_k]:
            if w in FILTERED:
                continue
            for p in BANK[w]:
                l_phrases.append(p)
                l_concepts.append(w)
        batch_gpt_phrases.append(l_phrases)
        batch_concepts.append(l_concepts)
    rand = random.Random(seed)
    bs = len(init)
    v = nn.Parameter(init.clone())
    ema = v.clone().detach()
    optimizer = torch.optim.AdamW([v], lr=2e-2, weight_decay=0.01)
    scaler = torch.amp.GradScaler("cpu", enabled=amp)
    trace = []
    for _ in range(steps):
        optimizer.zero_grad()
        template_indexes = rand.choices(range(len(SPEC_TEMPLATES)), k=bs)
        template_texts = [SPEC_TEMPLATES[i].format(" $ ") for i in template_indexes]
        idx = [rand.choice(range(len(batch_gpt_phrases[i]))) for i in range(len(batch_gpt_phrases))]
        reg = [batch_gpt_phrases[i][j] for i, j in enumerate(idx)]
        words = [batch_concepts[i][j] for i, j in enumerate(idx)]
        oti_gpt = [r.replace(w, " $ ", 1) for w, r in zip(words, reg, strict=True)]
        with torch.autocast("cpu", dtype=torch.float16, enabled=amp):
            template_features = searle_encode(backbone, backbone.tokenize(template_texts), v)
            reg_features = backbone.model.encode_text(backbone.tokenize(reg))
            oti_gpt_features = searle_encode(backbone, backbone.tokenize(oti_gpt), v)
            cosine = criterion(template_features, image_features, target)
            gpt = criterion(oti_gpt_features, reg_features, target)
            loss = (1 * cosine + 0.5 * gpt) / (1 + 0.5)
        scaler.scale(loss).backward()
        trace.append((loss.item(), v.grad.clone() / scaler.get_scale() if amp else v.grad.clone()))
        scaler.step(optimizer)
        scaler.update()
        ema = 0.99 * ema + (1 - 0.99) * v
    return trace, ema.detach()


def searle_phi_loss(backbone, phi, features, oti_tokens, name_to_concepts, rand, top_k=150):
    """One batch of src/train_phi.py train_one_epoch (fp32, no scaler)."""
    batch_concepts = [rand.choice(c[:top_k]) for c in name_to_concepts]
    while sum(c in FILTERED for c in batch_concepts) != 0:
        batch_concepts = [rand.choice(c[:top_k]) for c in name_to_concepts]
    estimated = phi(features)
    distillation = searle_contrastive(oti_tokens, estimated, 0.25)
    reg = [rand.choice(BANK[c]) for c in batch_concepts]
    token_phrases = [p.replace(w, " $ ") for w, p in zip(batch_concepts, reg, strict=True)]
    reg_emb = backbone.model.encode_text(backbone.tokenize(reg))
    pseudo_emb = searle_encode(backbone, backbone.tokenize(token_phrases), estimated)
    gpt = nn.CosineEmbeddingLoss()(reg_emb, pseudo_emb, torch.as_tensor([1]))
    return 1 * distillation + 0.75 * gpt


# ----------------------------------------------------------------------------- lists and values
def test_template_lists_are_searles():
    assert list(CONCEPT_TEMPLATES) == SPEC_TEMPLATES
    assert list(OTI_TEMPLATES) == [t.format(" $ ") for t in SPEC_TEMPLATES]
    assert list(PRESETS["searle"].oti_config().templates) == [t.format(" $ ") for t in SPEC_TEMPLATES]


def test_concept_ensembling_pads_the_concept(tiny, monkeypatch):
    seen: list[str] = []
    encode = tiny.encode_texts

    def spy(texts):
        seen.extend(texts)
        return encode(texts)

    monkeypatch.setattr(tiny, "encode_texts", spy)
    bank = ConceptBank.build(tiny, ["red car", "dog"], progress=False)
    assert seen == [t.format(f" {c} ") for c in ["red car", "dog"] for t in SPEC_TEMPLATES]
    by_hand = F.normalize(F.normalize(encode([t.format(" dog ") for t in SPEC_TEMPLATES]), dim=-1).mean(0), dim=0)
    assert torch.allclose(bank.features[1], by_hand, atol=1e-6)


@pytest.mark.parametrize("key", sorted(SPEC_OTI))
def test_searle_preset_oti_settings(key):
    assert getattr(PRESETS["searle"].oti_config(), key) == SPEC_OTI[key]


@pytest.mark.parametrize("key", sorted(SPEC_PHI))
def test_searle_preset_phi_settings(key):
    assert getattr(PRESETS["searle"].phi_config(), key) == SPEC_PHI[key]


def test_isearle_preset_adds_noise_hard_negatives_and_penalty_only():
    searle, isearle = PRESETS["searle"], PRESETS["isearle"]
    oti_diff = {k for k, v in vars(isearle.oti_config()).items() if vars(searle.oti_config())[k] != v}
    phi_diff = {k for k, v in vars(isearle.phi_config()).items() if vars(searle.phi_config())[k] != v}
    # and both find a concept as a whole word, where SEARLE's str.replace also finds it inside another word
    assert oti_diff == {"gamma", "concept_match"} and isearle.oti_config().gamma > 0
    assert phi_diff == {"hard_negatives", "lambda_reg", "reg_form", "concept_match"}
    assert isearle.oti_config().concept_match == isearle.phi_config().concept_match == "word"
    assert PRESETS["searle"].oti_config(gamma=0.3).gamma == 0.3  # an explicit option wins
    assert PRESETS["searle"].oti_config(gamma=None).gamma == 0.0  # an option not given does not


# ------------------------------------------------------------------------------- OTI step == SEARLE
NAME_TO_CONCEPTS = [["dog", "cat", " dog"], ["car", "tree", "ball"], ["tree", "cat", "hot"], ["hot"]]


def test_oti_step_equals_searles(tiny, our_bank):
    assert tiny.placeholder_id == 259
    feats = torch.randn(4, tiny.embed_dim, generator=torch.Generator().manual_seed(1))
    init = torch.randn(4, tiny.token_width, generator=torch.Generator().manual_seed(2)) * 0.02
    steps, seed = 6, 11
    trace, ema = searle_oti(tiny, feats, NAME_TO_CONCEPTS, init, steps, seed)

    cfg = PRESETS["searle"].oti_config(steps=steps, seed=seed)
    tasks = phrase_tasks(NAME_TO_CONCEPTS, our_bank, cfg.top_k_concepts, cfg.concept_match)
    objective = OTIObjective(tiny, feats, tasks, cfg, random.Random(seed))
    v = nn.Parameter(init.clone())
    optimizer = torch.optim.AdamW([v], lr=cfg.lr, weight_decay=cfg.weight_decay)
    for step, (ref_loss, ref_grad) in enumerate(trace):
        optimizer.zero_grad()
        loss = objective.loss(step, v)
        loss.backward()
        assert abs(loss.item() - ref_loss) <= 1e-5, step
        assert float((v.grad - ref_grad).abs().max()) <= 1e-5 * max(1.0, float(ref_grad.abs().max())), step
        optimizer.step()
    ours = invert(tiny, feats, cfg, tasks, init=init)
    assert float((ours - ema).abs().max()) <= 1e-5


# ------------------------------------------------------------------------------- phi step == SEARLE
PHI_CONCEPTS = [["dog", "cat"], ["car", "ball", "dog"], ["ball"], ["cat", "car"], ["dog", "ball"], ["cat"]]


def _phi_inputs(tiny):
    """Image features, OTI targets, a seeded phi and its copy for SEARLE's reference step."""
    gen = torch.Generator().manual_seed(3)
    feats = torch.randn(6, tiny.embed_dim, generator=gen)
    oti_tokens = torch.randn(6, tiny.token_width, generator=gen)
    torch.manual_seed(0)
    phi = Phi.for_backbone(tiny.embed_dim, tiny.token_width).train()
    return feats, oti_tokens, phi, copy.deepcopy(phi)


def test_phi_step_equals_searles(tiny, our_bank):
    feats, oti_tokens, phi, ref_phi = _phi_inputs(tiny)
    cfg = PRESETS["searle"].phi_config()
    sampler = PhraseSampler(PHI_CONCEPTS, our_bank, cfg.top_k_concepts, cfg.concept_match)
    ours_rand, ref_rand = random.Random(5), random.Random(5)
    vocab = tiny.token_embedding.weight.detach()
    for batch in ([0, 1, 2, 3, 4, 5], [4, 2, 0, 5, 1, 3]):  # two batches: the random streams stay aligned
        torch.manual_seed(7)  # the same dropout masks
        losses = phi_step(tiny, phi, feats, oti_tokens, batch, cfg, sampler, ours_rand, {}, vocab)
        torch.manual_seed(7)
        ref = searle_phi_loss(tiny, ref_phi, feats[batch], oti_tokens[batch], [PHI_CONCEPTS[i] for i in batch],
                              ref_rand)
        assert abs(losses["loss"].item() - ref.item()) <= 1e-5
        phi.zero_grad()
        ref_phi.zero_grad()
        losses["loss"].backward()
        ref.backward()
        for (name, p), q in zip(phi.named_parameters(), ref_phi.parameters(), strict=True):
            assert float((p.grad - q.grad).abs().max()) <= 1e-5 * max(1.0, float(q.grad.abs().max())), name


# ----------------------------------------------------------------------------- phi sampling rules
def test_phi_phrases_draw_a_concept_uniformly_then_a_phrase():
    """Concept first: "car" (1 phrase) is drawn as often as "dog" (3), not 1 time in 4."""
    bank = {"dog": BANK["dog"], "car": BANK["car"], "tree": BANK["tree"]}
    sampler = PhraseSampler([["dog", "car", "tree"]], bank, top_k=150)
    rand = random.Random(0)
    counts = Counter(p.split()[3] for _ in range(4000) for p in sampler.draw([0], rand)[1])
    assert counts["tree"] == 0  # filtered out: redrawn
    assert 0.45 < counts["car"] / 4000 < 0.55


def test_phi_phrases_replace_every_mention_and_skip_images_without_phrases():
    sampler = PhraseSampler([["ball"], ["tree"]], {"ball": ["a photo of ball on a ball"], "tree": BANK["tree"]}, 150)
    rows, phrases, pseudo = sampler.draw([0, 1], random.Random(0))
    assert rows == [0] and phrases == ["a photo of ball on a ball"]
    assert " ".join(pseudo[0].split()) == "a photo of $ on a $"


def test_phi_training_drops_the_last_partial_batch(tiny, monkeypatch):
    calls: list[int] = []
    step = phi_training.phi_step

    def counting(*args, **kwargs):
        calls.append(len(args[4]))
        return step(*args, **kwargs)

    monkeypatch.setattr(phi_training, "phi_step", counting)
    feats = torch.randn(40, tiny.embed_dim)
    cfg = PRESETS["searle"].phi_config(epochs=2, batch_size=16)
    train_phi(tiny, feats, torch.randn(40, tiny.token_width), cfg, progress=False)
    assert calls == [16, 16, 16, 16]  # 40 = 2 x 16 + 8: the 8 are dropped each epoch
    with pytest.raises(ValueError, match="batch-size"):
        train_phi(tiny, feats[:8], torch.randn(8, tiny.token_width), cfg, progress=False)


# ----------------------------------------------------------------------------- precision (SEARLE's AMP)
def test_searle_preset_runs_searles_mixed_precision_on_cuda_and_fp32_on_cpu():
    import argparse

    from isearle.cli.common import oti_config_from
    from isearle.cli.evaluate import add_eval_arguments

    assert PRESETS["searle"].precision("cuda") == "fp16" and PRESETS["searle"].precision("cpu") == "fp32"
    assert PRESETS["isearle"].precision("cuda") is None  # the backbone's own
    p = argparse.ArgumentParser()
    add_eval_arguments(p)
    searle = p.parse_args(["--benchmark", "shapes", "--method", "oti", "--preset", "searle"])
    assert oti_config_from(searle, "oti_", device="cuda").precision == "fp16"  # `isearle eval --method oti`
    assert oti_config_from(searle, "oti_", device="cpu").precision == "fp32"
    given = p.parse_args(["--benchmark", "shapes", "--preset", "searle", "--oti-precision", "bf16"])
    assert oti_config_from(given, "oti_", device="cuda").precision == "bf16"  # an explicit option wins


def test_oti_in_fp16_with_a_grad_scaler_follows_searles_amp_loop(tiny, our_bank, monkeypatch):
    """The fp16 autocast + GradScaler path (SEARLE's on CUDA) run on the CPU against SEARLE's loop under
    the same autocast and scaler: every loss scaled before backward, the same losses and tokens up to
    fp16 rounding."""
    from isearle.precision import fp16_autocast_supported

    if not fp16_autocast_supported("cpu"):
        pytest.skip("this torch has no CPU fp16 autocast")
    feats = torch.randn(4, tiny.embed_dim, generator=torch.Generator().manual_seed(1))
    init = torch.randn(4, tiny.token_width, generator=torch.Generator().manual_seed(2)) * 0.02
    steps, seed = 6, 11
    trace, ema = searle_oti(tiny, feats, NAME_TO_CONCEPTS, init, steps, seed, amp=True)
    cfg = PRESETS["searle"].oti_config(steps=steps, seed=seed, precision="fp16")
    scales: list[float] = []
    scale = torch.amp.GradScaler.scale
    monkeypatch.setattr(torch.amp.GradScaler, "scale",
                        lambda self, out: scales.append(self.get_scale() if self.is_enabled() else 1.0) or scale(self, out))
    history: list[float] = []
    ours = invert(tiny, feats, cfg, phrase_tasks(NAME_TO_CONCEPTS, our_bank, cfg.top_k_concepts, cfg.concept_match),
                  init=init, history=history)
    assert scales == [2.0**16] * steps  # SEARLE's GradScaler, its initial scale, every step
    assert max(abs(a - b) for a, (b, _) in zip(history, trace, strict=True)) <= 5e-4
    assert float((ours - ema).abs().max()) <= 1e-4


def test_phi_step_in_fp16_autocast_follows_searles(tiny, our_bank):
    """train_phi.py's step under autocast, on the CPU: the same loss up to fp16 rounding."""
    from isearle.precision import compute_autocast, fp16_autocast_supported

    if not fp16_autocast_supported("cpu"):
        pytest.skip("this torch has no CPU fp16 autocast")
    feats, oti_tokens, phi, ref_phi = _phi_inputs(tiny)
    cfg = PRESETS["searle"].phi_config(precision="fp16")
    sampler = PhraseSampler(PHI_CONCEPTS, our_bank, cfg.top_k_concepts, cfg.concept_match)
    batch = [0, 1, 2, 3, 4, 5]
    torch.manual_seed(7)
    with compute_autocast("cpu", "fp16"):
        ours = phi_step(tiny, phi, feats, oti_tokens, batch, cfg, sampler, random.Random(5), {},
                        tiny.token_embedding.weight.detach())["loss"]
    torch.manual_seed(7)
    with torch.autocast("cpu", dtype=torch.float16):
        ref = searle_phi_loss(tiny, ref_phi, feats, oti_tokens, PHI_CONCEPTS, random.Random(5))
    assert ours.dtype == torch.float32 and abs(ours.item() - ref.item()) <= 2e-3


# ------------------------------------------------------------------------------ decoding (SEARLE's)
class SearleTargetPad:
    """src/data_utils.py TargetPad, transcribed."""

    def __init__(self, target_ratio: float, size: int) -> None:
        self.size, self.target_ratio = size, target_ratio

    def __call__(self, image):
        import torchvision.transforms.functional as FT

        w, h = image.size
        actual_ratio = max(w, h) / min(w, h)
        if actual_ratio < self.target_ratio:
            return image
        scaled_max_wh = max(w, h) / self.target_ratio
        hp = max(int((scaled_max_wh - w) / 2), 0)
        vp = max(int((scaled_max_wh - h) / 2), 0)
        return FT.pad(image, [hp, vp, hp, vp], 0, "constant")


def searle_targetpad_transform(target_ratio: float, dim: int):
    """src/data_utils.py targetpad_transform: convert("RGB") after the pad, resize and crop."""
    from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Normalize, Resize, ToTensor

    return Compose([SearleTargetPad(target_ratio, dim), Resize(dim, interpolation=InterpolationMode.BICUBIC),
                    CenterCrop(dim), lambda image: image.convert("RGB"), ToTensor(),
                    Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))])


@pytest.fixture(scope="module")
def odd_images(tmp_path_factory) -> dict[str, Path]:
    """Files that decode differently with and without SEARLE's plain PIL.Image.open: a JPEG with an EXIF
    rotation, a palette PNG with a transparent colour, an RGBA PNG (elongated: targetpad pads them),
    and a truncated JPEG."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("odd")
    x = torch.linspace(0, 255, 60).to(torch.uint8)
    rgb = torch.stack([x.expand(24, 60), x.flip(0).expand(24, 60), torch.full((24, 60), 90, dtype=torch.uint8)], -1)
    base = Image.fromarray(rgb.numpy(), "RGB")
    paths = {}
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees to display
    paths["exif"] = folder / "rotated.jpg"
    base.save(paths["exif"], quality=95, exif=exif)
    palette = base.quantize(16)
    paths["palette"] = folder / "palette.png"
    palette.save(paths["palette"], transparency=0)
    rgba = base.convert("RGBA")
    alpha = Image.new("L", base.size, 255)
    alpha.paste(0, (0, 0, 30, 24))  # the left half transparent
    rgba.putalpha(alpha)
    paths["rgba"] = folder / "rgba.png"
    rgba.save(paths["rgba"])
    big = Image.fromarray(torch.randint(0, 255, (96, 160, 3), generator=torch.Generator().manual_seed(0),
                                        dtype=torch.uint8).numpy(), "RGB")
    paths["truncated"] = folder / "truncated.jpg"
    big.save(paths["truncated"], quality=90)
    data = paths["truncated"].read_bytes()
    paths["truncated"].write_bytes(data[: len(data) * 2 // 3])
    return paths


@pytest.mark.parametrize("name", ["exif", "palette", "rgba", "truncated"])
def test_searle_decoding_equals_plain_pil_and_searles_targetpad(tiny, odd_images, name):
    """`--decode searle` gives exactly what SEARLE's datasets give: PIL.Image.open, no EXIF transpose,
    no compositing, RGB last, truncated files read as far as they go (LOAD_TRUNCATED_IMAGES); the
    "robust" decoding differs on each fixture (so each fixture tests something)."""
    from PIL import Image, ImageFile

    from isearle.images import BadImage, ImageList

    path = odd_images[name]
    before = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = True  # oti_inversion.py / image_concepts_association.py
    try:
        reference = searle_targetpad_transform(1.25, tiny.image_size)(Image.open(path))
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = before
    _, ours, error = ImageList([path], tiny.preprocess, decode="searle")[0]
    assert error == "" and torch.equal(ours, reference)
    assert ImageFile.LOAD_TRUNCATED_IMAGES == before  # the flag is not left on for other decodings
    if name == "truncated":
        with pytest.raises(BadImage):
            ImageList([path], tiny.preprocess, decode="robust")[0]
    else:
        _, robust, _ = ImageList([path], tiny.preprocess, decode="robust")[0]
        assert not torch.equal(robust, reference)


def test_searle_decoding_is_the_preset_and_the_evaluation_default():
    import argparse

    from isearle.cli.evaluate import add_eval_arguments

    assert PRESETS["searle"].decode == "searle" and PRESETS["isearle"].decode == "robust"
    p = argparse.ArgumentParser()
    add_eval_arguments(p)
    assert p.parse_args(["--benchmark", "shapes"]).decode == "searle"
