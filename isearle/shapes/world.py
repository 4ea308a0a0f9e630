"""Scenes of coloured shapes: seeded specs, anti-aliased rendering, and a varied caption grammar.

A scene is a background colour and 1 to 3 objects (shape, colour, size, position, pattern), kept as
a JSON-serialisable `SceneSpec` so that benchmarks store specs and re-render images on demand.
Their captions and edits are `isearle.shapes.captions`.
"""

from __future__ import annotations

import copy
import functools
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from PIL import Image, ImageDraw

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "hexagon", "cross")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (245, 140, 20),
    "yellow": (235, 215, 35),
    "green": (40, 160, 60),
    "blue": (40, 80, 225),
    "purple": (140, 60, 190),
    "pink": (245, 135, 195),
    "brown": (125, 80, 40),
}
#: Object radius as a fraction of the image side.
SIZES: dict[str, float] = {"small": 0.09, "large": 0.16}
#: Object centre as (x, y) fractions of the image side.
POSITIONS: dict[str, tuple[float, float]] = {
    "left": (0.18, 0.5),
    "right": (0.82, 0.5),
    "top": (0.5, 0.18),
    "bottom": (0.5, 0.82),
    "center": (0.5, 0.5),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "black": (25, 25, 25),
    "gray": (128, 128, 128),
    "beige": (225, 205, 160),
}
PATTERNS: tuple[str, ...] = ("plain", "striped")
EDIT_TYPES: tuple[str, ...] = ("colour", "shape", "size", "position", "background", "add", "remove", "two")
ATTRIBUTE_EDITS: tuple[str, ...] = ("colour", "shape", "size", "position", "background")
DEFAULT_SIZE = 64
MAX_OBJECTS = 3


@dataclass
class ObjectSpec:
    """One object; dx/dy/scale/angle/tint are render jitter that never changes an attribute."""

    shape: str
    colour: str
    size: str
    position: str
    pattern: str = "plain"
    dx: float = 0.0
    dy: float = 0.0
    scale: float = 1.0
    angle: float = 0.0
    tint: tuple[int, int, int] = (0, 0, 0)

    @property
    def key(self) -> tuple[str, str]:
        """(colour, shape): unique within a scene, so that "the red circle" names one object."""
        return (self.colour, self.shape)

    def attributes(self) -> dict[str, str]:
        return {"shape": self.shape, "colour": self.colour, "size": self.size,
                "position": self.position, "pattern": self.pattern}


@dataclass
class SceneSpec:
    """A background and 1-3 objects at distinct positions with distinct (colour, shape)."""

    background: str
    objects: list[ObjectSpec] = field(default_factory=list)
    tint: tuple[int, int, int] = (0, 0, 0)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["tint"] = list(self.tint)
        for o in d["objects"]:
            o["tint"] = list(o["tint"])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SceneSpec:
        objs = [ObjectSpec(**{**o, "tint": tuple(o.get("tint", (0, 0, 0)))}) for o in d["objects"]]
        return cls(background=d["background"], objects=objs, tint=tuple(d.get("tint", (0, 0, 0))))

    def signature(self) -> tuple:
        """The attributes only (no jitter, order-free): equal signatures mean the same scene."""
        objs = tuple(sorted((o.shape, o.colour, o.size, o.position, o.pattern) for o in self.objects))
        return (self.background, objs)

    def copy(self) -> SceneSpec:
        return copy.deepcopy(self)

    def free_positions(self) -> list[str]:
        used = {o.position for o in self.objects}
        return [p for p in POSITIONS if p not in used]

    def find(self, colour: str, shape: str) -> int:
        return next(i for i, o in enumerate(self.objects) if o.key == (colour, shape))


# --------------------------------------------------------------------------------- sampling
def random_object(rng: random.Random, taken_positions: Sequence[str] = (),
                  taken_keys: Sequence[tuple[str, str]] = (), p_pattern: float = 0.15) -> ObjectSpec:
    """An object at a free position whose (colour, shape) is not taken."""
    while True:
        shape, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
        if (colour, shape) not in taken_keys:
            break
    position = rng.choice([p for p in POSITIONS if p not in taken_positions])
    pattern = "striped" if rng.random() < p_pattern else "plain"
    return ObjectSpec(shape, colour, rng.choice(list(SIZES)), position, pattern)


def random_scene(rng: random.Random, n_objects: int | None = None,
                 weights: Sequence[float] = (0.5, 0.3, 0.2), p_pattern: float = 0.15,
                 jittered: bool = True) -> SceneSpec:
    """A seeded random scene (1-3 objects by `weights` unless `n_objects`), jittered by default."""
    n = n_objects or rng.choices(range(1, len(weights) + 1), weights=weights)[0]
    spec = SceneSpec(rng.choice(list(BACKGROUNDS)))
    for _ in range(n):
        spec.objects.append(random_object(rng, [o.position for o in spec.objects],
                                          [o.key for o in spec.objects], p_pattern))
    return jitter(spec, rng) if jittered else spec


def jitter(spec: SceneSpec, rng: random.Random, amount: float = 1.0) -> SceneSpec:
    """A copy with small position/size/rotation/hue jitter; every attribute word stays true."""
    out = spec.copy()

    def tint(k: int) -> tuple[int, int, int]:
        return tuple(int(rng.uniform(-k, k) * amount) for _ in range(3))

    out.tint = tint(6)
    for o in out.objects:
        o.dx, o.dy = rng.uniform(-0.025, 0.025) * amount, rng.uniform(-0.025, 0.025) * amount
        o.scale = 1.0 + rng.uniform(-0.08, 0.08) * amount
        o.angle = rng.uniform(-10, 10) * amount
        o.tint = tint(14)
    return out


def scene_rng(seed: int, index: int) -> random.Random:
    """The rng of scene `index` of a seeded stream (independent of how many scenes are drawn)."""
    return random.Random(seed * 1_000_003 + index)


def scene_specs(n: int, seed: int, **kwargs: Any) -> list[SceneSpec]:
    """`n` random scenes of the stream `seed`."""
    return [random_scene(scene_rng(seed, i), **kwargs) for i in range(n)]


def render_dict(spec: dict[str, Any], size: int = DEFAULT_SIZE) -> Image.Image:
    """`render` for a spec dict (picklable through functools.partial, for DataLoader workers)."""
    return render(SceneSpec.from_dict(spec), size)


def scene_source(n: int, seed: int, size: int = DEFAULT_SIZE) -> tuple[list[str], list[Callable[[], Image.Image]]]:
    """(ids, image callables) of `n` unlabeled scenes, for feature extraction and OTI."""
    specs = scene_specs(n, seed)
    ids = [f"shapes-{seed}-{i:06d}" for i in range(n)]
    return ids, [functools.partial(render_dict, s.to_dict(), size) for s in specs]


def scene_items(n: int, seed: int, size: int) -> list[tuple[str, Any, dict]]:
    """(id, image callable, {"scene_seed", "spec"}) per scene: `isearle index --shapes` items."""
    ids, items = scene_source(n, seed, size)
    out = []
    for i, item in zip(ids, items, strict=True):
        meta: dict[str, Any] = {"scene_seed": seed}
        # scene_source gives functools.partial(render_dict, spec_dict, size): keep the spec, so that
        # the demo re-renders the scene at any size instead of storing a thumbnail.
        args = getattr(item, "args", ())
        if args and isinstance(args[0], dict):
            meta["spec"] = args[0]
        out.append((str(i), item, meta))
    return out


# -------------------------------------------------------------------------------- rendering
def _clip(v: float) -> int:
    return max(0, min(255, int(round(v))))


def _rgb(base: tuple[int, int, int], tint: Sequence[int]) -> tuple[int, int, int]:
    return tuple(_clip(b + t) for b, t in zip(base, tint, strict=True))


def _polygon(shape: str) -> list[tuple[float, float]]:
    """Unit-radius outline of a shape centred at 0 (y down), roughly equal visual area."""
    if shape == "square":
        s = 0.86
        return [(-s, -s), (s, -s), (s, s), (-s, s)]
    if shape == "triangle":
        r = 1.25
        return [(r * math.cos(math.radians(a)), r * math.sin(math.radians(a)) + 0.12) for a in (-90, 30, 150)]
    if shape == "star":
        pts = []
        for i in range(10):
            r = 1.22 if i % 2 == 0 else 0.52
            a = math.radians(-90 + 36 * i)
            pts.append((r * math.cos(a), r * math.sin(a) + 0.08))
        return pts
    if shape == "hexagon":
        return [(1.05 * math.cos(math.radians(60 * i)), 1.05 * math.sin(math.radians(60 * i))) for i in range(6)]
    if shape == "cross":
        a, w = 1.05, 0.38
        return [(-w, -a), (w, -a), (w, -w), (a, -w), (a, w), (w, w), (w, a), (-w, a), (-w, w), (-a, w), (-a, -w), (-w, -w)]
    raise ValueError(f"unknown shape {shape!r}")


def _draw_object(draw: ImageDraw.ImageDraw, o: ObjectSpec, side: int, fill: int | tuple) -> None:
    cx, cy = POSITIONS[o.position]
    cx, cy = (cx + o.dx) * side, (cy + o.dy) * side
    r = SIZES[o.size] * o.scale * side
    if o.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        return
    t = math.radians(o.angle)
    c, s = math.cos(t), math.sin(t)
    draw.polygon([(cx + r * (x * c - y * s), cy + r * (x * s + y * c)) for x, y in _polygon(o.shape)], fill=fill)


def render(spec: SceneSpec, size: int = DEFAULT_SIZE, supersample: int = 4) -> Image.Image:
    """RGB image of a scene at `size` px, drawn at `supersample`x and box-downsampled (anti-aliased)."""
    side = size * supersample
    image = Image.new("RGB", (side, side), _rgb(BACKGROUNDS[spec.background], spec.tint))
    draw = ImageDraw.Draw(image)
    for o in spec.objects:
        colour = _rgb(COLOURS[o.colour], o.tint)
        if o.pattern == "plain":
            _draw_object(draw, o, side, colour)
            continue
        mask = Image.new("L", (side, side), 0)
        _draw_object(ImageDraw.Draw(mask), o, side, 255)
        fill = Image.new("RGB", (side, side), colour)
        stripe = tuple(_clip(v * 0.45 + 255 * 0.55) for v in colour)
        fd = ImageDraw.Draw(fill)
        period = max(4, side // 16)
        for k in range(-side, side, period):  # diagonal stripes
            fd.polygon([(k, 0), (k + period // 2, 0), (k + period // 2 + side, side), (k + side, side)], fill=stripe)
        image.paste(fill, (0, 0), mask)
    return image.resize((size, size), Image.Resampling.BOX)
