"""isearle: zero-shot composed image retrieval by textual inversion (SEARLE / iSEARLE).

The public API, for use from Python (README: "Use from Python"):

- `load_backbone(model, pretrained, device)`: a CLIP (open_clip name + weights tag or file);
- `load_phi(spec, device)`: phi, the textual inversion network ("searle", "searle-xl" or a checkpoint);
- `invert_image(backbone, image, phi=..., oti=OTIConfig(...))`: the pseudo-word S* of an image;
- `encode_query(backbone, token, caption)`: the composed query feature of "a photo of S* that ...";
- `open_gallery(folder)`, `search(gallery, query, k)`: a FAISS gallery index and its top-k hits;
- `load_service(folder)`: all of it at once, cached (what the CLI and the demo use).

Names are imported on first use, so that `import isearle` and `isearle --help` stay fast. The
README's module table and "Architecture" section say where everything else lives.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_API = {
    "load_backbone": "isearle.backbone",
    "load_phi": "isearle.phi",
    "OTIConfig": "isearle.oti",
    "invert_image": "isearle.api",
    "encode_query": "isearle.api",
    "open_gallery": "isearle.api",
    "search": "isearle.api",
    "load_service": "isearle.service",
}
__all__ = ["OTIConfig", "encode_query", "invert_image", "load_backbone", "load_phi", "load_service", "open_gallery",
           "search"]

if TYPE_CHECKING:
    from isearle.api import encode_query, invert_image, open_gallery, search
    from isearle.backbone import load_backbone
    from isearle.oti import OTIConfig
    from isearle.phi import load_phi
    from isearle.service import load_service


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'isearle' has no attribute {name!r}")
