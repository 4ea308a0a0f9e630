"""What the demo says in words: the first screen's plain explanation, the "how it works" glossary,
and the shareable link of a query (built from the inputs, read back from a page's URL)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlencode

from isearle.demo.inputs import MAX_CAPTION_CHARS

#: Range of the app's sliders, which a link's values are clamped to.
TOP_K_RANGE = (1, 50)
STEPS_RANGE = (10, 600)


def gallery_words(size: int, benchmark: bool, source: str) -> str:
    """What the gallery holds, in plain words."""
    if benchmark:
        return (f"**{size:,} synthetic pictures of coloured shapes** (the gallery of ShapesCIR, a small benchmark "
                f"made for this project; the model was trained on such pictures only)")
    return f"**{size:,} images** from {source}"


def intro(size: int, benchmark: bool, source: str) -> str:
    """The first screen: what the demo does, what it searches, what to do first."""
    return (
        "# Find a picture from an example and a change in words\n"
        "Pick a **reference picture** and write how the picture you want **differs** from it "
        "(“is blue instead”, “has a black background instead”). The demo searches "
        f"{gallery_words(size, benchmark, source)} for pictures that look like the reference *with that "
        "change*, and ranks them, best first. No labels are used: the model only learned to match pictures "
        "and sentences. **Start:** click one of the examples below, then *Search*. Click a result to use "
        "it as the next reference.")


GLOSSARY = """\
**How it works, in three steps.** (1) The reference picture is turned into a made-up *word*, written
**S\\***, that stands for its content. (2) That word is put into a sentence with your change:
“a photo of S\\* that is blue instead”. (3) The sentence is compared with every picture of the gallery
by a model that maps pictures and sentences to the same space (CLIP); the closest pictures come first.
This is *zero-shot composed image retrieval* by *textual inversion* (the SEARLE and iSEARLE papers).

| term | meaning |
|---|---|
| reference picture | the example you start from |
| relative caption | the change you write, relative to the reference |
| pseudo-word S\\* | the made-up word for the reference: a point in the model's word space, not a real word |
| phi | a small network that makes S\\* in one step (fast) |
| OTI | optimisation that makes S\\* in many small steps, matching the picture more closely (slower) |
| CLIP | the model that reads pictures and sentences; its text encoder reads the sentence with S\\* |
| score | how close a picture is to the sentence (cosine similarity, higher is closer) |
| ground truth ✓ | for the benchmark's examples, the pictures a person marked as the right answers |
"""

WORDS_NOTE = ("Small words (“a”, “the”, “that”) can move the query too: the text encoder reads the whole "
              "sentence at once, each word's meaning shaped by all the others, so dropping any word changes "
              "the sentence's single vector, not just one part of it.")


@dataclass
class SharedQuery:
    """A query as a link carries it: a gallery item as the reference, caption, method and settings."""

    ref: str | None = None
    caption: str = ""
    method: str | None = None
    k: int | None = None
    steps: int | None = None
    backbone: str | None = None
    present: bool = False


def _clamp(value: str | None, bounds: tuple[int, int]) -> int | None:
    try:
        return min(max(int(str(value)), bounds[0]), bounds[1])
    except (TypeError, ValueError):
        return None


def read_query(params: Mapping[str, str]) -> SharedQuery:
    """A link's query parameters (?ref=&caption=&method=&k=&steps=&backbone=&present=) checked:
    unknown or malformed values are dropped, numbers clamped to the sliders' ranges."""
    method = params.get("method")
    return SharedQuery(ref=(params.get("ref") or "").strip()[:64] or None,
                       caption=(params.get("caption") or "")[:MAX_CAPTION_CHARS],
                       method=method if method in ("phi", "oti") else None,
                       k=_clamp(params.get("k"), TOP_K_RANGE), steps=_clamp(params.get("steps"), STEPS_RANGE),
                       backbone=params.get("backbone") or None,
                       present=str(params.get("present", "")).lower() in ("1", "true", "yes", "on"))


def share_link(query: SharedQuery) -> str:
    """The query part of a link that reopens `query` ("?ref=...&caption=..."), relative to the page."""
    fields = {"ref": query.ref, "caption": query.caption, "method": query.method, "k": query.k,
              "steps": query.steps if query.method == "oti" else None, "backbone": query.backbone,
              "present": 1 if query.present else None}
    return "?" + urlencode({k: v for k, v in fields.items() if v not in (None, "")})
