"""Recipes: SEARLE's and iSEARLE's settings for OTI and phi training, each declared once.

`searle` reproduces the authors' code (miccunifi/SEARLE src/oti_inversion.py, src/train_phi.py):
no noise, random batches, no token penalty. `isearle` (the default) is the project's iSEARLE: the
defaults of `OTIConfig` and `PhiTrainConfig`. A preset lists only what differs from those
defaults; explicit options override the preset. The README's faithfulness section lists, per
preset, every setting and where it comes from.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Any

from isearle.oti import TEMPLATES, OTIConfig
from isearle.phi_training import PhiTrainConfig


@dataclass(frozen=True)
class Preset:
    """A recipe: the OTI and phi-training settings that differ from the iSEARLE defaults."""

    name: str
    oti: Mapping[str, Any] = field(default_factory=dict)
    phi: Mapping[str, Any] = field(default_factory=dict)
    #: SEARLE's mixed precision: OTI and phi training in fp16 autocast + GradScaler on CUDA (fp32 on CPU)
    #: wherever the command would otherwise run another precision (`isearle eval --method oti`).
    mixed_precision: bool = False
    #: The image decoding of its dataset commands (`isearle.images.DECODES`); `isearle eval` uses "searle".
    decode: str = "robust"
    #: How its phrase banks are prepared (`isearle.phrases.PHRASE_STYLES`).
    phrases: str = "isearle"

    def precision(self, device: Any) -> str | None:
        """The OTI / phi-training precision of this recipe on `device` (None: the backbone's own)."""
        from isearle.precision import default_compute_precision

        return default_compute_precision(device) if self.mixed_precision else None

    def oti_config(self, **overrides: Any) -> OTIConfig:
        """`OTIConfig` of this preset; `overrides` set to None are ignored (options not given)."""
        return _build(OTIConfig, self.oti, overrides)

    def phi_config(self, **overrides: Any) -> PhiTrainConfig:
        """`PhiTrainConfig` of this preset; `overrides` set to None are ignored."""
        return _build(PhiTrainConfig, self.phi, overrides)


def _build(cls: type, preset: Mapping[str, Any], overrides: Mapping[str, Any]) -> Any:
    names = {f.name for f in fields(cls)}
    unknown = set(overrides) - names
    if unknown:
        raise TypeError(f"{cls.__name__} has no setting {sorted(unknown)}")
    return cls(**{**preset, **{k: v for k, v in overrides.items() if v is not None}})


PRESETS: Mapping[str, Preset] = MappingProxyType({
    "isearle": Preset("isearle"),
    "searle": Preset(
        "searle",
        oti={"gamma": 0.0, "max_norm": 0.0, "concept_match": "substring"},
        phi={"hard_negatives": False, "lambda_reg": 0.0, "reg_form": "none", "concept_match": "substring"},
        mixed_precision=True, decode="searle", phrases="searle",
    ),
})
DEFAULT_PRESET = "isearle"

#: Named OTI content-template sets (`--templates`): SEARLE's PALAVRA 24, or the shapes world's.
TEMPLATE_SETS = ("searle", "shapes")


def oti_templates(name: str) -> tuple[str, ...]:
    """The OTI content templates of a named set."""
    if name == "searle":
        return TEMPLATES
    if name == "shapes":
        from isearle.shapes.captions import OTI_TEMPLATES

        return OTI_TEMPLATES
    raise ValueError(f"unknown template set {name!r}: use one of {', '.join(TEMPLATE_SETS)}")


def preset(name: str) -> Preset:
    """The preset called `name` (a one-line error naming the choices otherwise)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}: use one of {', '.join(PRESETS)}")
    return PRESETS[name]
