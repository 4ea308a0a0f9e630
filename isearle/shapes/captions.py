"""The shapes world's language: a caption grammar, scene edits and the words of its concepts.

The grammar describes scenes fully, partially and with relative clauses ("a photo of a large circle
on the left that is blue"), and states edits ("a photo of a red circle that is blue instead"), so
that the tiny CLIP's text encoder learns composable attributes and reads "a photo of $ that {edit}"
the way SEARLE queries use CLIP. `phrases_for` replaces the GPT-Neo phrase generator offline.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import Any

from isearle.shapes.world import (
    ATTRIBUTE_EDITS,
    BACKGROUNDS,
    COLOURS,
    EDIT_TYPES,
    MAX_OBJECTS,
    PATTERNS,
    SHAPES,
    SIZES,
    ObjectSpec,
    SceneSpec,
    random_object,
)

SIZE_WORDS = {"small": ("small", "small", "little", "tiny"), "large": ("large", "large", "big")}
COMPARATIVES = {"small": ("smaller", "smaller", "tinier"), "large": ("larger", "larger", "bigger")}
POSITION_PHRASES = {
    "left": ("on the left", "on the left side", "at the left"),
    "right": ("on the right", "on the right side", "at the right"),
    "top": ("at the top", "on the top", "near the top"),
    "bottom": ("at the bottom", "on the bottom", "near the bottom"),
    "center": ("in the center", "in the middle", "at the center"),
}
MOVE_PHRASES = {
    "left": ("to the left", "to the left side"),
    "right": ("to the right", "to the right side"),
    "top": ("to the top", "up to the top"),
    "bottom": ("to the bottom", "down to the bottom"),
    "center": ("to the center", "to the middle"),
}
PREFIXES = ("a photo of ", "a photo of ", "an image of ", "a picture of ", "", "", "a rendering of ")
#: OTI content templates recorded by the shipped shapes phi (`OTIConfig.templates`): photo-like
#: prompts close to the grammar's prefixes, measured against SEARLE's 24 on ShapesCIR val (docs/offline-world.md).
OTI_TEMPLATES: tuple[str, ...] = (
    "a photo of $", "a picture of $", "an image of $", "a photo of a $", "a picture of a $",
    "an image of a $", "a photo of the $", "a picture of the $", "an image of the $",
    "this is a photo of $", "this is a picture of $", "this is an image of $",
    "a close-up photo of $", "a good photo of $", "a rendering of $", "a photo showing $",
    "an image showing $", "a picture showing $", "a snapshot of $", "a depiction of $",
)
THING_WORDS = ("shape", "object", "thing")


def _article(words: str) -> str:
    return ("an " if words[:1] in "aeiou" else "a ") + words


def _bg(bg: str, rng: random.Random) -> str:
    return rng.choice((f"on a {bg} background", f"on a {bg} background", f"with a {bg} background",
                       f"against a {bg} background"))


def noun_phrase(o: ObjectSpec, rng: random.Random, attrs: Sequence[str] | None = None,
                article: bool = True) -> str:
    """"a large striped blue circle on the left", limited to `attrs` (default: all)."""
    attrs = ("size", "pattern", "colour", "shape", "position") if attrs is None else attrs
    words = []
    if "size" in attrs:
        words.append(rng.choice(SIZE_WORDS[o.size]))
    if "pattern" in attrs and o.pattern != "plain":
        words.append(o.pattern)
    if "colour" in attrs:
        words.append(o.colour)
    words.append(o.shape if "shape" in attrs else rng.choice(THING_WORDS))
    np_ = " ".join(words)
    np_ = _article(np_) if article else np_
    if "position" in attrs:
        np_ += " " + rng.choice(POSITION_PHRASES[o.position])
    return np_


def _join(parts: Sequence[str]) -> str:
    if len(parts) == 1:
        return parts[0]
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def describe(spec: SceneSpec, rng: random.Random, p_background: float = 0.8) -> str:
    """Full description of every object (shuffled order), with the background most of the time."""
    objs = list(spec.objects)
    rng.shuffle(objs)
    text = _join([noun_phrase(o, rng) for o in objs])
    if rng.random() < p_background:
        text += " " + _bg(spec.background, rng)
    return text


def attribute_clause(o: ObjectSpec, attr: str, rng: random.Random) -> str:
    """A verb phrase stating one attribute: "is blue", "is a star", "is on the right"..."""
    if attr == "colour":
        return rng.choice((f"is {o.colour}", f"is {o.colour}", f"is coloured {o.colour}", f"is {o.colour} in colour"))
    if attr == "shape":
        return rng.choice((f"is {_article(o.shape)}", f"is {_article(o.shape)}", f"is shaped like {_article(o.shape)}",
                           f"has the shape of {_article(o.shape)}"))
    if attr == "size":
        w = rng.choice(SIZE_WORDS[o.size])
        return rng.choice((f"is {w}", f"is {w}", f"is {w} in size"))
    if attr == "position":
        p = rng.choice(POSITION_PHRASES[o.position])
        return rng.choice((f"is {p}", f"is {p}", f"sits {p}", f"appears {p}"))
    if attr == "pattern":
        return "is striped" if o.pattern == "striped" else rng.choice(("is plain", "has no stripes"))
    raise ValueError(attr)


def background_clause(bg: str, rng: random.Random) -> str:
    return rng.choice((f"has a {bg} background", f"has a {bg} background", f"is on a {bg} background",
                       f"is set against a {bg} background"))


def other_object_clause(o: ObjectSpec, rng: random.Random, partial: bool = False) -> str:
    np_ = noun_phrase(o, rng, _random_attrs(rng, min_keep=2) if partial else None)
    return rng.choice((f"also has {np_}", f"also has {np_}", f"is next to {np_}", f"is shown with {np_}",
                       f"has {np_} too"))


def _random_attrs(rng: random.Random, min_keep: int = 1) -> list[str]:
    attrs = ["size", "pattern", "colour", "shape", "position"]
    k = rng.randint(min_keep, 4)
    return rng.sample(attrs, k)


def clause_caption(spec: SceneSpec, rng: random.Random) -> str:
    """"a photo of {partial subject} that {clauses}": attributes split between subject and clause."""
    k = rng.randrange(len(spec.objects))
    o = spec.objects[k]
    attrs = ["shape", "colour", "size", "position"] + (["pattern"] if o.pattern != "plain" else [])
    rng.shuffle(attrs)
    n_clause = rng.randint(1, min(3, len(attrs)))
    clause_attrs, subject_attrs = attrs[:n_clause], attrs[n_clause:]
    subject = noun_phrase(o, rng, subject_attrs)
    bg_in_subject = rng.random() < 0.2
    if bg_in_subject:
        subject += " " + _bg(spec.background, rng)
    clauses = [attribute_clause(o, a, rng) for a in clause_attrs]
    if not bg_in_subject and rng.random() < 0.5:
        clauses.append(background_clause(spec.background, rng))
    for other in spec.objects:
        if other is not o and rng.random() < 0.75:
            clauses.append(other_object_clause(other, rng, partial=rng.random() < 0.3))
    rng.shuffle(clauses)
    if len(clauses) > 1 and rng.random() < 0.3:
        clauses = [clauses[0], " and ".join(clauses[1:])] if len(clauses) > 2 else clauses
        text = " and ".join(clauses)
    else:
        text = _join(clauses)
    lead = rng.choice(("a photo of ", "a photo of ", "an image of ", "a picture of ", ""))
    return f"{lead}{subject} that {text}"


def partial_caption(spec: SceneSpec, rng: random.Random) -> str:
    """Some objects with some attributes ("a blue shape", "a circle on the left")."""
    objs = rng.sample(spec.objects, rng.randint(1, len(spec.objects)))
    text = _join([noun_phrase(o, rng, _random_attrs(rng)) for o in objs])
    if rng.random() < 0.3:
        text += " " + _bg(spec.background, rng)
    elif rng.random() < 0.1:
        return rng.choice(PREFIXES) + _article(f"{spec.background} background")
    return rng.choice(PREFIXES) + text


def caption(spec: SceneSpec, rng: random.Random, weights: Sequence[float] = (0.3, 0.15, 0.3, 0.25)) -> str:
    """A random caption: full description, partial one, relative-clause form, or edit form."""
    form = rng.choices(("full", "partial", "clause", "edit"), weights=weights)[0]
    if form == "full":
        return rng.choice(PREFIXES) + describe(spec, rng)
    if form == "partial":
        return partial_caption(spec, rng)
    if form == "clause":
        return clause_caption(spec, rng)
    return edit_caption(spec, rng)


# ------------------------------------------------------------------------------------ edits
def feasible_edits(spec: SceneSpec) -> list[str]:
    """Edit types that can be applied to `spec` (add needs < 3 objects, remove needs >= 2)."""
    out = list(ATTRIBUTE_EDITS)
    if len(spec.objects) < MAX_OBJECTS:
        out.append("add")
    if len(spec.objects) >= 2:
        out.append("remove")
    return out + ["two"]


def _canonical(o: ObjectSpec) -> ObjectSpec:
    return ObjectSpec(o.shape, o.colour, o.size, o.position, o.pattern)


def _attribute_change(spec: SceneSpec, attr: str, rng: random.Random, k: int | None = None) -> dict[str, Any]:
    """A change {attr, obj, old, new} of one attribute that keeps the scene valid."""
    if attr == "background":
        return {"attr": attr, "obj": None, "old": spec.background,
                "new": rng.choice([b for b in BACKGROUNDS if b != spec.background])}
    k = rng.randrange(len(spec.objects)) if k is None else k
    o = spec.objects[k]
    keys = {x.key for i, x in enumerate(spec.objects) if i != k}
    if attr == "colour":
        choices = [c for c in COLOURS if c != o.colour and (c, o.shape) not in keys]
    elif attr == "shape":
        choices = [s for s in SHAPES if s != o.shape and (o.colour, s) not in keys]
    elif attr == "size":
        choices = [z for z in SIZES if z != o.size]
    elif attr == "position":
        choices = spec.free_positions()
    else:
        raise ValueError(attr)
    return {"attr": attr, "obj": k, "old": getattr(o, attr), "new": rng.choice(choices)}


def apply_changes(spec: SceneSpec, changes: Sequence[dict[str, Any]]) -> SceneSpec:
    """The scene after the changes; edited objects lose their render jitter (canonical target)."""
    out = spec.copy()
    for ch in changes:
        if ch["attr"] == "background":
            out.background, out.tint = ch["new"], (0, 0, 0)
        elif ch["attr"] == "add":
            out.objects.append(ObjectSpec(**{**ch["new"], "tint": tuple(ch["new"].get("tint", (0, 0, 0)))}))
        elif ch["attr"] == "remove":
            out.objects.pop(ch["obj"])
        else:
            o = _canonical(out.objects[ch["obj"]])
            setattr(o, ch["attr"], ch["new"])
            out.objects[ch["obj"]] = o
    return out


def edit_scene(spec: SceneSpec, edit_type: str, rng: random.Random) -> tuple[SceneSpec, list[dict[str, Any]]]:
    """Apply one edit of `edit_type` (see EDIT_TYPES): (target spec, list of changes)."""
    if edit_type in ATTRIBUTE_EDITS:
        changes = [_attribute_change(spec, edit_type, rng)]
    elif edit_type == "add":
        new = random_object(rng, [o.position for o in spec.objects], [o.key for o in spec.objects], p_pattern=0.0)
        changes = [{"attr": "add", "obj": len(spec.objects), "new": asdict(new), "old": None}]
    elif edit_type == "remove":
        k = rng.randrange(len(spec.objects))
        changes = [{"attr": "remove", "obj": k, "old": asdict(_canonical(spec.objects[k])), "new": None}]
    elif edit_type == "two":
        a, b = rng.sample(ATTRIBUTE_EDITS, 2)
        first = _attribute_change(spec, a, rng)
        mid = apply_changes(spec, [first])
        second = _attribute_change(mid, b, rng, k=first["obj"] if b != "background" and first["obj"] is not None else None)
        changes = [first, second]
    else:
        raise ValueError(f"unknown edit type {edit_type!r}; use one of {EDIT_TYPES}")
    return apply_changes(spec, changes), changes


def _ref(o: ObjectSpec, spec: SceneSpec, rng: random.Random) -> str:
    """How the edit names an object: "it" alone in a scene, else "the red circle" (unique)."""
    if len(spec.objects) == 1 and rng.random() < 0.7:
        return "it"
    shapes = [x.shape for x in spec.objects]
    if shapes.count(o.shape) == 1 and rng.random() < 0.4:
        return f"the {o.shape}"
    return f"the {o.colour} {o.shape}"


def _change_clause(spec: SceneSpec, ch: dict[str, Any], rng: random.Random, imperative: bool) -> str:
    """One change as a clause ("is blue instead") or an imperative ("make it blue")."""
    attr, new, old = ch["attr"], ch["new"], ch["old"]
    if attr == "background":
        if imperative:
            return rng.choice((f"make the background {new}", f"change the background to {new}",
                               f"put it on a {new} background", f"use a {new} background"))
        return rng.choice((f"has a {new} background instead", f"is on a {new} background instead",
                           f"is now on a {new} background", f"has a {new} background instead of a {old} one",
                           f"has a {new} background"))
    if attr == "add":
        o = ObjectSpec(**{**new, "tint": tuple(new.get("tint", (0, 0, 0)))})
        np_ = noun_phrase(o, rng)
        if imperative:
            return rng.choice((f"add {np_}", f"add {np_}", f"put {np_} in it", f"include {np_}"))
        return rng.choice((f"also has {np_}", f"also has {np_}", f"has {np_} too", f"now also shows {np_}",
                           f"now includes {np_}"))
    if attr == "remove":
        what = f"the {old['colour']} {old['shape']}"
        if imperative:
            return rng.choice((f"remove {what}", f"remove {what}", f"take away {what}", f"delete {what}"))
        return rng.choice((f"no longer has {what}", f"no longer has {what}", f"does not have {what}",
                           f"is without {what}", f"has no {old['colour']} {old['shape']} anymore"))
    o = spec.objects[ch["obj"]]
    single = len(spec.objects) == 1
    ref = _ref(o, spec, rng)
    if attr == "colour":
        if imperative:
            return rng.choice((f"make {ref} {new}", f"make {ref} {new}", f"change {ref} to {new}",
                               f"turn {ref} {new}", f"colour {ref} {new}"))
        if single:
            return rng.choice((f"is {new} instead", f"is now {new}", f"is {new} instead of {old}",
                               f"is {new}", f"is coloured {new} instead"))
        return rng.choice((f"has the {old} {o.shape} in {new} instead", f"has a {new} {o.shape} instead of the {old} one",
                           f"has the {old} {o.shape} coloured {new}"))
    if attr == "shape":
        if imperative:
            return rng.choice((f"make {ref} {_article(new)}", f"change {ref} to {_article(new)}",
                               f"replace {ref} with {_article(new)}", f"turn {ref} into {_article(new)}"))
        if single:
            return rng.choice((f"is {_article(new)} instead", f"is now {_article(new)}",
                               f"is {_article(new)} instead of {_article(old)}", f"is {_article(new)}",
                               f"has {_article(new)} instead of {_article(old)}"))
        return rng.choice((f"has {_article(o.colour + ' ' + new)} instead of the {o.colour} {old}",
                           f"has the {o.colour} {old} turned into {_article(new)}"))
    if attr == "size":
        comp = rng.choice(COMPARATIVES[new])
        w = rng.choice(SIZE_WORDS[new])
        if imperative:
            return rng.choice((f"make {ref} {comp}", f"make {ref} {w}", f"make {ref} {comp}"))
        if single:
            return rng.choice((f"is {comp}", f"is {w} instead", f"is now {w}", f"is {comp} instead", f"is {w}"))
        return rng.choice((f"has the {o.colour} {o.shape} {comp}", f"has a {w} {o.colour} {o.shape} instead",
                           f"has the {o.colour} {o.shape} made {comp}"))
    if attr == "position":
        move = rng.choice(MOVE_PHRASES[new])
        at = rng.choice(POSITION_PHRASES[new])
        if imperative:
            return rng.choice((f"move {ref} {move}", f"move {ref} {move}", f"put {ref} {at}", f"shift {ref} {move}"))
        if single:
            return rng.choice((f"is moved {move}", f"is now {at}", f"is {at} instead", f"has been moved {move}",
                               f"is {at}"))
        return rng.choice((f"has the {o.colour} {o.shape} moved {move}", f"has the {o.colour} {o.shape} {at} instead",
                           f"has the {o.colour} {o.shape} {at}"))
    raise ValueError(attr)


def relative_caption(source: SceneSpec, changes: Sequence[dict[str, Any]], rng: random.Random,
                     imperative: bool | None = None) -> str:
    """Relative caption of an edit of `source`: clauses ("is blue instead") or imperatives ("make it blue")."""
    imperative = rng.random() < 0.3 if imperative is None else imperative
    parts, spec = [], source
    for ch in changes:
        parts.append(_change_clause(spec, ch, rng, imperative))
        spec = apply_changes(spec, [ch])
    return " and ".join(parts)


def invert_changes(source: SceneSpec, changes: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Changes that undo `changes` applied to `source` (used to caption a target by its source)."""
    out, spec = [], source
    for ch in changes:
        if ch["attr"] == "add":
            out.append({"attr": "remove", "obj": len(spec.objects), "old": ch["new"], "new": None})
        elif ch["attr"] == "remove":
            out.append({"attr": "add", "obj": None, "old": None, "new": ch["old"]})
        else:
            out.append({**ch, "old": ch["new"], "new": ch["old"]})
        spec = apply_changes(spec, [ch])
    return list(reversed(out))


def _edit_parts(spec: SceneSpec, rng: random.Random) -> tuple[str, SceneSpec, list[dict[str, Any]]]:
    """(description of another scene, that scene, the changes that lead from it to `spec`)."""
    etype = rng.choice(EDIT_TYPES)  # the edit that leads to `spec`
    if etype == "add" and len(spec.objects) < 2 or etype == "remove" and len(spec.objects) >= MAX_OBJECTS:
        etype = rng.choice(ATTRIBUTE_EDITS)
    inverse = {"add": "remove", "remove": "add"}.get(etype, etype)  # from `spec` back to the other scene
    other, changes = edit_scene(spec, inverse, rng)
    back = invert_changes(spec, changes)
    subject = describe(other, rng, p_background=0.7) if rng.random() < 0.8 else noun_phrase(
        other.objects[0], rng, _random_attrs(rng, 2))
    return subject, other, back


def edit_caption(spec: SceneSpec, rng: random.Random) -> str:
    """A caption of `spec` as an edit of another scene: "a photo of {other scene} that {edit}"."""
    subject, other, back = _edit_parts(spec, rng)
    lead = rng.choice(("a photo of ", "a photo of ", "an image of ", ""))
    return f"{lead}{subject} that {relative_caption(other, back, rng)}"


def composite_caption(spec: SceneSpec, rng: random.Random) -> tuple[str, str]:
    """(caption with one composite word "$", the description "$" stands for).

    The caption is "a photo of $" ($: this scene) or "a photo of $ that {edit}" ($: another scene).
    The trainer gives "$" to the text tower as one input vector, so that one token can stand for a
    whole scene, as "zebra" stands for a striped horse in real CLIP's vocabulary (docs/offline-world.md).
    """
    if rng.random() < 0.5:
        return "a photo of $", describe(spec, rng)
    subject, other, back = _edit_parts(spec, rng)
    return f"a photo of $ that {relative_caption(other, back, rng)}", subject


# ---------------------------------------------------------------------- concepts and phrases
def vocabulary() -> list[str]:
    """Concept vocabulary of the world: attribute words and short phrases ("red circle", "large star")."""
    words = list(SHAPES) + list(COLOURS)
    words += [f"{c} {s}" for c in COLOURS for s in SHAPES]
    words += [f"{z} {s}" for z in SIZES for s in SHAPES]
    words += [f"{z} {c} {s}" for z in SIZES for c in COLOURS for s in SHAPES]
    return list(dict.fromkeys(words))


def _object_for(concept: str, rng: random.Random) -> tuple[ObjectSpec, set[str]]:
    """A random object that the concept describes, and the attributes the concept fixes."""
    o = random_object(rng, p_pattern=0.1)
    fixed: set[str] = set()
    vocab = {"shape": SHAPES, "colour": COLOURS, "size": SIZES, "pattern": PATTERNS}
    for w in concept.split():
        attr = next((a for a, words in vocab.items() if w in words), None)
        if attr is not None:
            setattr(o, attr, w)
            fixed.add(attr)
    return o, fixed


def phrase_generator(samples: int = 16, seed: int = 0) -> Callable[[str], list[str]]:
    """Concept -> `samples` phrases of the world's grammar (seeded): the offline GPT phrase generator."""
    rng = random.Random(seed)
    return lambda concept: phrases_for(concept, rng, samples)


def phrases_for(concept: str, rng: random.Random, n: int) -> list[str]:
    """`n` offline continuations "a photo of {concept} that ..." (stand-in for GPT-Neo), all naming the concept."""
    out: dict[str, None] = {}
    for _ in range(n * 20):
        if len(out) >= n:
            break
        o, fixed = _object_for(concept, rng)
        spec = SceneSpec(rng.choice(list(BACKGROUNDS)), [o])
        for _ in range(rng.choice((0, 0, 1, 2))):
            spec.objects.append(random_object(rng, [x.position for x in spec.objects],
                                              [x.key for x in spec.objects], p_pattern=0.0))
        free = [a for a in ("shape", "colour", "size", "position") if a not in fixed]
        rng.shuffle(free)
        clauses = [attribute_clause(o, a, rng) for a in free[: rng.randint(1, max(1, min(2, len(free))))]]
        if rng.random() < 0.5:
            clauses.append(background_clause(spec.background, rng))
        clauses += [other_object_clause(x, rng) for x in spec.objects[1:]]
        rng.shuffle(clauses)
        out[f"a photo of {concept} that {_join(clauses)}"] = None
    return list(out)
