"""The shapes world's vocabulary: the tokens its small models were trained on (the rest of their
token-embedding table never moved), so that nearest-token lists can leave the untrained rows out."""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any

#: The models trained on the shapes world alone (their trained vocabulary is the world's).
SHAPES_MODELS = ("isearle-shapes", "isearle-tiny-test")


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


def trained_token_ids(backbone: Any) -> frozenset[int] | None:
    """The token ids a small model was trained on (the shapes world's vocabulary), None for real CLIPs."""
    if backbone.name in SHAPES_MODELS and hasattr(backbone.tokenizer, "encode"):
        return world_token_ids(backbone.tokenizer)
    return None
