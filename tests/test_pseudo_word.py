"""Pseudo-word encoding: S* in place of "$", truncated context, batching, prompt normalisation."""

import pytest
import torch

from isearle.pseudo_word import (
    encode_tokens,
    encode_with_pseudo_tokens,
    fill_template,
    normalize_prompt,
    tokenize_prompts,
    truncated,
)

TOL = 1e-5
BACKBONES = ["tiny", "vitb32"]  # random-init tiny model, and the paper's ViT-B/32 text tower shape

PROMPTS = [
    "a photo of $",
    "$",
    "a photo of $ that is red and has a long tail and sits on a wooden chair next to a window",
    "this is a picture of a $ in the snow",
]


def _word_embedding(backbone, word: str) -> torch.Tensor:
    ids = backbone.tokenize([word])[0]
    inner = ids[1 : int(ids.argmax())]
    assert inner.numel() == 1, f"{word!r} must be a single BPE token for this test"
    return backbone.token_embedding.weight[int(inner[0])].detach().clone()


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


@pytest.mark.parametrize("name", BACKBONES)
def test_dog_token_as_pseudo_word_equals_the_word(name, request):
    backbone = request.getfixturevalue(name)
    dog = _word_embedding(backbone, "dog")
    with torch.no_grad():
        pseudo = encode_with_pseudo_tokens(backbone, ["a photo of $"], dog[None])
        plain = backbone.encode_texts(["a photo of dog"])
        # open_clip's own text encoder over the full context is the independent reference
        reference = backbone.model.encode_text(backbone.tokenize(["a photo of dog"]))
    assert pseudo.dtype == torch.float32 and pseudo.shape == (1, backbone.embed_dim)
    assert _max_diff(pseudo, plain) <= TOL
    assert _max_diff(pseudo, reference) <= TOL
    # and S* matters: another word's embedding gives another feature
    cat = _word_embedding(backbone, "cat")
    with torch.no_grad():
        other = encode_with_pseudo_tokens(backbone, ["a photo of $"], cat[None])
    assert _max_diff(other, pseudo) > 1e-3


@pytest.mark.parametrize("name", BACKBONES)
def test_truncated_context_equals_full_context(name, request):
    backbone = request.getfixturevalue(name)
    plain = ["a photo of a dog", "dog", "a photo of a dog that is red and has a long tail and sits on a chair"]
    tokens = backbone.tokenize(plain)
    torch.manual_seed(1)
    pseudo = torch.randn(len(PROMPTS), backbone.token_width) * 0.02
    pseudo_ids = tokenize_prompts(backbone, PROMPTS)
    with torch.no_grad():
        short = encode_tokens(backbone, tokens, truncate=True)
        full = encode_tokens(backbone, tokens, truncate=False)
        reference = backbone.model.encode_text(tokens)  # open_clip's own, full context
        p_full = encode_tokens(backbone, pseudo_ids, pseudo, truncate=False)
        p_short = encode_with_pseudo_tokens(backbone, PROMPTS, pseudo, truncate=True)
    assert short.shape == (3, backbone.embed_dim) and p_short.shape == (len(PROMPTS), backbone.embed_dim)
    assert _max_diff(short, full) <= TOL
    assert _max_diff(full, reference) <= TOL
    assert _max_diff(p_short, p_full) <= TOL


def test_mixed_batch_equals_one_by_one(tiny):
    torch.manual_seed(2)
    pseudo = torch.randn(len(PROMPTS), tiny.token_width) * 0.05
    with torch.no_grad():
        batch = encode_with_pseudo_tokens(tiny, PROMPTS, pseudo)
        single = torch.cat([encode_with_pseudo_tokens(tiny, [p], pseudo[i : i + 1]) for i, p in enumerate(PROMPTS)])
    assert batch.shape == (len(PROMPTS), tiny.embed_dim)
    assert _max_diff(batch, single) <= TOL
    # rows with the same prompt but different tokens differ: each row gets its own S*
    with torch.no_grad():
        two = encode_with_pseudo_tokens(tiny, ["a photo of $", "a photo of $"], pseudo[:2])
    assert _max_diff(two[0], two[1]) > 1e-4


def test_mixed_batch_equals_one_by_one_vitb32(vitb32):
    torch.manual_seed(3)
    pseudo = torch.randn(len(PROMPTS), vitb32.token_width) * 0.02
    with torch.no_grad():
        batch = encode_with_pseudo_tokens(vitb32, PROMPTS, pseudo)
        single = torch.cat([encode_with_pseudo_tokens(vitb32, [p], pseudo[i : i + 1]) for i, p in enumerate(PROMPTS)])
    assert _max_diff(batch, single) <= TOL


@pytest.mark.parametrize("name", BACKBONES)
def test_broadcast_pseudo_token_equals_repeated_rows(name, request):
    backbone = request.getfixturevalue(name)
    torch.manual_seed(4)
    token = torch.randn(backbone.token_width) * 0.02
    with torch.no_grad():
        broadcast = encode_with_pseudo_tokens(backbone, PROMPTS, token)
        repeated = encode_with_pseudo_tokens(backbone, PROMPTS, token.expand(len(PROMPTS), -1).clone())
    assert broadcast.shape == (len(PROMPTS), backbone.embed_dim)
    assert _max_diff(broadcast, repeated) <= TOL


def test_pseudo_token_receives_gradient(tiny):
    v = torch.nn.Parameter(torch.randn(2, tiny.token_width) * 0.02)
    feats = encode_with_pseudo_tokens(tiny, ["a photo of $", "$ on the grass"], v)
    feats.sum().backward()
    assert v.grad is not None and torch.all(v.grad.abs().sum(dim=1) > 0)


# ------------------------------------------------------------------------------ prompt checks
@pytest.mark.parametrize("prompt", ["$,", "a $.", "a photo of $, on the grass", "a photo of$that is red"])
def test_placeholder_is_normalised_to_a_standalone_token(tiny, prompt):
    assert tiny.placeholder_id == 259
    normalised = normalize_prompt(prompt)
    assert " $ " in f" {normalised} "
    ids = tokenize_prompts(tiny, [prompt])[0]
    assert int((ids == 259).sum()) == 1


def test_raw_punctuated_placeholder_is_not_token_259(tiny):
    """Why normalisation is needed: the BPE merges "$," and "a $." into other ids."""
    for raw in ("$,", "a $."):
        assert int((tiny.tokenize([raw])[0] == 259).sum()) == 0


def test_normalize_prompt_is_idempotent_and_collapses_spaces():
    assert normalize_prompt("a photo of $.") == "a photo of $ ."
    assert normalize_prompt("  a   $,  b ") == "a $ , b"
    assert normalize_prompt(normalize_prompt("x$y")) == "x $ y"


@pytest.mark.parametrize("prompt", ["a photo of a dog", "a photo of $ and $", "$$"])
def test_prompt_without_exactly_one_placeholder_is_rejected(tiny, prompt):
    with pytest.raises(ValueError, match="exactly one"):
        tokenize_prompts(tiny, [prompt])
    with pytest.raises(ValueError):
        encode_with_pseudo_tokens(tiny, ["a photo of $", prompt], torch.zeros(tiny.token_width))


def test_plain_prompts_skip_the_placeholder_check(tiny):
    tokens = tokenize_prompts(tiny, ["a photo of a dog"], placeholder=False)
    assert tokens.shape == (1, tiny.context_length)


def test_fill_template():
    assert fill_template("a photo of $ that {}", " is blue ") == "a photo of $ that is blue"
    assert fill_template("a photo of $, {}", "red") == "a photo of $ , red"


@pytest.mark.parametrize("caption", ["is $ cheaper", "$", "costs 5$"])
def test_caption_with_placeholder_is_rejected(caption):
    with pytest.raises(ValueError, match="caption"):
        fill_template("a photo of $ that {}", caption)


@pytest.mark.parametrize("template", ["a photo of that {}", "a $ photo of $ that {}"])
def test_template_without_exactly_one_placeholder_is_rejected(template):
    with pytest.raises(ValueError):
        fill_template(template, "is blue")


def test_truncated_detects_prompts_longer_than_the_context(tiny):
    assert not truncated(tiny, "a photo of $ that is blue")
    assert truncated(tiny, "a photo of $ that " + "is very very blue " * 30)
