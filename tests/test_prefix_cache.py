"""The prefix-cached, packed encoder equals the plain pseudo-word encoder (features and gradients)."""

import pytest
import torch

from isearle.oti import TEMPLATES
from isearle.prefix_cache import PrefixCache, supported
from isearle.pseudo_word import encode_tokens, tokenize_prompts

PHRASES = ["$ on a table", "a red $ that sits on a chair next to a window", "two $ and a cat",
           "the old wooden $", "a photo of $", "this is a picture of $ in the snow at night"]
TOL = 2e-5


@pytest.mark.parametrize("name", ["tiny", "vitb32"])
def test_prefix_cache_equals_the_full_pass(name, request):
    backbone = request.getfixturevalue(name)
    assert supported(backbone)
    tokens = tokenize_prompts(backbone, [*TEMPLATES, *PHRASES])
    cache = PrefixCache(backbone, tokens)
    assert cache.distinct < len(tokens)  # shared prefixes ("a photo of") are computed once
    rows = [0, 3, 20, 21, 25, 22, 0, 24, 23, 5, 20]  # repeats, any order, "$" right after <sot> (row 20)
    torch.manual_seed(0)
    pseudo = torch.nn.Parameter(torch.randn(len(rows), backbone.token_width) * 0.05)
    fast = cache.encode(rows, pseudo)
    plain = encode_tokens(backbone, tokens[rows], pseudo)
    assert fast.shape == plain.shape == (len(rows), backbone.embed_dim)
    assert float((fast - plain).detach().abs().max() / plain.detach().abs().max()) <= TOL
    weights = torch.randn_like(plain)
    g_fast = torch.autograd.grad((fast * weights).sum(), pseudo)[0]
    g_plain = torch.autograd.grad((plain * weights).sum(), pseudo)[0]
    assert float((g_fast - g_plain).abs().max() / g_plain.abs().max()) <= TOL
    # each row's own S* matters, and only its own
    other = pseudo.detach().clone()
    other[2] += torch.randn(backbone.token_width) * 0.5  # (a constant shift would vanish in LayerNorm)
    moved = cache.encode(rows, other)
    assert float((moved[2] - fast[2]).abs().max()) > 1e-3
    assert float((torch.cat([moved[:2], moved[3:]]) - torch.cat([fast[:2], fast[3:]])).abs().max()) <= 1e-6


CAPTIONS = ["is blue", "shows the same car but at night with the lights on", "has two dogs , on a beach",
            "word " * 90]  # the last is cut at the context length: its end-of-text sits at position 76


def _retriever(backbone, template="a photo of $ that {}"):
    from isearle.index import GalleryIndex
    from isearle.retrieval import Retriever

    vectors = torch.nn.functional.normalize(torch.randn(30, backbone.embed_dim), dim=-1)
    return Retriever(backbone, GalleryIndex.build(vectors, [str(i) for i in range(30)], None), template=template)


@pytest.mark.parametrize("name", ["tiny", "vitb32"])
def test_warm_query_runs_the_caption_on_the_cached_prompt_start(name, request, monkeypatch):
    """A reference's "<sot> a photo of S* that" is kept from its first query's pass; each later
    caption runs alone on its keys/values. Every feature equals the full pass's (fp32 rounding)."""
    from isearle import prefix_cache
    from isearle.pseudo_word import encode_with_pseudo_tokens, fill_template

    backbone = request.getfixturevalue(name)
    retriever = _retriever(backbone)
    used, built = [], []
    encode, init = prefix_cache.PromptPrefix.encode, prefix_cache.PromptPrefix.__init__
    monkeypatch.setattr(prefix_cache.PromptPrefix, "encode", lambda self, t, engine=None: used.append(1) or encode(self, t, engine))
    monkeypatch.setattr(prefix_cache.PromptPrefix, "__init__", lambda self, *a: built.append(1) or init(self, *a))
    torch.manual_seed(1)
    for key in ("ref-a", "ref-b"):
        token = torch.randn(backbone.token_width) * 0.05
        for caption in CAPTIONS:
            with torch.inference_mode():
                fast = retriever.prompt_feature(key, token, caption)
                plain = encode_with_pseudo_tokens(backbone, [fill_template(retriever.template, caption)], token)[0]
            assert float((fast - plain).abs().max() / plain.abs().max()) <= TOL, caption
    # one prefix per reference, kept by its first query's full pass; every later caption runs on it
    assert len(built) == 2 and len(used) == 2 * (len(CAPTIONS) - 1)


def test_templates_whose_placeholder_follows_the_caption_take_the_full_pass(tiny):
    from isearle.pseudo_word import encode_with_pseudo_tokens, fill_template

    retriever = _retriever(tiny, template="{} , like $")
    token = torch.randn(tiny.token_width) * 0.05
    with torch.inference_mode():
        got = retriever.prompt_feature("ref", token, "is blue")
        want = encode_with_pseudo_tokens(tiny, [fill_template(retriever.template, "is blue")], token)[0]
    assert torch.equal(got, want) and retriever.prefixes.get("ref") is None


def test_a_new_oti_run_replaces_the_cached_prompt_start(tiny):
    """The prefix holds S*: after OTI re-runs for a reference, queries use the new S*, not the old prefix."""
    from PIL import Image

    from isearle.oti import OTIConfig
    from isearle.pseudo_word import encode_with_pseudo_tokens, fill_template

    retriever = _retriever(tiny)
    image = Image.new("RGB", (64, 48), "red")
    oti = OTIConfig(steps=3, batch_size=1)
    with torch.inference_mode():
        retriever.query_feature(image, "is blue", "oti", oti)
    key = retriever._token_key(retriever.image_features(image)[0], "oti", oti)
    assert retriever.prefixes.get(key) is not None
    for _ in retriever.oti_steps(image, oti, warm=True):  # a new run (e.g. the inspector's), cached at its end
        pass
    assert retriever.prefixes.get(key) is None
    token = retriever.tokens.get(key)
    with torch.inference_mode():
        got = retriever.query_feature(image, "is green", "oti", oti)
        want = encode_with_pseudo_tokens(tiny, [fill_template(retriever.template, "is green")], token)[0]
    assert float((got - torch.nn.functional.normalize(want, dim=-1)).abs().max()) <= 1e-5
