"""The method in a few calls, for a notebook: invert an image into S*, encode a composed query, search.

    backbone = load_backbone("ViT-L-14", "openai");  phi = load_phi("searle-xl")
    token = invert_image(backbone, "dog.jpg", phi=phi)            # or oti=OTIConfig(...)
    query = encode_query(backbone, token, "is a cat instead")
    hits = search(open_gallery("gallery_index"), query, k=10)

These are thin: the same session (`isearle.service.Session`) serves the CLI, the demo and the
inspector; `load_service(folder)` opens one over a gallery.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

from isearle.backbone import Backbone
from isearle.images import open_image
from isearle.index import GalleryIndex
from isearle.oti import OTIConfig
from isearle.phi import Phi
from isearle.pseudo_word import encode_with_pseudo_tokens, fill_template
from isearle.retrieval import Hit, rank
from isearle.service import Session
from isearle.templates import DEFAULT_TEMPLATE


def invert_image(backbone: Backbone, image: str | Path | bytes | Image.Image, phi: Phi | None = None,
                 oti: OTIConfig | None = None, progress: bool = False) -> torch.Tensor:
    """The pseudo-word S* [W] of one image: by `phi` (one forward pass), or by OTI when `oti` is given
    (warm-started from `phi` when both are)."""
    session = Session(backbone, None, phi, cache_size=1)
    return session.retriever.pseudo_token(open_image(image), "phi" if oti is None else "oti", oti, progress)


def encode_query(backbone: Backbone, token: torch.Tensor, caption: str, template: str = DEFAULT_TEMPLATE
                 ) -> torch.Tensor:
    """The normalised composed query feature [D] of "a photo of S* that {caption}"."""
    prompt = fill_template(template, caption)
    return F.normalize(encode_with_pseudo_tokens(backbone, [prompt], token), dim=-1)[0]


def open_gallery(directory: str | Path, backbone: Backbone | None = None) -> GalleryIndex:
    """A gallery index built by `isearle index` (memory-mapped); checked against `backbone` when given."""
    return GalleryIndex.load(directory, expect_backbone=backbone)


def search(gallery: Any, query: torch.Tensor, k: int = 10, exclude: Sequence[str] = ()) -> list[Hit]:
    """The top-k gallery items of a query feature: `Hit(rank, id, score, metadata)`, best first."""
    return rank(gallery, query, k, exclude)
