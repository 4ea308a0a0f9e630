"""ShapesCIR: a CIRCO-like composed image retrieval benchmark built from the shapes world.

Each query is a reference scene, a relative caption of one edit (colour, shape, size, position,
background, add, remove, or two edits at once) and several ground truths: the edited scene
rendered with fresh jitter 3-5 times (so mAP@K means what it does on CIRCO). The gallery holds
every reference (the evaluator removes the query's own reference from the ranking, as on CIRCO),
near copies of each reference (they fool image-only retrieval), hard negatives that satisfy the
caption but not the attributes that should stay unchanged (they fool text-only retrieval), and
random scenes. Ground truths are all gallery scenes with the target's attributes, so an accidental
duplicate is a ground truth too. Images are stored as scene specs and re-rendered on demand.

Files: annotations/{val,test}.json (list of {id, reference_img_id, target_img_id, relative_caption,
gt_img_ids, edit_type, shared_concept, target_description}) and gallery.json ({image id: spec}).
"""

from __future__ import annotations

import functools
import json
import random
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image

from isearle.artifacts import write_text
from isearle.paths import ASSETS_DIR
from isearle.shapes.captions import _attribute_change, apply_changes, describe, edit_scene, relative_caption
from isearle.shapes.world import (
    ATTRIBUTE_EDITS,
    DEFAULT_SIZE,
    EDIT_TYPES,
    MAX_OBJECTS,
    ObjectSpec,
    SceneSpec,
    jitter,
    random_scene,
    render,
    render_dict,
)

BENCHMARK_DIR = ASSETS_DIR / "shapescir"
SPLITS = ("val", "test")


def canonical(spec: SceneSpec) -> SceneSpec:
    """The scene without render jitter (attributes only)."""
    return SceneSpec(spec.background, [ObjectSpec(o.shape, o.colour, o.size, o.position, o.pattern)
                                       for o in spec.objects])


def compact(spec: SceneSpec) -> dict[str, Any]:
    """A small JSON dict of a spec: defaults dropped, jitter rounded (SceneSpec.from_dict reads it)."""
    objs = []
    for o in spec.objects:
        d: dict[str, Any] = {"shape": o.shape, "colour": o.colour, "size": o.size, "position": o.position}
        if o.pattern != "plain":
            d["pattern"] = o.pattern
        for k, nd in (("dx", 3), ("dy", 3), ("scale", 3), ("angle", 1)):
            v = round(getattr(o, k), nd)
            if v != (1.0 if k == "scale" else 0.0):
                d[k] = v
        if any(o.tint):
            d["tint"] = list(o.tint)
        objs.append(d)
    out: dict[str, Any] = {"background": spec.background, "objects": objs}
    if any(spec.tint):
        out["tint"] = list(spec.tint)
    return out


def _reference(rng: random.Random, edit_type: str) -> SceneSpec:
    """A jittered reference scene on which `edit_type` is possible."""
    while True:
        spec = random_scene(rng, weights=(0.4, 0.35, 0.25))
        if edit_type == "add" and len(spec.objects) >= MAX_OBJECTS:
            continue
        if edit_type == "remove" and len(spec.objects) < 2:
            continue
        return spec


def _hard_negative(target: SceneSpec, touched: set[str], rng: random.Random) -> SceneSpec:
    """The target with one attribute the caption keeps unchanged altered: it matches the caption only."""
    attrs = [a for a in ATTRIBUTE_EDITS if a not in touched]
    attr = rng.choice(attrs)
    if attr == "position" and not target.free_positions():
        attr = rng.choice([a for a in attrs if a != "position"] or ["background"])
    return apply_changes(target, [_attribute_change(target, attr, rng)])


def _shared_concept(reference: SceneSpec, changes: list[dict[str, Any]]) -> str:
    """What reference and target share (CIRCO's shared_concept): the edited object's unchanged identity."""
    ch = changes[0]
    if ch["attr"] in ("add", "background"):
        o = reference.objects[0]
        return f"{o.colour} {o.shape}"
    if ch["attr"] == "remove":
        keep = [o for i, o in enumerate(reference.objects) if i != ch["obj"]]
        return f"{keep[0].colour} {keep[0].shape}"
    o = reference.objects[ch["obj"]]
    touched = {c["attr"] for c in changes}
    if "shape" not in touched:
        return o.shape if "colour" in touched else f"{o.colour} {o.shape}"
    return f"{o.colour} shape" if "colour" not in touched else "shape"


def make_query(reference: SceneSpec, edit_type: str, rng: random.Random) -> dict[str, Any]:
    """One query before gallery ids: reference, target (canonical), caption, negatives, ground-truth renders."""
    target, changes = edit_scene(reference, edit_type, rng)
    target = canonical(target)
    touched = {c["attr"] for c in changes if c["attr"] in ATTRIBUTE_EDITS}
    negatives = [_hard_negative(target, touched, rng) for _ in range(rng.randint(2, 3))]
    if edit_type == "two":  # only one of the two edits: half of the caption holds
        negatives += [canonical(apply_changes(reference, [c])) for c in changes]
    return {
        "edit_type": edit_type,
        "relative_caption": relative_caption(reference, changes, rng),
        "reference": reference,
        "targets": [jitter(target, rng) for _ in range(1 + rng.randint(2, 4))],
        "near_copies": [jitter(canonical(reference), rng) for _ in range(rng.randint(1, 2))],
        "negatives": [jitter(n, rng) for n in negatives],
        "target_signature": target.signature(),
        "shared_concept": _shared_concept(reference, changes),
        "target_description": describe(target, random.Random(0), p_background=1.0),
    }


def build_benchmark(out_dir: str | Path = BENCHMARK_DIR, seed: int = 0, n_val: int = 160, n_test: int = 640,
                    n_gallery: int = 2000) -> dict[str, Any]:
    """Write annotations/{val,test}.json and gallery.json; returns statistics.

    Queries are balanced over EDIT_TYPES; `n_gallery` random scenes (>= 2000) join the references,
    near copies, hard negatives and ground truths of both splits in one shared gallery.
    """
    if n_gallery < 2000:
        raise ValueError("ShapesCIR keeps at least 2,000 random gallery scenes")
    out = Path(out_dir)
    gallery: dict[str, SceneSpec] = {}

    def add(spec: SceneSpec) -> str:
        key = f"{len(gallery):06d}"
        gallery[key] = spec
        return key

    raw: dict[str, list[dict[str, Any]]] = {}
    for s, (split, n) in enumerate((("val", n_val), ("test", n_test))):
        rng = random.Random(seed * 1_000 + 17 + s)
        queries = []
        for i in range(n):
            etype = EDIT_TYPES[i % len(EDIT_TYPES)]
            q = make_query(_reference(rng, etype), etype, rng)
            q["reference_img_id"] = add(q["reference"])
            q["target_img_id"] = add(q["targets"][0])
            for spec in q["targets"][1:] + q["near_copies"] + q["negatives"]:
                add(spec)
            queries.append(q)
        rng.shuffle(queries)
        raw[split] = queries
    rng = random.Random(seed * 1_000 + 99)
    for _ in range(n_gallery):
        add(random_scene(rng))
    by_sig: dict[tuple, list[str]] = {}
    for key, spec in gallery.items():
        by_sig.setdefault(spec.signature(), []).append(key)

    out.joinpath("annotations").mkdir(parents=True, exist_ok=True)
    stats: dict[str, Any] = {"seed": seed, "gallery": len(gallery), "random_scenes": n_gallery}
    for split, queries in raw.items():
        rows = []
        for qid, q in enumerate(queries):
            gts = [q["target_img_id"]] + [k for k in by_sig[q["target_signature"]]
                                          if k not in (q["target_img_id"], q["reference_img_id"])]
            rows.append({"id": qid, "reference_img_id": q["reference_img_id"], "target_img_id": q["target_img_id"],
                         "relative_caption": q["relative_caption"], "gt_img_ids": gts, "edit_type": q["edit_type"],
                         "shared_concept": q["shared_concept"], "target_description": q["target_description"]})
        write_text(out.joinpath("annotations", f"{split}.json"), json.dumps(rows, indent=0))
        stats[split] = {"queries": len(rows), "per_edit_type": dict(Counter(r["edit_type"] for r in rows)),
                        "mean_gts": round(sum(len(r["gt_img_ids"]) for r in rows) / max(1, len(rows)), 2)}
    write_text(out.joinpath("gallery.json"), json.dumps({k: compact(v) for k, v in gallery.items()}, separators=(",", ":")))
    write_text(out.joinpath("stats.json"), json.dumps(stats, indent=2))
    return stats


def load_benchmark(directory: str | Path = BENCHMARK_DIR, split: str = "test") -> tuple[list[dict[str, Any]], dict[str, SceneSpec]]:
    """(queries of `split`, {image id: SceneSpec} of the whole gallery)."""
    d = Path(directory)
    if split not in SPLITS:
        raise ValueError(f"split {split!r}: use one of {SPLITS}")
    queries = json.loads(d.joinpath("annotations", f"{split}.json").read_text())
    gallery = {k: SceneSpec.from_dict(v) for k, v in json.loads(d.joinpath("gallery.json").read_text()).items()}
    return queries, gallery


def render_image(gallery: dict[str, SceneSpec], image_id: str, size: int = DEFAULT_SIZE) -> Image.Image:
    """The gallery image `image_id`, rendered."""
    return render(gallery[image_id], size)


def gallery_source(gallery: dict[str, SceneSpec], size: int = DEFAULT_SIZE) -> tuple[list[str], list[Callable[[], Image.Image]]]:
    """(ids, picklable image callables) of the gallery, for feature extraction."""
    ids = list(gallery)
    return ids, [functools.partial(render_dict, gallery[k].to_dict(), size) for k in ids]
