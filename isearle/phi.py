"""phi, the textual inversion network: one forward pass maps an image feature to its pseudo-token.

SEARLE's architecture: Linear(d, 4d) GELU Dropout Linear(4d, 4d) GELU Dropout Linear(4d, d_tok),
input the un-normalised CLIP image feature. Checkpoints are safetensors + a JSON config; the
official SEARLE checkpoints ({"epoch", "Phi": state_dict}) load with torch.load(weights_only=True).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from isearle import paths
from isearle.backbone import WeightsUnavailable
from isearle.runtime import hub_offline

#: Official SEARLE weights (GitHub release "weights" of miccunifi/SEARLE) and their backbones.
OFFICIAL = {
    "searle": ("SEARLE_ViT-B32.pt", "ViT-B-32"),
    "searle-xl": ("SEARLE_ViT-L14.pt", "ViT-L-14"),
}
OFFICIAL_URL = "https://github.com/miccunifi/SEARLE/releases/download/weights/{}"

#: Default phi per (model, pretrained) when none is given.
DEFAULT_PHI = {
    ("isearle-shapes", "isearle-shapes"): str(paths.ASSETS_DIR / "models" / "isearle-shapes-phi.safetensors"),
    ("ViT-B-32-quickgelu", "openai"): "searle",
    ("ViT-L-14-quickgelu", "openai"): "searle-xl",
}


@dataclass
class PhiConfig:
    """Sizes of phi: input = CLIP embed dim, output = token-embedding width."""

    input_dim: int = 512
    hidden_dim: int = 2048
    output_dim: int = 512
    dropout: float = 0.5


class Phi(nn.Module):
    """Textual inversion network (SEARLE, Sec. 4.2): image feature -> pseudo-token."""

    def __init__(self, config: PhiConfig) -> None:
        super().__init__()
        self.config = config
        #: OTI settings that made the distillation targets (e.g. {"max_norm": 2.0}); OTI warm-started
        #: from this phi should use them too. Empty when unknown (official checkpoints: SEARLE's OTI).
        self.oti_settings: dict = {}
        self.layers = nn.Sequential(
            nn.Linear(config.input_dim, config.hidden_dim),
            nn.GELU(),
            nn.Dropout(config.dropout),
            nn.Linear(config.hidden_dim, config.hidden_dim),
            nn.GELU(),
            nn.Dropout(config.dropout),
            nn.Linear(config.hidden_dim, config.output_dim),
        )

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        return self.layers(image_features)

    @classmethod
    def for_backbone(cls, embed_dim: int, token_width: int, dropout: float = 0.5) -> Phi:
        """phi sized as in SEARLE: hidden = 4 x the image feature size."""
        return cls(PhiConfig(embed_dim, 4 * embed_dim, token_width, dropout))


def save_phi(phi: Phi, path: str | Path, extra: dict | None = None) -> Path:
    """Write `path` (.safetensors) and its JSON config next to it (`path` with .json)."""
    path = Path(path).with_suffix(".safetensors")
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in phi.state_dict().items()}
    save_file(state, str(path))
    path.with_suffix(".json").write_text(json.dumps({"phi": asdict(phi.config), **(extra or {})}, indent=1))
    return path


def load_official_searle(path: str | Path) -> Phi:
    """An official SEARLE checkpoint {"epoch": int, "Phi": state_dict}, loaded without pickle code."""
    ckpt = torch.load(str(path), map_location="cpu", weights_only=True)
    state = ckpt["Phi"] if isinstance(ckpt, dict) and "Phi" in ckpt else ckpt
    first, last = state["layers.0.weight"], state["layers.6.weight"]
    phi = Phi(PhiConfig(first.shape[1], first.shape[0], last.shape[0]))
    phi.load_state_dict(state)
    return phi.eval()


def official_checkpoint(name: str) -> Path:
    """Path of an official SEARLE checkpoint, downloaded once into the cache when online."""
    filename, _ = OFFICIAL[name]
    path = paths.CACHE_DIR / filename
    if path.is_file():
        return path
    if hub_offline():
        raise WeightsUnavailable(
            f"{filename} is not cached at {path} and the network is off: download it from "
            f"{OFFICIAL_URL.format(filename)} and put it there, or pass a phi checkpoint path"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(OFFICIAL_URL.format(filename), str(path), progress=True)
    except Exception as err:  # urllib raises many types; all mean "not downloadable now"
        raise WeightsUnavailable(f"could not download {filename}: {err}; pass a local phi path") from err
    return path


def load_phi(spec: str | Path, device: str | torch.device = "cpu") -> Phi:
    """phi from "searle" / "searle-xl" (official), a .safetensors (+ .json) or an official .pt."""
    if str(spec) in OFFICIAL:
        phi = load_official_searle(official_checkpoint(str(spec)))
    else:
        path = Path(spec)
        if not path.is_file():
            raise WeightsUnavailable(f"phi checkpoint {path} not found: train one with `isearle train-phi`")
        if path.suffix == ".safetensors":
            info = json.loads(path.with_suffix(".json").read_text())
            phi = Phi(PhiConfig(**info["phi"]))
            phi.load_state_dict(load_file(str(path)))
            phi.oti_settings = {k: tuple(v) if k == "templates" else v
                                for k, v in info.get("oti", {}).items() if k in ("max_norm", "gamma", "templates")}
        else:
            phi = load_official_searle(path)
    return phi.to(device).eval().requires_grad_(False)


def resolve_phi(backbone: Any, spec: str | Path | nn.Module | None = None, required: bool = False
                ) -> tuple[Phi | None, str | None]:
    """(phi, its name): `spec` (a module, "searle", "searle-xl" or a checkpoint), else the backbone's default.

    A default that cannot be had gives (None, None), so that only method phi is lost, unless
    `required` (evaluation of method phi); a named `spec` that cannot be had always raises.
    """
    if isinstance(spec, nn.Module):
        return spec, type(spec).__name__
    name = spec or DEFAULT_PHI.get((backbone.name, backbone.pretrained))
    if not name:
        return None, None
    try:
        return load_phi(name, backbone.device), str(name)
    except WeightsUnavailable:
        if spec or required:
            raise
        return None, None
