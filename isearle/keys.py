"""One key for every disk cache: an entry is reused only when everything that changes its values matches.

A key names the backbone's weights (`weights.weights_fingerprint`: a local file's digest, or the hub
tag) and digests every setting that changes the cached values: precision, decoding/preprocessing,
templates, OTI settings, the cache's format version. Two runs that differ in any of them get two
keys, so an fp16 run is never read back by an fp32 one. Random-init weights have no key (never cached).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from isearle.paths import slug
from isearle.weights import weights_fingerprint


def settings_digest(settings: dict[str, Any]) -> str:
    """A short stable digest of a settings dict (key order and tuple/list spelling do not matter)."""
    text = json.dumps(settings, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


def cache_key(model: str, pretrained: str | None, **settings: Any) -> str | None:
    """`{model}__{weights}__{digest of settings}`, file-name safe; None for random-init weights."""
    fingerprint = weights_fingerprint(pretrained)
    if fingerprint is None:
        return None
    return f"{slug(model)}__{slug(fingerprint)}__{settings_digest(settings)}"
