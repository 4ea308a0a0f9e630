"""The token vocabulary seen from a pseudo-word: readable BPE pieces, nearest tokens of S*, and
the tokens a small shapes-world model was trained on (the rest of its table never moved)."""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any

import torch

from isearle.backbone import Backbone

SHAPES_MODELS = ("isearle-shapes", "isearle-tiny-test")


def readable_token(tokenizer: Any, token_id: int) -> str:
    """A BPE piece as a readable word: "blue</w>" -> "blue", a word start "blu" -> "blu-"."""
    decoder = getattr(tokenizer, "decoder", None)
    byte_decoder = getattr(tokenizer, "byte_decoder", None)
    if isinstance(decoder, dict) and byte_decoder is not None:
        piece = decoder.get(int(token_id), "")
        end = piece.endswith("</w>")
        piece = piece[:-4] if end else piece
        raw = bytes(byte_decoder.get(c, 0x3F) for c in piece)
        try:
            word = raw.decode("utf-8")
        except UnicodeDecodeError:
            word = "⟨" + raw.hex(" ") + "⟩"  # part of a multi-byte character
        return word if end else word + "-"
    inner = getattr(tokenizer, "tokenizer", None)  # open_clip's HFTokenizer
    if inner is not None and hasattr(inner, "convert_ids_to_tokens"):
        return str(inner.convert_ids_to_tokens(int(token_id))).replace("</w>", "").replace("Ġ", "")
    return f"#{int(token_id)}"


def _world_strings() -> Iterable[str]:
    """Word lists of the shapes world's caption grammar (every caption is built from these)."""
    from isearle.shapes import captions as c
    from isearle.shapes import world as w

    for table in (w.SHAPES, w.COLOURS, w.BACKGROUNDS, w.PATTERNS, c.PREFIXES, c.THING_WORDS):
        yield from table
    for table in (c.SIZE_WORDS, c.COMPARATIVES, c.POSITION_PHRASES, c.MOVE_PHRASES):
        for words in table.values():
            yield from words


@functools.lru_cache(maxsize=4)
def world_token_ids(tokenizer: Any, n_captions: int = 3000, seed: int = 0) -> frozenset[int]:
    """Token ids of the shapes world's captions: the rows of a shapes model's table that training moved.

    The tiny CLIP was trained on captions drawn from the world's grammar only, so a deterministic
    sample of them (every form, every edit) plus the grammar's word lists covers its vocabulary.
    """
    import random

    from isearle.shapes.captions import caption, edit_scene, relative_caption, vocabulary
    from isearle.shapes.world import EDIT_TYPES, random_scene

    rng = random.Random(seed)
    texts = list(_world_strings()) + vocabulary()
    texts += [caption(random_scene(rng), rng, (1, 1, 1, 1)) for _ in range(n_captions)]
    for i in range(n_captions // 2):  # every edit, stated both ways: the rarer clause forms
        ref = random_scene(rng, n_objects=1 + i % 2)
        _, changes = edit_scene(ref, EDIT_TYPES[i % len(EDIT_TYPES)], rng)
        texts.append(relative_caption(ref, changes, rng, imperative=bool(i // len(EDIT_TYPES) % 2)))
    ids: set[int] = set()
    for text in texts:
        ids.update(tokenizer.encode(text))
    return frozenset(ids)


def trained_token_ids(backbone: Backbone) -> frozenset[int] | None:
    """The token ids a small model was trained on (the shapes world's vocabulary), None for real CLIPs."""
    if backbone.name in SHAPES_MODELS and hasattr(backbone.tokenizer, "encode"):
        return world_token_ids(backbone.tokenizer)
    return None


class TokenTable:
    """Cosine between a pseudo-token and every row of a backbone's token-embedding table."""

    def __init__(self, backbone: Backbone) -> None:
        self.backbone = backbone
        weight = backbone.token_embedding.weight
        with torch.inference_mode():
            self.inv_norm = 1.0 / weight.float().norm(dim=1).clamp_min(1e-8)
            self.median_norm = float(weight.float().norm(dim=1).median())
        tok = backbone.tokenizer
        special = {getattr(tok, "sot_token_id", None), getattr(tok, "eot_token_id", None), backbone.placeholder_id}
        self.excluded = torch.tensor(sorted(i for i in special if i is not None), dtype=torch.long)

    @torch.inference_mode()
    def nearest(self, token: torch.Tensor, k: int = 10, allowed: Iterable[int] | None = None
                ) -> list[tuple[str, float]]:
        """The k most similar vocabulary tokens (readable, cosine), among `allowed` ids when given."""
        weight = self.backbone.token_embedding.weight
        t = token.to(weight.device).float()
        sims = (weight.float() @ t) * self.inv_norm.to(weight.device) / t.norm().clamp_min(1e-8)
        sims[self.excluded.to(weight.device)] = -2.0
        if allowed is not None:
            mask = torch.full_like(sims, -2.0)
            idx = torch.tensor(sorted(allowed), dtype=torch.long, device=sims.device)
            mask[idx] = sims[idx]
            mask[self.excluded.to(weight.device)] = -2.0
            sims = mask
        scores, ids = sims.topk(k)
        return [(readable_token(self.backbone.tokenizer, i), float(s))
                for s, i in zip(scores.tolist(), ids.tolist(), strict=True) if s > -2.0]
