"""The demo's state and queries: gallery entries loaded once, caches, search and explanation."""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw

from isearle.backbone import Backbone, WeightsUnavailable
from isearle.demo.charts import bar_chart
from isearle.demo.examples import PHOTO_CAPTIONS, SHAPES_CAPTIONS, Examples, GroundTruth, load_examples
from isearle.demo.galleries import (
    BENCHMARK,
    GalleryEntry,
    ensure_offline_gallery,
    index_present,
    open_service,
)
from isearle.demo.inputs import load_reference, prepare_caption
from isearle.demo.media import REFERENCE_SIZE, ThumbnailCache, gallery_image, item_spec, render_spec
from isearle.demo.results import METHOD_LABELS, Explanation, ResultItem, SearchResult
from isearle.demo.settings import DEFAULT_OTI_STEPS, entries_from_args
from isearle.images import BadImage
from isearle.inspect import ALONE_TEMPLATE, Inspector, describe
from isearle.oti import OTIConfig
from isearle.paths import REPO_DIR, public_name, slug
from isearle.retrieval import Hit, LRUCache, Retriever, image_key
from isearle.runtime import set_threads
from isearle.service import Service
from isearle.vocabulary import SHAPES_MODELS, TokenTable, trained_token_ids

CONCEPT_TEMPLATE = ALONE_TEMPLATE  # "a photo of $": the prompt of the nearest concepts

log = logging.getLogger(__name__)


class Loaded:
    """A loaded gallery entry: its service and what the panel needs, built once."""

    def __init__(self, entry: GalleryEntry, service: Service) -> None:
        self.entry, self.service = entry, service
        self.table = TokenTable(service.backbone)
        self.trained = trained_token_ids(service.backbone)
        self.benchmark = service.index.info.get("benchmark") == BENCHMARK
        self._bank: Any = None
        self._bank_lock = threading.Lock()

    @property
    def backbone(self) -> Backbone:
        return self.service.backbone

    @property
    def shapes(self) -> bool:
        return self.backbone.name in SHAPES_MODELS

    def concepts(self) -> Any:
        """The concept bank (shapes vocabulary, or ImageNet names for real CLIPs), built once and
        disk-cached per weights (`concepts.concept_bank`); random-init weights are never cached."""
        with self._bank_lock:
            if self._bank is None:
                from isearle.concepts import concept_bank

                self._bank = concept_bank(self.backbone, "shapes" if self.shapes else "imagenet", progress=False,
                                          cache=self.backbone.pretrained is not None)
            return self._bank

    def label(self) -> str:
        b, n = self.backbone, len(self.service.index)
        world = "offline shapes world" if self.benchmark else self.entry.directory.name
        return f"{b.name} / {b.pretrained} · {world} ({n:,} images)"


class DemoEngine:
    """The demo's state: gallery entries (loaded lazily, once), caches, example references."""

    def __init__(self, entries: Sequence[GalleryEntry], device: str | None = None, cache_size: int = 256,
                 thumbs_dir: str | Path | None = None, examples: Examples | None = None,
                 benchmark_dir: str | Path | None = None, precision: str = "fp32") -> None:
        if not entries:
            raise ValueError("no gallery configured")
        self.entries = {e.key: e for e in entries}
        self.default_key = entries[0].key
        self.device, self.cache_size = device, cache_size
        self.precision = precision  # of the query path; "auto" is measured once per loaded model
        self.thumbs = ThumbnailCache(thumbs_dir or Path(tempfile.gettempdir()) / "isearle-demo")
        self.examples = examples
        self.truth = GroundTruth.load(benchmark_dir, examples)
        self._loaded: dict[str, Loaded] = {}
        self._load_lock = threading.Lock()
        self.threads = torch.get_num_threads()  # after `set_threads()`: the CPU quota
        #: display-image content hash -> (gallery key, item id): references picked from a gallery
        self.known = LRUCache(4096)
        #: what start-up found wrong and did about it (damaged galleries rebuilt or skipped), shown by the app
        self.notices: list[str] = []

    # --------------------------------------------------------------------------- loading
    def load(self, key: str | None = None, progress: bool = True) -> Loaded:
        """The loaded entry `key` (default: the first); each model is loaded once per process."""
        key = key or self.default_key
        if key not in self.entries:
            raise ValueError(f"unknown backbone {key!r}: choose one of {', '.join(self.entries)}")
        loaded = self._loaded.get(key)
        if loaded is not None:
            return loaded
        with self._load_lock:
            if key not in self._loaded:
                service = open_service(self.entries[key], self.device, self.cache_size, progress)
                if self.precision != "fp32":
                    service.retriever.set_precision(self.precision)
                self._loaded[key] = Loaded(self.entries[key], service)
            return self._loaded[key]

    def is_loaded(self, key: str) -> bool:
        return key in self._loaded

    @classmethod
    def start(cls, args: argparse.Namespace, warm: bool = True) -> DemoEngine:
        """The engine of the app's settings, its default entry loaded (and warmed up).

        An entry that cannot be loaded (weights neither cached nor downloadable, no index) is dropped
        with a message, so that a machine without network falls back to the offline world.
        """
        entries, problems, notices = [], [], []
        for entry in entries_from_args(args):
            if not entry.directory.is_absolute() and not entry.directory.exists():
                entry.directory = REPO_DIR / entry.directory
            has_source = entry.images is not None or bool(entry.hf_dataset)
            if not has_source and entry.directory.resolve() == (REPO_DIR / "gallery_index").resolve():
                ensure_offline_gallery(entry.directory, notices=notices)  # built when missing, damaged or stale
            if has_source or index_present(entry.directory):
                entries.append(entry)
            else:
                problems.append(f"no gallery index in {entry.directory}")
        engine = None
        while entries:
            engine = cls(entries, args.device, args.cache_size, examples=load_examples(args.examples),
                         precision=getattr(args, "precision", "fp32"))
            try:
                engine.warm_up() if warm else engine.load()
                break
            except (WeightsUnavailable, FileNotFoundError, ValueError, OSError) as err:
                problems.append(f"{entries[0].key}: {err}")
                notices.append(f"skipped {entries[0].key}: {err}")
                log.warning("skipping %s: %s", entries[0].key, err)
                entries = entries[1:]
        if not entries or engine is None:
            raise FileNotFoundError("nothing to serve: " + "; ".join(problems) +
                                    " (build the offline gallery with `python -m isearle.demo build-gallery`)")
        engine.notices = notices
        return engine

    def label(self, key: str) -> str:
        """Dropdown label of an entry, read from its index header without loading the model."""
        if key in self._loaded:
            return self._loaded[key].label()
        entry = self.entries[key]
        info: dict = {}
        try:
            info = json.loads((entry.directory / "index.json").read_text()).get("info", {})
        except (OSError, ValueError):
            pass
        model = info.get("model") or entry.model or "?"
        pretrained = info.get("pretrained") or entry.pretrained
        world = "offline shapes world" if info.get("benchmark") == BENCHMARK else (
            str(entry.hf_dataset or (entry.images.name if entry.images else entry.directory.name)))
        count = f" ({info['count']:,} images)" if "count" in info else ""
        return f"{model} / {pretrained} · {world}{count}"

    def warm_up(self, key: str | None = None) -> Loaded:
        """Load an entry and run one query and one explanation, so the first user does not wait."""
        loaded = self.load(key)
        ref = _warm_image(loaded.backbone.image_size)
        method = "phi" if loaded.service.phi is not None else "image+text"
        self._query(loaded.service.retriever, ref, "is blue", k=1, method=method)
        loaded.concepts()
        if method == "phi":
            self._explain(loaded, ref, "is blue", "phi", loaded.service.oti_config(), 3, True)
        else:
            bar_chart(["warm-up"], [0.5], "warm-up")
        self.example_paths()
        return loaded

    def example_paths(self) -> list[tuple[str, str, str]]:
        """(display image path, caption, short label) per example reference, registered as gallery items.

        Without an examples file: the first gallery items of the default entry, with example captions.
        """
        if not self.examples or not self.examples.references:
            loaded = self.load()
            ids = loaded.service.index.ids[:8]
            caps = self.captions(self.default_key)
            return [(self.reference_image(self.default_key, i)[0], caps[n % len(caps)], i) for n, i in enumerate(ids)]
        out = []
        for ex in self.examples.references:
            if ex.spec is None:
                continue
            image = render_spec(ex.spec, REFERENCE_SIZE)
            path = self.thumbs.save(image, f"example-{slug(ex.reference_id)}")
            self.known.put(image_key(image), ("*benchmark*", ex.reference_id))
            out.append((path, ex.caption, ex.edit_type or ex.reference_id))
        return out

    # ------------------------------------------------------------------------- references
    def reference_image(self, key: str, item_id: str) -> tuple[str, Image.Image]:
        """A gallery item as a new reference: a display-size PNG, remembered as that item."""
        loaded = self.load(key)
        if item_id not in loaded.service.index.metadata:
            raise ValueError(f"gallery item {item_id!r} is not in this gallery")
        image = gallery_image(loaded.service.index, item_id, REFERENCE_SIZE)
        path = self.thumbs.save(image, f"ref-{hashlib.blake2b((key + item_id).encode(), digest_size=8).hexdigest()}")
        self.known.put(image_key(image), (key, item_id))
        return path, image

    def resolve_reference(self, loaded: Loaded, key: str, image: Image.Image) -> tuple[Image.Image, str | None]:
        """(image to encode, gallery id): a known gallery item is encoded exactly as the gallery was."""
        hit = self.known.get(image_key(image))
        if hit is None:
            return image, None
        gallery_key, item_id = hit
        index = loaded.service.index
        same = gallery_key == key or (gallery_key == "*benchmark*" and loaded.benchmark)
        if not same or item_id not in index.metadata:
            return image, None
        spec = item_spec(index.metadata[item_id])
        if spec is not None:  # the exact pixels the gallery was embedded from
            size = int(index.info.get("render_size", loaded.backbone.image_size))
            return render_spec(spec, size), item_id
        return gallery_image(index, item_id, None), item_id

    # ---------------------------------------------------------------------------- queries
    def search(self, key: str | None, reference: str | Path | Image.Image | None, caption: str | None,
               k: int = 10, method: str = "phi", steps: int = DEFAULT_OTI_STEPS, progress: bool = False
               ) -> SearchResult:
        """A composed query; raises BadImage / CaptionError / ValueError with a one-line message."""
        start = time.perf_counter()
        key = key or self.default_key
        loaded = self.load(key)
        if method not in METHOD_LABELS:
            raise ValueError(f"unknown method {method!r}: choose phi or OTI")
        if method == "phi" and loaded.service.phi is None:
            raise ValueError("phi is not available for this backbone: choose OTI")
        if reference is None:
            raise BadImage("no reference image: upload one, or pick an example or a result")
        image, notes = load_reference(reference)
        cap = prepare_caption(loaded.backbone, caption, loaded.service.retriever.template, loaded.trained)
        notes += cap.notes
        query_image, ref_id = self.resolve_reference(loaded, key, image)
        retriever = loaded.service.retriever
        oti = loaded.service.oti_config(steps)
        cached = retriever.cached(query_image, cap.caption, method, oti)
        k = max(1, min(int(k), len(loaded.service.index) - (1 if ref_id else 0)))
        try:
            feature = retriever.query_feature(query_image, cap.caption, method, oti, progress)
            hits = retriever.search(feature, k, exclude=[ref_id] if ref_id else ())
        finally:
            set_threads(self.threads, faiss_threads=None)
        gts = self.truth.get(ref_id, cap.caption) if loaded.benchmark else None
        items = self.result_items(key, loaded, hits, set(gts or ()))
        return SearchResult(items, notes, cap.used if cap.cut else cap.prompt, method,
                            1000 * (time.perf_counter() - start), cached, ref_id, gts)

    def _query(self, retriever: Retriever, *args: Any, **kwargs: Any) -> list[Hit]:
        """`Retriever.query`, then torch's thread count put back.

        A FAISS search sets OpenMP's thread count to 1 for this thread (faiss.omp_set_num_threads),
        which torch reads too: without this, every later query in the same worker thread would run
        torch single-threaded.
        """
        try:
            return retriever.query(*args, **kwargs)
        finally:
            set_threads(self.threads, faiss_threads=None)

    def result_items(self, key: str, loaded: Loaded, hits: Sequence[Hit], gts: set[str]) -> list[ResultItem]:
        out = []
        for h in hits:
            gt = h.id in gts
            caption = f"#{h.rank} · {h.score:.3f}" + (" ✓" if gt else "")
            out.append(ResultItem(h.rank, h.id, h.score, self.thumbs.path(key, loaded.service.index, h.id), caption, gt))
        return out

    def explain(self, key: str | None, reference: str | Path | Image.Image | None, caption: str | None,
                method: str = "phi", steps: int = DEFAULT_OTI_STEPS, k: int = 6, trained_only: bool = True
                ) -> Explanation:
        """The pseudo-word panel for the same inputs as `search` (S* comes from the cache)."""
        key = key or self.default_key
        loaded = self.load(key)
        if reference is None:
            raise BadImage("no reference image: upload one, or pick an example or a result")
        image, _ = load_reference(reference)
        cap = prepare_caption(loaded.backbone, caption, loaded.service.retriever.template)
        query_image, ref_id = self.resolve_reference(loaded, key, image)
        if method == "phi" and loaded.service.phi is None:
            method = "oti"
        return self._explain(loaded, query_image, cap.caption, method, loaded.service.oti_config(steps),
                             k, trained_only, key, ref_id)

    def _explain(self, loaded: Loaded, image: Image.Image, caption: str, method: str, oti: OTIConfig,
                 k: int, trained_only: bool, key: str | None = None, ref_id: str | None = None) -> Explanation:
        retriever = loaded.service.retriever
        token = retriever.pseudo_token(image, method, oti)
        allowed = loaded.trained if (trained_only and loaded.trained is not None) else None
        view = describe(Inspector(loaded.service, loaded.table, loaded.concepts(), allowed), token)
        tokens, concepts = view.tokens, view.concepts
        which = "trained vocabulary" if allowed is not None else "whole vocabulary"
        tokens_chart = bar_chart([w for w, _ in tokens], [s for _, s in tokens],
                                 f"nearest tokens of S* ({which})")
        concepts_chart = bar_chart([c for c, _ in concepts], [s for _, s in concepts],
                                   "nearest concepts of “a photo of S*”", color="#db2777")
        image_only: list[ResultItem] = []
        text_only: list[ResultItem] = []
        if key is not None:
            exclude = [ref_id] if ref_id else ()
            gts = set(self.truth.get(ref_id, caption) or ()) if loaded.benchmark else set()
            image_only = self.result_items(key, loaded, self._query(retriever, image, caption, k, "image", exclude=exclude), gts)
            text_only = self.result_items(key, loaded, self._query(retriever, None, caption, k, "text", exclude=exclude), gts)
        summary = (f"S* reads as **{', '.join(w for w, _ in tokens[:3])}** · concepts: "
                   f"**{', '.join(c for c, _ in concepts[:3])}** · ‖S*‖ = {view.norm:.2f} "
                   f"(median token norm {loaded.table.median_norm:.2f})")
        return Explanation(tokens_chart, concepts_chart, tokens, concepts, image_only, text_only, summary)

    def info(self, key: str | None = None) -> dict[str, Any]:
        """What a backbone choice offers (the app's /info endpoint for API users)."""
        key = key or self.default_key
        loaded = self.load(key)
        return {"backbone": key, "label": self.label(key), "backbones": list(self.entries),
                "methods": (["phi"] if loaded.service.phi is not None else []) + ["oti"],
                "phi": public_name(loaded.service.phi_name), "gallery_size": len(loaded.service.index),
                "context_length": loaded.backbone.context_length, "benchmark": loaded.benchmark,
                "trained_vocabulary": loaded.trained is not None,
                "precision": loaded.service.retriever.precision_report()}

    def captions(self, key: str | None = None) -> list[str]:
        """Example captions suited to the entry's world."""
        if self.examples and self.examples.captions and (key is None or self.load(key).shapes):
            return self.examples.captions
        loaded = self.load(key)
        return list(SHAPES_CAPTIONS if loaded.shapes else PHOTO_CAPTIONS)

    def served_paths(self) -> list[str]:
        """The one folder the app serves files from: thumbnails and references at display size (and
        exported pseudo-words), written by the app. Never a gallery index or an image source folder."""
        return [str(self.thumbs.root)]

    def private_paths(self) -> list[str]:
        """Folders never served, whatever else allows them: galleries and the image folders they index."""
        return sorted({str(p) for e in self.entries.values() for p in (e.directory, e.images) if p is not None})


def _warm_image(size: int) -> Image.Image:
    image = Image.new("RGB", (size, size), (128, 128, 128))
    ImageDraw.Draw(image).ellipse([size // 4, size // 4, 3 * size // 4, 3 * size // 4], fill=(40, 80, 225))
    return image
