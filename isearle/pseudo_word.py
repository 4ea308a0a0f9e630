"""Pseudo-word text encoding: CLIP's text tower with the placeholder "$" replaced by S*.

"a photo of $ that is blue" is tokenised as usual; the token embedding of "$" (id 259 for CLIP's
BPE) is swapped for a pseudo-token before the transformer (`backbone.encode_tokens`, which runs
only up to the batch's last end-of-text token: exact under the causal mask, and several times
faster for short prompts).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch

from isearle.backbone import PLACEHOLDER, Backbone, encode_tokens

_PLACEHOLDER_RE = re.compile(r"\s*" + re.escape(PLACEHOLDER) + r"\s*")


def normalize_prompt(prompt: str) -> str:
    """Put spaces around every "$" so that the BPE keeps it a standalone token ("$," -> "$ ,")."""
    return " ".join(_PLACEHOLDER_RE.sub(f" {PLACEHOLDER} ", prompt).split())


def fill_template(template: str, caption: str) -> str:
    """The query prompt for one relative caption, e.g. "a photo of $ that {}" -> "... that is blue"."""
    if PLACEHOLDER in caption:
        raise ValueError(f'the caption may not contain the placeholder "{PLACEHOLDER}": remove it')
    if template.count(PLACEHOLDER) != 1:
        raise ValueError(f'the template must hold exactly one "{PLACEHOLDER}": {template!r}')
    return normalize_prompt(template.replace("{}", caption.strip()) if "{}" in template else template)


def tokenize_prompts(backbone: Backbone, prompts: Sequence[str], placeholder: bool = True,
                     repeats: bool = False) -> torch.Tensor:
    """Tokenise prompts; with `placeholder`, check every row holds exactly one "$" token (at least
    one with `repeats`: SEARLE's phi-training phrases, where S* takes the first)."""
    prompts = [normalize_prompt(p) for p in prompts]
    tokens = backbone.tokenize(prompts)
    if placeholder:
        counts = (tokens == backbone.placeholder_id).sum(dim=1)
        bad = [p for p, c in zip(prompts, counts.tolist(), strict=True) if c < 1 or (c > 1 and not repeats)]
        if bad:
            raise ValueError(f'prompt must hold exactly one standalone "{PLACEHOLDER}": {bad[0]!r}')
    return tokens


def truncated(backbone: Backbone, text: str) -> bool:
    """Whether `text` is longer than the text tower's context (the tokenizer cuts it)."""
    ids = backbone.tokenizer.encode(normalize_prompt(text)) if hasattr(backbone.tokenizer, "encode") else None
    if ids is None:
        return False
    return len(ids) + 2 > backbone.context_length


def encode_with_pseudo_tokens(
    backbone: Backbone,
    prompts: Sequence[str],
    pseudo_tokens: torch.Tensor,
    truncate: bool = True,
) -> torch.Tensor:
    """Un-normalised features of prompts holding "$", each with its pseudo-token (or one for all)."""
    tokens = tokenize_prompts(backbone, prompts)
    with backbone.autocast:
        return encode_tokens(backbone, tokens, pseudo_tokens, truncate=truncate).float()
