"""Which weights a backbone runs: the local file behind a pretrained tag, and a short fingerprint of it.

Caches keyed by a fingerprint (benchmark features, OTI tokens, concept banks, the offline gallery's
staleness check) never meet the outputs of other weights that share a tag, e.g. a retrained
bundled model. This is the one place that decides a weights identity.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

from isearle import paths
from isearle.backbone import BUNDLED_WEIGHTS


def weights_file(pretrained: str | None) -> Path | None:
    """The local file behind a pretrained tag (a path, or a bundled tag), None for hub tags."""
    if pretrained is None:
        return None
    path = Path(pretrained) if Path(pretrained).is_file() else paths.ASSETS_DIR / BUNDLED_WEIGHTS.get(pretrained, "-")
    return path if path.is_file() else None


def file_digest(path: str | Path) -> str:
    """12 hex digits of a file: its content up to 256 MiB (a copy keeps it, retraining changes it),
    else where it is and when it was written (large checkpoints). Cached per path, size and mtime."""
    path = Path(path).resolve()
    st = path.stat()
    return _digest(str(path), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _digest(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.blake2b(digest_size=6)
    if size <= 256 * 2**20:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    else:
        h.update(f"{path}:{size}:{mtime_ns}".encode())
    return h.hexdigest()


def weights_fingerprint(pretrained: str | None) -> str | None:
    """The one id of a backbone's weights in cache keys and gallery headers: None for random init
    (never cached), a local file's digest (bundled tag or checkpoint path), else the hub tag."""
    if pretrained is None:
        return None
    path = weights_file(pretrained)
    return paths.slug(str(pretrained)) if path is None else file_digest(path)
