"""phi, the textual inversion network: one forward pass maps an image feature to its pseudo-token.

SEARLE's architecture: Linear(d, 4d) GELU Dropout Linear(4d, 4d) GELU Dropout Linear(4d, d_tok),
input the un-normalised CLIP image feature. A checkpoint is one safetensors file whose metadata holds
its settings (older ones: a JSON sidecar); the official SEARLE checkpoints ({"epoch", "Phi": state_dict}) load with torch.load(weights_only=True).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from isearle import paths
from isearle.artifacts import ArtifactError, load_tensors, read_json, save_tensors, tensors_metadata
from isearle.backbone import Backbone, WeightsUnavailable
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
    """Write `path` (.safetensors), one self-describing file: the weights, and in its metadata
    ("settings") phi's sizes plus `extra` (backbone, OTI and training settings), atomically."""
    path = Path(path).with_suffix(".safetensors")
    settings = {"phi": asdict(phi.config), **(extra or {})}
    save_tensors(path, phi.state_dict(), "phi", {"settings": json.dumps(settings)})
    return path


def phi_settings(path: str | Path) -> dict:
    """The settings of a phi checkpoint: its metadata, or the JSON sidecar of an older checkpoint."""
    path = Path(path)
    remedy = "train it again with `isearle train-phi`"
    meta = tensors_metadata(path, remedy)
    if "settings" in meta:
        try:
            return json.loads(meta["settings"])
        except ValueError:
            raise ArtifactError(path, "has unreadable settings in its metadata", remedy) from None
    sidecar = path.with_suffix(".json")
    if not sidecar.is_file():
        raise ArtifactError(sidecar, "is missing (this older phi checkpoint keeps its sizes there)",
                            "copy it next to the .safetensors, or train phi again with `isearle train-phi`")
    info = read_json(sidecar, "copy the .json written with this checkpoint next to it")
    if not isinstance(info, dict) or not isinstance(info.get("phi"), dict):
        raise ArtifactError(sidecar, "is not the settings file of a phi checkpoint", remedy)
    return info


def load_official_searle(path: str | Path) -> Phi:
    """An official SEARLE checkpoint {"epoch": int, "Phi": state_dict}, loaded without pickle code."""
    remedy = "download it again from " + OFFICIAL_URL.rsplit("/", 2)[0].replace("download", "tag") + "/weights"
    try:
        ckpt = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zip, not a checkpoint, disallowed pickle: all unreadable
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:100]
        raise ArtifactError(path, f"is not a readable SEARLE checkpoint ({first})", remedy) from None
    state = ckpt["Phi"] if isinstance(ckpt, dict) and "Phi" in ckpt else ckpt
    if not isinstance(state, dict) or "layers.0.weight" not in state or "layers.6.weight" not in state:
        raise ArtifactError(path, "is not a SEARLE phi checkpoint (no phi weights in it)", remedy)
    first, last = state["layers.0.weight"], state["layers.6.weight"]
    phi = Phi(PhiConfig(first.shape[1], first.shape[0], last.shape[0]))
    _load_state(phi, state, path, remedy)
    return phi.eval()


def _load_state(phi: Phi, state: dict, path: Path, remedy: str) -> None:
    try:
        phi.load_state_dict(state)
    except RuntimeError as err:
        raise ArtifactError(path, f"does not match its settings ({str(err).splitlines()[-1].strip()[:100]})",
                            remedy) from None


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


def load_phi(spec: str | Path, device: str | torch.device = "cpu", backbone: Backbone | None = None) -> Phi:
    """phi from "searle" / "searle-xl" (official), a .safetensors (older ones: + .json) or an official .pt.

    With `backbone`, a phi made for another model (other sizes, or another recorded backbone)
    raises ArtifactError instead of answering queries with meaningless tokens.
    """
    recorded = None
    if str(spec) in OFFICIAL:
        path = official_checkpoint(str(spec))
        phi = load_official_searle(path)
    else:
        path = Path(spec)
        if not path.is_file():
            raise WeightsUnavailable(f"phi checkpoint {path} not found: train one with `isearle train-phi`")
        if path.suffix == ".safetensors":
            remedy = "train it again with `isearle train-phi`"
            info = phi_settings(path)
            state, _ = load_tensors(path, "phi", remedy)
            try:
                phi = Phi(PhiConfig(**info["phi"]))
            except TypeError:
                raise ArtifactError(path, "has unknown phi settings", remedy) from None
            _load_state(phi, state, path, remedy)
            phi.oti_settings = {k: tuple(v) if k == "templates" else v
                                for k, v in info.get("oti", {}).items() if k in ("max_norm", "gamma", "templates")}
            recorded = info.get("backbone")
        else:
            phi = load_official_searle(path)
    if backbone is not None:
        sizes = (phi.config.input_dim, phi.config.output_dim)
        if sizes != (backbone.embed_dim, backbone.token_width) or recorded not in (None, backbone.name):
            made = f"{recorded} ({sizes[0]}-d features)" if recorded else f"{sizes[0]}-d features, {sizes[1]}-d tokens"
            raise ArtifactError(path, f"is a phi for {made}, not for {backbone.name}", "pass a phi trained "
                                f"with `isearle train-phi --model {backbone.name}`")
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
        return load_phi(name, backbone.device, backbone), str(name)
    except WeightsUnavailable:
        if spec or required:
            raise
        return None, None
