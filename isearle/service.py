"""The query service behind `isearle query` and the demo: backbone + gallery index + phi, loaded once.

A gallery index remembers the backbone that embedded it; the service loads that backbone (or
refuses a different one), the default phi for it (the project's shapes phi for the offline world,
official SEARLE for OpenAI ViT-B/32 and ViT-L/14), and the concept bank used by the pseudo-word panel.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from isearle.backbone import (
    ASSETS_DIR,
    QUICKGELU_ALIASES,
    Backbone,
    WeightsUnavailable,
    cpu_quota,
    load_backbone,
)
from isearle.oti import OTIConfig
from isearle.phi import Phi, load_phi
from isearle.retrieval import Retriever

#: Default phi per (model, pretrained) when none is given.
DEFAULT_PHI = {
    ("isearle-shapes", "isearle-shapes"): str(ASSETS_DIR / "models" / "isearle-shapes-phi.safetensors"),
    ("ViT-B-32-quickgelu", "openai"): "searle",
    ("ViT-L-14-quickgelu", "openai"): "searle-xl",
}


def set_threads() -> int:
    """torch threads = the real CPU quota (cgroup cpu.max), faiss single-threaded for one query."""
    quota = cpu_quota()
    torch.set_num_threads(quota)
    try:
        import faiss

        faiss.omp_set_num_threads(1)
    except ImportError:
        pass
    return quota


@dataclass
class Service:
    """Everything a query needs, loaded once."""

    backbone: Backbone
    index: object
    retriever: Retriever
    phi: Phi | None
    phi_name: str | None

    def oti_config(self, steps: int = OTIConfig.steps) -> OTIConfig:
        """One-image OTI with the settings that made this phi's targets (e.g. the shapes world's norm cap)."""
        settings = self.phi.oti_settings if self.phi is not None else {}
        return OTIConfig(steps=int(steps), batch_size=1, **settings)


def load_service(gallery: str | Path = "gallery_index", model: str | None = None, pretrained: str | None = None,
                 phi: str | None = None, device: str | None = None) -> Service:
    """Load the gallery index, its backbone and a phi; raise WeightsUnavailable with what to do."""
    from isearle.index import GalleryIndex

    gallery = Path(gallery)
    if not (gallery / "index.json").is_file() and not any(gallery.glob("*.faiss")):
        raise FileNotFoundError(f"no gallery index in {gallery}: build one with `isearle index`")
    index = GalleryIndex.load(gallery)
    info = index.info
    model = model or info.get("model")
    pretrained = pretrained or info.get("pretrained")
    if pretrained == "openai":  # the index records the QuickGELU name load_backbone resolves to
        model = QUICKGELU_ALIASES.get(model, model)
    if (model, pretrained) != (info.get("model"), info.get("pretrained")):
        raise ValueError(f"gallery {gallery} was embedded with {info.get('model')}/{info.get('pretrained')}, "
                         f"not {model}/{pretrained}: rebuild it with `isearle index --model {model}`")
    backbone = load_backbone(model, pretrained, device)
    phi_net, phi_name = resolve_phi(backbone, phi)
    return Service(backbone, index, Retriever(backbone, index, phi_net), phi_net, phi_name)


def resolve_phi(backbone: Backbone, phi: str | None = None) -> tuple[Phi | None, str | None]:
    """(phi, its name): `phi` when given (WeightsUnavailable if it cannot be had), else the backbone's
    default from `DEFAULT_PHI`, or (None, None) when there is none or it cannot be had (OTI only)."""
    phi_name = phi or DEFAULT_PHI.get((backbone.name, backbone.pretrained))
    if not phi_name:
        return None, None
    try:
        return load_phi(phi_name, backbone.device), phi_name
    except WeightsUnavailable:
        if phi:  # asked for explicitly: say so; a missing default only disables method phi
            raise
        return None, None
