"""The table of knobs, declared once: the defaults the CLI, the demo and the library read.

One name per setting; a place that uses fewer OTI steps than the paper (the demo, where a visitor
waits for them) reads its own named setting here instead of writing another literal.
"""

from __future__ import annotations

from dataclasses import dataclass

from isearle.oti import OTIConfig
from isearle.precision import DEFAULT_PRECISION


@dataclass(frozen=True)
class Defaults:
    """Default model, gallery folder, OTI steps and query-path precision."""

    #: open_clip backbone of `isearle index`, `isearle inspect`, the demo's --images / --hf-dataset
    model: str = "ViT-B-32"
    pretrained: str = "openai"
    #: the gallery index folder (the offline world's in a checkout)
    gallery: str = "gallery_index"
    #: OTI steps per image: the paper's (iSEARLE, SEARLE)
    oti_steps: int = OTIConfig.steps
    #: OTI steps of the demo (its slider's start): a visitor waits for them; R@1 on ShapesCIR is
    #: within a point of the paper's 350 at 150 steps on the offline world
    demo_oti_steps: int = 150
    #: precision of a long-running query path (the demo, the benches): measured at start-up
    precision: str = DEFAULT_PRECISION
    #: precision of `isearle query` (one query per process): auto's start-up measurement and ONNX
    #: export would cost more than the one query saves
    one_shot_precision: str = "fp32"


DEFAULTS = Defaults()
