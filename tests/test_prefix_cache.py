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
