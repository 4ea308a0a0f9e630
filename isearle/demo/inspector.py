"""The demo's inspector views: `isearle.explain` for the app's inputs (no gradio here).

Each view takes what the app's widgets hold (backbone key, reference file, caption, method, steps)
and resolves them as the search does: a gallery item or a benchmark example is encoded as the
gallery was and left out of the rankings, its ground truths marked; the caption is checked. The
numbers are `isearle.explain`'s; the views add thumbnails, plot rows and one-line summaries.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from isearle import explain as I
from isearle.demo.engine import DemoEngine
from isearle.demo.results import ResultItem
from isearle.demo.settings import DEFAULT_OTI_STEPS
from isearle.errors import BadRequest
from isearle.reference import BadImage
from isearle.reference import Reference as Picture
from isearle.retrieval import Hit
from isearle.service import Session


@dataclass
class Request:
    """One view's inputs resolved: the gallery entry's session (seen with the request's vocabulary
    choice), the `Reference` (decoded, hashed and resolved once), the checked caption, ground truths."""

    key: str
    session: Session
    ref: Picture
    caption: str | None
    gts: set[str] = field(default_factory=set)
    notes: list[str] = field(default_factory=list)

    @property
    def exclude(self) -> list[str]:
        return self.ref.exclude


def pairs(values: Sequence[tuple[str, float]]) -> list[list]:
    return [[w, round(s, 4)] for w, s in values]


@dataclass
class Frame:
    """One update of the streamed OTI view."""

    step: int
    steps: int
    losses: list[dict]  # plot rows {"step", "loss", "run"}
    tokens: list[list]
    concepts: list[list]
    items: list[ResultItem]
    norm: float
    summary: str
    done: bool
    elapsed_ms: float
    digest: str

    def as_json(self) -> dict:
        return {"step": self.step, "steps": self.steps, "done": self.done, "norm": round(self.norm, 6),
                "tokens": self.tokens, "concepts": self.concepts, "hits": [it.id for it in self.items],
                "elapsed_ms": round(self.elapsed_ms, 1), "digest": self.digest}


class InspectorViews:
    """The app's inspector views over a `DemoEngine` (its loaded backbones, caches and thumbnails)."""

    def __init__(self, engine: DemoEngine) -> None:
        self.engine = engine

    # ---------------------------------------------------------------------------------- inputs
    def reference(self, key: str | None, reference: Any, caption: str | None, trained_only: bool = True,
                  caption_required: bool = True) -> Request:
        """The reference and caption resolved as `DemoEngine.search` resolves them (the same `Reference`)."""
        key = key or self.engine.default_key
        session = self.engine.load(key)
        ref = self.engine.reference(key, reference)
        text, notes = None, list(ref.notes)
        if caption_required or (caption and caption.strip()):
            cap = session.caption(caption)
            text, notes = cap.caption, notes + cap.notes
        gts = set(self.engine.truth.get(ref.item_id, text) or ()) if (session.benchmark and text) else set()
        return Request(key, session.viewing(trained_only), ref, text, gts, notes)

    def token(self, req: Request, method: str, steps: int) -> Any:
        req.session.check_method(method)
        return req.session.retriever.pseudo_token(req.ref, method, self.oti(req, steps), progress=True)

    @staticmethod
    def oti(req: Request, steps: int) -> Any:
        return req.session.oti_config(int(steps))

    def items(self, req: Request, hits: Sequence[Hit], gts: set[str] | None = None) -> list[ResultItem]:
        return self.engine.result_items(req.key, req.session, hits, req.gts if gts is None else gts)

    @staticmethod
    def gt_line(ref: Request, items: Sequence[ResultItem]) -> str:
        if not ref.gts:
            return ""
        found = sum(1 for it in items if it.ground_truth)
        return f" · ShapesCIR ground truth: **{found} of {len(ref.gts)}** in the top {len(items)} (✓)"

    # ------------------------------------------------------------------------- 1. watch OTI
    def watch(self, key: str | None, reference: Any, caption: str | None, steps: int = DEFAULT_OTI_STEPS, every: int = 10,
              warm: bool = True, k: int = 5, trained_only: bool = True) -> Iterator[Frame]:
        """OTI streamed: a frame every `every` steps (the last frame is the plain OTI query's S*)."""
        ref = self.reference(key, reference, caption, trained_only)
        oti = self.oti(ref, steps)
        start = time.perf_counter()
        for f in I.watch_oti(ref.session, ref.ref, ref.caption, oti, every, k, ref.exclude, warm):
            rows = [{"step": i + 1, "loss": round(v, 5), "run": run} for run, vals in f.losses.items()
                    for i, v in enumerate(vals)]
            items = self.items(ref, f.hits)
            words = ", ".join(w for w, _ in f.view.tokens[:3])
            concepts = ", ".join(c for c, _ in f.view.concepts[:3])
            summary = (f"**step {f.step} / {f.steps}** · S\\* reads as **{words}** · concepts: **{concepts}** · "
                       f"‖S\\*‖ = {f.view.norm:.3f} ({f.view.relative_norm:.2f}× the mean token norm)"
                       + self.gt_line(ref, items))
            yield Frame(f.step, f.steps, rows, pairs(f.view.tokens), pairs(f.view.concepts), items,
                        f.view.norm, summary, f.done, 1000 * (time.perf_counter() - start), I.token_digest(f.token))

    # ------------------------------------------------------------------------ 2. S* alone
    def alone(self, key: str | None, reference: Any, caption: str | None, method: str = "phi", steps: int = DEFAULT_OTI_STEPS,
              k: int = 10, trained_only: bool = True) -> tuple[list[ResultItem], str, dict]:
        """The gallery's top-k for "a photo of S*" with no caption (ground truths of the query marked)."""
        ref = self.reference(key, reference, caption, trained_only, caption_required=False)
        token = self.token(ref, method, steps)
        items = self.items(ref, I.rank(ref.session, token, None, k, ref.exclude))
        view = I.describe(ref.session, token)
        summary = (f"**“a photo of S\\*”**, no caption · {method} · ‖S\\*‖ = {view.norm:.3f}" + self.gt_line(ref, items))
        return items, summary, {"hits": [it.id for it in items], "ground_truth": [it.id for it in items
                                                                                 if it.ground_truth], **view.as_dict()}

    # ---------------------------------------------------------------------- 3. phi vs OTI
    def compare(self, key: str | None, reference: Any, caption: str | None, steps: int = DEFAULT_OTI_STEPS, k: int = 10,
                trained_only: bool = True) -> tuple[list[ResultItem], list[ResultItem], list[list], str, dict]:
        """phi's and OTI's S* side by side: rankings, nearest concepts and tokens, cosine, overlap@k."""
        ref = self.reference(key, reference, caption, trained_only)
        if ref.session.phi is not None:
            self.token(ref, "oti", steps)  # with a progress bar (then cached)
        c = I.compare(ref.session, ref.ref, ref.caption, self.oti(ref, steps), k, ref.exclude)
        phi_items, oti_items = self.items(ref, c.phi_hits), self.items(ref, c.oti_hits)
        table = [[i + 1, *_cell(c.phi.concepts, i), *_cell(c.oti.concepts, i), *_cell(c.phi.tokens, i),
                  *_cell(c.oti.tokens, i)] for i in range(10)]
        summary = (f"cosine of phi's and OTI's S\\*: **{c.cosine:.3f}** · overlap@{k} of the rankings: "
                   f"**{c.overlap:.0%}** · ‖S\\*‖: phi {c.phi.norm:.3f}, OTI {c.oti.norm:.3f} (OTI {int(steps)} steps, "
                   f"warm-started from phi)")
        data = {"cosine": round(c.cosine, 6), "overlap": round(c.overlap, 6), "phi": c.phi.as_dict(),
                "oti": c.oti.as_dict(), "phi_hits": [it.id for it in phi_items], "oti_hits": [it.id for it in oti_items]}
        return phi_items, oti_items, table, summary, data

    # -------------------------------------------------------------------------- 4. blend
    def blend(self, key: str | None, reference: Any, second: Any, alpha: float, caption: str | None,
              method: str = "phi", steps: int = DEFAULT_OTI_STEPS, k: int = 10, trained_only: bool = True
              ) -> tuple[list[ResultItem], str, dict]:
        """The ranking of S* = (1-a) S*_A + a S*_B (norm interpolated), with the caption when there is one."""
        if second is None:
            raise BadImage("no second reference: upload one, or pick one of the examples below it")
        start = time.perf_counter()
        a = self.reference(key, reference, caption, trained_only, caption_required=False)
        b = self.reference(key, second, None, trained_only, caption_required=False)
        ta, tb = self.token(a, method, steps), self.token(b, method, steps)
        mix = I.blend(ta, tb, alpha)
        exclude = [*a.exclude, *b.exclude]
        items = self.items(a, I.rank(a.session, mix, a.caption, k, exclude), set())
        view = I.describe(a.session, mix, 3)
        summary = (f"**S\\* = {1 - alpha:.2f} · A + {alpha:.2f} · B** · ‖S\\*‖ = {view.norm:.3f} (A {float(ta.norm()):.3f}, "
                   f"B {float(tb.norm()):.3f}) · reads as **{', '.join(w for w, _ in view.tokens)}**"
                   + "".join(f"  \n⚠ {who}: {note}" for who, r in (("A", a), ("B", b)) for note in r.notes))
        return items, summary, {"alpha": float(alpha), "hits": [it.id for it in items], **view.as_dict(),
                                "elapsed_ms": round(1000 * (time.perf_counter() - start), 1)}

    # ------------------------------------------------------------------- 5. which words
    def words(self, key: str | None, reference: Any, caption: str | None, method: str = "phi", steps: int = DEFAULT_OTI_STEPS,
              k: int = 10, words: str | Sequence[str] | None = None, trained_only: bool = True
              ) -> tuple[list[dict], str, dict]:
        """Each caption word dropped (or the given words): change of the query, new rank of the top-1, overlap."""
        ref = self.reference(key, reference, caption, trained_only)
        token = self.token(ref, method, steps)
        chosen = [w for w in (words.replace(",", " ").split() if isinstance(words, str) else (words or ())) if w]
        start = time.perf_counter()
        base, effects = I.word_effects(ref.session, token, ref.caption, k, ref.exclude, chosen or None)
        elapsed = 1000 * (time.perf_counter() - start)
        width = len(str(len(effects)))  # zero-padded positions: the plot orders its bars as text
        rows = [{"word": e.word if e.position is None else f"{e.position + 1:0{width}d}. {e.word}",
                 "change": round(e.change, 6), "top1_rank": e.top1_rank, "overlap": round(e.overlap, 4)}
                for e in effects]
        top = max(effects, key=lambda e: e.change) if effects else None
        summary = (f"dropping **{top.word}** moves the query most (1 − cos = {top.change:.4f}; the current top-1 "
                   f"{'drops out of the first 100' if top.top1_rank is None else f'is then #{top.top1_rank}'}, "
                   f"overlap@{k} {top.overlap:.0%}) · {len(effects)} variants in {elapsed:.0f} ms") if top else ""
        return rows, summary, {"top": [h.id for h in base], "effects": rows, "elapsed_ms": round(elapsed, 1)}

    # ---------------------------------------------------------------- 6. S* as a file
    def export(self, key: str | None, reference: Any, method: str = "phi", steps: int = DEFAULT_OTI_STEPS,
               folder: str | Path | None = None) -> tuple[Path, dict]:
        """The reference's S* as a safetensors file (name: image hash + method), and its metadata."""
        ref = self.reference(key, reference, None, caption_required=False)
        token = self.token(ref, method, steps)
        meta = {**I.token_metadata(ref.session, ref.ref, method, self.oti(ref, steps)), "digest": I.token_digest(token)}
        folder = Path(folder or self.engine.thumbs.root / "pseudo-words")
        name = f"S-{method}{'-' + str(int(steps)) if method == 'oti' else ''}-{meta['image_hash'][:12]}.safetensors"
        return I.save_token(folder / name, token, meta), meta

    def search_token(self, key: str | None, path: str | Path | None, caption: str | None, k: int = 10
                     ) -> tuple[list[ResultItem], str, dict]:
        """A loaded S* as the reference: the ranking of "a photo of S* that {caption}" (S* alone without)."""
        if not path:
            raise BadRequest("no pseudo-word file: download one above, then upload it here")
        key = key or self.engine.default_key
        session = self.engine.load(key)
        word = I.load_token(path, session.backbone)
        text = None
        if caption and caption.strip():
            text = session.caption(caption, check_vocabulary=False).caption
        meta = word.metadata
        item = meta.get("reference_id")  # a gallery item's S*: left out and its ground truths marked
        item = str(item) if item is not None and str(item) in session.index.metadata else None
        gts = set(self.engine.truth.get(item, text) or ()) if (session.benchmark and text and item) else set()
        ref = Request(key, session, Picture(Image.new("RGB", (1, 1)), "", item_id=item), text, gts)
        items = self.items(ref, I.rank(ref.session, word.token, text, k, ref.exclude))
        shown = I.prompt(ref.session, text).replace("$", "S\\*")
        summary = (f"S\\* from a file: {meta.get('method', '?')} on {meta.get('model', '?')}, image "
                   f"`{str(meta.get('image_hash', '?'))[:12]}` · “{shown}”"
                   + (f" · gallery item `{item}` left out" if item else "") + self.gt_line(ref, items))
        return items, summary, {"hits": [it.id for it in items], "metadata": meta,
                                "ground_truth": [it.id for it in items if it.ground_truth]}


def _cell(values: Sequence[tuple[str, float]], i: int) -> tuple[str, float | None]:
    return (values[i][0], round(values[i][1], 3)) if i < len(values) else ("", None)
