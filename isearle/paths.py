"""Where things are: the repository, its assets, model configs and the user's cache.

Every environment variable naming a place is read here, once, at import:
`ISEARLE_ASSETS` (default `<repo>/assets`) and `ISEARLE_CACHE` (default `~/.cache/isearle`).
Modules use the attributes at call time (`paths.CACHE_DIR`), so tests can point them elsewhere.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
REPO_DIR = PACKAGE_DIR.parent
CONFIG_DIR = PACKAGE_DIR / "model_configs"
ASSETS_DIR = Path(os.environ.get("ISEARLE_ASSETS", REPO_DIR / "assets"))
#: Concept banks, official weights, vocabularies, benchmark features and OTI tokens.
CACHE_DIR = Path(os.environ.get("ISEARLE_CACHE", Path.home() / ".cache" / "isearle"))


def slug(text: str) -> str:
    """A short file-name-safe form of `text` (lower case, [a-z0-9._-], at most 60 characters)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-").lower()[:60] or "gallery"


def public_name(value: object) -> str | None:
    """How a file or folder is named to users and in files that travel (API answers, exported
    metadata, reports): relative to the project or the working folder when under one, else its
    folder and its name; never an absolute server path. Tags and names that are not paths pass unchanged."""
    if value is None:
        return None
    text = str(value)
    path = Path(text)
    if not path.is_absolute():
        return text
    resolved = path.resolve()
    for root in (REPO_DIR, Path.cwd()):
        try:
            return str(resolved.relative_to(root.resolve()))
        except ValueError:
            continue
    return str(Path(*[p for p in path.parts[-2:] if p != path.anchor]))
