"""The demo's state and queries: one `Session` per gallery entry (loaded once), the references of
recent requests, search and the pseudo-word panel."""

from __future__ import annotations

import argparse
import hashlib
import logging
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from isearle.demo.charts import bar_chart
from isearle.demo.examples import PHOTO_CAPTIONS, SHAPES_CAPTIONS, Examples, GroundTruth
from isearle.demo.galleries import GalleryEntry, entry_label, open_service, startable_entries
from isearle.demo.media import REFERENCE_SIZE, ThumbnailCache, gallery_image, render_spec
from isearle.demo.results import Explanation, ResultItem, SearchResult
from isearle.demo.settings import DEFAULT_OTI_STEPS
from isearle.errors import BadRequest, IsearleError, NotFound
from isearle.explain import ALONE_TEMPLATE, describe_with_caption
from isearle.paths import public_name, slug
from isearle.reference import BadImage, Reference
from isearle.retrieval import Hit, LRUCache
from isearle.service import Session

CONCEPT_TEMPLATE = ALONE_TEMPLATE  # "a photo of $": the prompt of the nearest concepts
BENCHMARK_KEY = "*benchmark*"  # the gallery key of example references (any offline-world gallery)
Source = str | Path | Image.Image | Reference | None

log = logging.getLogger(__name__)


class DemoEngine:
    """The demo's state: gallery entries (each a `Session`, loaded lazily, once), example references,
    and the `Reference` of each recent upload (decoded, hashed and resolved once for all its requests)."""

    def __init__(self, entries: Sequence[GalleryEntry], device: str | None = None, cache_size: int = 256,
                 thumbs_dir: str | Path | None = None, examples: Examples | None = None,
                 benchmark_dir: str | Path | None = None, precision: str = "fp32") -> None:
        if not entries:
            raise ValueError("no gallery configured")
        self.entries = {e.key: e for e in entries}
        self.default_key = entries[0].key
        self.device, self.cache_size, self.precision = device, cache_size, precision
        self.thumbs = ThumbnailCache(thumbs_dir or Path(tempfile.gettempdir()) / "isearle-demo")
        self.examples, self.truth = examples, GroundTruth.load(benchmark_dir, examples)
        self._sessions: dict[str, Session] = {}
        self._load_lock = threading.Lock()
        self.known = LRUCache(4096)  # display-image content key -> (gallery key, item id): picked references
        self.references = LRUCache(64)  # (gallery key, upload file, size, mtime) -> its resolved Reference
        self.notices: list[str] = []  # what start-up found wrong and did about it, shown by the app

    def load(self, key: str | None = None, progress: bool = True) -> Session:
        """The session of entry `key` (default: the first); each model is loaded and tuned once per process."""
        key = key or self.default_key
        if key not in self.entries:
            raise BadRequest(f"unknown backbone {key!r}: choose one of {', '.join(self.entries)}")
        with self._load_lock:
            if key not in self._sessions:
                self._sessions[key] = open_service(self.entries[key], self.device, self.cache_size, progress,
                                                   self.precision)
            return self._sessions[key]

    def is_loaded(self, key: str) -> bool:
        return key in self._sessions

    @classmethod
    def start(cls, args: argparse.Namespace, warm: bool = True) -> DemoEngine:
        """The engine of the app's settings, its default entry loaded (and warmed up). An entry that
        cannot be loaded (no weights, no index) is dropped with a notice, so that a machine without
        network falls back to the offline world."""
        from isearle.demo.examples import load_examples

        entries, problems, notices = startable_entries(args)
        while entries:
            engine = cls(entries, args.device, args.cache_size, examples=load_examples(args.examples),
                         precision=getattr(args, "precision", "fp32"))
            try:
                engine.warm_up() if warm else engine.load()
            except (IsearleError, OSError) as err:
                problems.append(f"{entries[0].key}: {err}")
                notices.append(f"skipped {entries[0].key}: {err}")
                log.warning("skipping %s: %s", entries[0].key, err)
                entries = entries[1:]
                continue
            engine.notices = notices
            return engine
        raise NotFound("nothing to serve: " + "; ".join(problems) +
                       " (build the offline gallery with `python -m isearle.demo build-gallery`)")

    def label(self, key: str) -> str:
        """Dropdown label of an entry (read from its index header until the model is loaded)."""
        return entry_label(self.entries[key], self._sessions.get(key))

    def warm_up(self, key: str | None = None) -> Session:
        """Load an entry and run one query and one explanation, so the first user does not wait."""
        session = self.load(key)
        ref = session.reference(_warm_image(session.backbone.image_size))
        method = "phi" if session.phi is not None else "image+text"
        session.search(ref, "is blue", 1, method)
        session.concepts()
        if method == "phi":
            self.explain(key, ref, "is blue", "phi", k=3)
        else:
            bar_chart(["warm-up"], [0.5], "warm-up")
        self.example_paths()
        return session

    def example_paths(self) -> list[tuple[str, str, str]]:
        """(display image path, caption, short label) per example reference, registered as gallery items.
        Without an examples file: the first gallery items of the default entry, with example captions."""
        if not self.examples or not self.examples.references:
            ids, caps = self.load().index.ids[:8], self.captions(self.default_key)
            return [(self.reference_image(self.default_key, i)[0], caps[n % len(caps)], i) for n, i in enumerate(ids)]
        out = []
        for ex in (e for e in self.examples.references if e.spec is not None):
            image = render_spec(ex.spec, REFERENCE_SIZE)
            path = self.thumbs.save(image, f"example-{slug(ex.reference_id)}")
            self.known.put(Reference.of(image).key, (BENCHMARK_KEY, ex.reference_id))
            out.append((path, ex.caption, ex.edit_type or ex.reference_id))
        return out

    def reference_image(self, key: str, item_id: str) -> tuple[str, Image.Image]:
        """A gallery item as a new reference: a display-size PNG, remembered as that item."""
        session = self.load(key)
        if item_id not in session.index.metadata:
            raise BadRequest(f"gallery item {item_id!r} is not in this gallery")
        image = gallery_image(session.index, item_id, REFERENCE_SIZE)
        path = self.thumbs.save(image, f"ref-{hashlib.blake2b((key + item_id).encode(), digest_size=8).hexdigest()}")
        self.known.put(Reference.of(image).key, (key, item_id))
        return path, image

    def reference(self, key: str, source: Source) -> Reference:
        """The request's reference, resolved once: a known gallery item (its own pixels, left out of
        the rankings) or a new upload (decoded at the model's scale, hashed once); an upload file
        seen before (the explanation after its search) is not read again."""
        if source is None:
            raise BadImage("no reference image: upload one, or pick an example or a result")
        if isinstance(source, Reference):
            return source
        session, memo = self.load(key), None
        if isinstance(source, (str, Path)) and Path(source).is_file():
            st = Path(source).stat()
            memo = (key, str(source), st.st_size, st.st_mtime_ns)
            if (ref := self.references.get(memo)) is not None:
                return ref
        ref = session.reference(source)
        gallery, item_id = self.known.get(ref.key) or (None, None)
        same = gallery == key or (gallery == BENCHMARK_KEY and session.benchmark)
        if same and item_id in session.index.metadata:
            ref = session.item_reference(item_id, key, ref.notes)
        if memo is not None:
            self.references.put(memo, ref)
        return ref

    def search(self, key: str | None, reference: Source, caption: str | None, k: int = 10, method: str = "phi",
               steps: int = DEFAULT_OTI_STEPS, progress: bool = False) -> SearchResult:
        """A composed query; raises BadImage / CaptionError / BadRequest with a one-line message."""
        start = time.perf_counter()
        key = key or self.default_key
        session = self.load(key)
        session.check_method(method)
        ref = self.reference(key, reference)
        cap = session.caption(caption)
        oti = session.oti_config(steps)
        cached = session.retriever.cached(ref, cap.caption, method, oti)
        k = max(1, min(int(k), len(session) - len(ref.exclude)))
        gts = self.truth.get(ref.item_id, cap.caption) if session.benchmark else None
        marked = set(gts or ())  # with ground truths the whole ranking: their ranks, also outside the top k
        hits = session.search(ref, cap.caption, len(session) - len(ref.exclude) if gts else k, method, oti,
                              progress=progress)
        return SearchResult(self.result_items(key, session, hits[:k], marked), [*ref.notes, *cap.notes],
                            cap.used if cap.cut else cap.prompt, method, 1000 * (time.perf_counter() - start),
                            cached, ref.item_id, gts, self.result_items(key, session, [h for h in hits if h.id in marked], marked))

    def result_items(self, key: str, session: Session, hits: Sequence[Hit], gts: set[str]) -> list[ResultItem]:
        out = []
        for h in hits:
            caption = f"#{h.rank} · {h.score:.3f}" + (" ✓" if h.id in gts else "")
            out.append(ResultItem(h.rank, h.id, h.score, self.thumbs.path(key, session.index, h.id), caption, h.id in gts))
        return out

    def explain(self, key: str | None, reference: Source, caption: str | None, method: str = "phi",
                steps: int = DEFAULT_OTI_STEPS, k: int = 6, trained_only: bool = True) -> Explanation:
        """The pseudo-word panel for the same inputs as `search`: S*, the image feature and the query
        come from the search's caches (same `Reference`), only the caption alone is new."""
        key = key or self.default_key
        session = self.load(key)
        ref = self.reference(key, reference)
        cap = session.caption(caption, check_vocabulary=False)
        method = "oti" if method == "phi" and session.phi is None else method
        oti = session.oti_config(steps)
        token = session.retriever.pseudo_token(ref, method, oti)
        view = describe_with_caption(session, token, cap.caption, trained_only=trained_only)  # + the text-only query
        which = "trained vocabulary" if session.allowed(trained_only) is not None else "whole vocabulary"
        tokens_chart = bar_chart([w for w, _ in view.tokens], [s for _, s in view.tokens],
                                 f"nearest tokens of S* ({which})")
        concepts_chart = bar_chart([c for c, _ in view.concepts], [s for _, s in view.concepts],
                                   "nearest concepts of “a photo of S*”", color="#db2777")
        gts = set(self.truth.get(ref.item_id, cap.caption) or ()) if session.benchmark else set()
        image_only = self.result_items(key, session, session.search(ref, cap.caption, k, "image"), gts)
        text_only = self.result_items(key, session, session.search(None, cap.caption, k, "text", exclude=ref.exclude),
                                      gts)
        summary = (f"S* reads as **{', '.join(w for w, _ in view.tokens[:3])}** · concepts: "
                   f"**{', '.join(c for c, _ in view.concepts[:3])}** · ‖S*‖ = {view.norm:.2f} "
                   f"(median token norm {session.table.median_norm:.2f})")
        return Explanation(tokens_chart, concepts_chart, view.tokens, view.concepts, image_only, text_only, summary)

    def info(self, key: str | None = None) -> dict[str, Any]:
        """What a backbone choice offers (the app's /info endpoint for API users)."""
        key = key or self.default_key
        s = self.load(key)
        return {"backbone": key, "label": self.label(key), "backbones": list(self.entries),
                "methods": (["phi"] if s.phi is not None else []) + ["oti"], "phi": public_name(s.phi_name),
                "gallery_size": len(s), "context_length": s.backbone.context_length, "benchmark": s.benchmark,
                "trained_vocabulary": s.trained is not None, "precision": s.precision_report()}

    def captions(self, key: str | None = None) -> list[str]:
        """Example captions suited to the entry's world."""
        if self.examples and self.examples.captions and (key is None or self.load(key).shapes):
            return self.examples.captions
        return list(SHAPES_CAPTIONS if self.load(key).shapes else PHOTO_CAPTIONS)

    def served_paths(self) -> list[str]:
        """The one folder served: the app's thumbnails (display size); never an index or image folder."""
        return [str(self.thumbs.root)]

    def private_paths(self) -> list[str]:
        """Folders never served, whatever else allows them: galleries and the image folders they index."""
        return sorted({str(p) for e in self.entries.values() for p in (e.directory, e.images) if p is not None})


def _warm_image(size: int) -> Image.Image:
    image = Image.new("RGB", (size, size), (128, 128, 128))
    ImageDraw.Draw(image).ellipse([size // 4, size // 4, 3 * size // 4, 3 * size // 4], fill=(40, 80, 225))
    return image
