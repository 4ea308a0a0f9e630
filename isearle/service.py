"""The query service behind `isearle query` and the demo: backbone + gallery index + phi, loaded once.

A gallery index remembers the backbone that embedded it; the service loads that backbone (or
refuses a different one), the default phi for it (the project's shapes phi for the offline world,
official SEARLE for OpenAI ViT-B/32 and ViT-L/14), and the concept bank used by the pseudo-word panel.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from isearle.backbone import Backbone, canonical_name, load_backbone
from isearle.oti import OTIConfig
from isearle.phi import Phi, resolve_phi
from isearle.retrieval import Retriever


@dataclass
class Service:
    """Everything a query needs, loaded once: the cached `Retriever` (backbone, index, phi) and phi's name."""

    retriever: Retriever
    phi_name: str | None

    @property
    def backbone(self) -> Backbone:
        return self.retriever.backbone

    @property
    def index(self) -> Any:
        return self.retriever.index

    @property
    def phi(self) -> Phi | None:
        return self.retriever.phi

    def oti_config(self, steps: int = OTIConfig.steps) -> OTIConfig:
        """One-image OTI with the settings that made this phi's targets (e.g. the shapes world's norm cap)."""
        settings = self.phi.oti_settings if self.phi is not None else {}
        return OTIConfig(steps=int(steps), batch_size=1, **settings)


def load_service(gallery: str | Path = "gallery_index", model: str | None = None, pretrained: str | None = None,
                 phi: str | None = None, device: str | None = None, cache_size: int = 256,
                 backbone: Backbone | None = None, precision: str = "fp32") -> Service:
    """Open a gallery index, the backbone that embedded it (or `backbone`, checked) and a phi.

    `phi` names one ("searle", "searle-xl", a checkpoint); by default the backbone's own, if it can
    be had. `precision` is the query path's ("auto" measures fp32 and bf16 on a warm-up query, see
    `isearle.precision`; OTI stays fp32). Raises FileNotFoundError / ValueError / WeightsUnavailable.
    """
    from isearle.index import GalleryIndex

    gallery = Path(gallery)
    if not (gallery / "index.json").is_file() and not any(gallery.glob("*.faiss")):
        raise FileNotFoundError(f"no gallery index in {gallery}: build one with `isearle index`")
    index = GalleryIndex.load(gallery, expect_backbone=backbone)
    if backbone is None:
        info = index.info
        pretrained = pretrained or info.get("pretrained")
        model = canonical_name(model or info.get("model"), pretrained)  # the index records the QuickGELU name
        if (model, pretrained) != (info.get("model"), info.get("pretrained")):
            raise ValueError(f"gallery {gallery} was embedded with {info.get('model')}/{info.get('pretrained')}, "
                             f"not {model}/{pretrained}: rebuild it with `isearle index --model {model}`")
        backbone = load_backbone(model, pretrained, device)
    phi_net, phi_name = resolve_phi(backbone, phi)
    return Service(Retriever(backbone, index, phi_net, cache_size=cache_size, precision=precision), phi_name)
