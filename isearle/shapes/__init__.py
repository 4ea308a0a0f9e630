"""The offline shapes world: procedural scenes, their captions, and the ShapesCIR benchmark.

No pretrained CLIP or CIR dataset can be downloaded in the project's offline setting, so the world
ships its own: `world` renders seeded scenes of coloured shapes and describes them with a varied
grammar (the tiny CLIP is trained on it); `benchmark` builds CIRCO-like composed-retrieval queries.
"""

from isearle.shapes.captions import caption, phrases_for, vocabulary
from isearle.shapes.world import (
    BACKGROUNDS,
    COLOURS,
    PATTERNS,
    POSITIONS,
    SHAPES,
    SIZES,
    ObjectSpec,
    SceneSpec,
    jitter,
    random_scene,
    render,
)

__all__ = [
    "BACKGROUNDS", "COLOURS", "PATTERNS", "POSITIONS", "SHAPES", "SIZES", "ObjectSpec", "SceneSpec",
    "caption", "jitter", "phrases_for", "random_scene", "render", "vocabulary",
]
