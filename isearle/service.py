"""The one loaded-model object: `Session` (backbone, optional gallery index, phi, token table, trained
vocabulary, lazy concept bank, OTI settings and the cached query path), built by `load_service`.

The CLI's `query`, the demo, its inspector views, `isearle inspect`'s report and the Python API all
work through a session: it decodes a request's reference once (`Reference`), checks the caption,
runs the query and the pseudo-word views. A gallery index remembers the backbone that embedded it;
`load_service` loads that backbone (or refuses a different one), the default phi for it (the
project's shapes phi for the offline world, official SEARLE for OpenAI ViT-B/32 and ViT-L/14), and
tunes the query path once (`tuning.tune`: `--precision`, ONNX Runtime for warm captions).
"""

from __future__ import annotations

import copy
import functools
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from isearle.backbone import Backbone, canonical_name, load_backbone
from isearle.captions import PreparedCaption, prepare_caption
from isearle.concepts import ConceptBank
from isearle.defaults import DEFAULTS
from isearle.errors import BadRequest, NotFound
from isearle.gallery_items import gallery_image, item_spec, render_spec
from isearle.index import REBUILD_COMMANDS
from isearle.oti import OTIConfig
from isearle.phi import Phi, resolve_phi
from isearle.reference import Reference, item_key, load_reference
from isearle.retrieval import Hit, Retriever
from isearle.runtime import set_threads, torch_threads
from isearle.shapes.vocabulary import SHAPES_MODELS, trained_token_ids, world_token_ids
from isearle.tuning import tune
from isearle.vocabulary import TokenTable, readable_token

__all__ = ["BENCHMARK", "SHAPES_MODELS", "Session", "TokenTable", "load_service", "open_session", "readable_token",
           "trained_token_ids", "world_token_ids"]

#: `info["benchmark"]` of a gallery embedded from the ShapesCIR scenes (the offline world).
BENCHMARK = "shapescir"
#: The command that rebuilds the offline world's gallery (named in a damaged gallery's message).
OFFLINE_REBUILD = "python -m isearle.demo build-gallery"
REBUILD_COMMANDS.setdefault(BENCHMARK, OFFLINE_REBUILD)


class Session:
    """Everything a query and its explanation need, loaded once per model.

    `retriever` holds the query path's caches (features, S*, prompt prefixes, query features);
    `table` the nearest-token lookup; `trained` the token ids a small model was trained on (None:
    the whole vocabulary); `trained_only` whether the views list only those by default;
    `concepts()` the concept bank, built (or read from its disk cache) on first use.
    """

    def __init__(self, backbone: Backbone, index: Any = None, phi: Phi | None = None, phi_name: str | None = None,
                 *, cache_size: int = 256, retriever: Retriever | None = None, bank: ConceptBank | None = None,
                 vocabulary: str | None = None, trained_only: bool = True) -> None:
        self.backbone, self.index, self.phi_name = backbone, index, phi_name
        self.retriever = retriever or Retriever(backbone, index, phi, cache_size=cache_size)
        self.oti_settings: dict = dict(phi.oti_settings) if phi is not None else {}
        self.trained_only = trained_only
        self.vocabulary = vocabulary or ("shapes" if self.shapes else "imagenet")
        self._bank, self._table = bank, None
        self._lock = threading.Lock()

    # ------------------------------------------------------------------------------ what it holds
    @property
    def phi(self) -> Phi | None:
        return self.retriever.phi

    @property
    def template(self) -> str:
        return self.retriever.template

    @functools.cached_property
    def trained(self) -> frozenset[int] | None:
        """Token ids a small model was trained on (None: a real CLIP, the whole vocabulary)."""
        return trained_token_ids(self.backbone)

    @property
    def shapes(self) -> bool:
        """Whether the backbone is a shapes-world model (its trained vocabulary is the world's)."""
        return self.backbone.name in SHAPES_MODELS

    @property
    def benchmark(self) -> bool:
        """Whether the gallery is the offline world's (ShapesCIR ids: ground truths can be marked)."""
        return self.index is not None and self.index.info.get("benchmark") == BENCHMARK

    @property
    def table(self) -> TokenTable:
        """Cosine to every row of the token-embedding table (built on first use)."""
        with self._lock:
            if self._table is None:
                self._table = TokenTable(self.backbone)
            return self._table

    @property
    def bank(self) -> ConceptBank:
        return self.concepts()

    def concepts(self, progress: bool = False) -> ConceptBank:
        """The concept bank (shapes vocabulary, or ImageNet names for real CLIPs), built once and
        disk-cached per weights (`concepts.concept_bank`); random-init weights are never cached."""
        with self._lock:
            if self._bank is None:
                from isearle.concepts import concept_bank

                self._bank = concept_bank(self.backbone, self.vocabulary, progress=progress,
                                          cache=self.backbone.pretrained is not None)
            return self._bank

    def viewing(self, trained_only: bool) -> Session:
        """This session with nearest-token lists over the trained vocabulary or not (a shallow view:
        the same models, caches, table and concept bank)."""
        if trained_only == self.trained_only:
            return self
        self.table, self.concepts()  # built once, shared by the view
        view = copy.copy(self)
        view.trained_only = trained_only
        return view

    def allowed(self, trained_only: bool | None = None) -> frozenset[int] | None:
        """Token ids the nearest-token lists may show: the trained ones (when asked and known), else all."""
        only = self.trained_only if trained_only is None else trained_only
        return self.trained if only else None

    def oti_config(self, steps: int | None = None) -> OTIConfig:
        """One-image OTI with the settings that made this phi's targets (e.g. the shapes world's norm cap)."""
        return OTIConfig(steps=int(steps or DEFAULTS.oti_steps), batch_size=1, **self.oti_settings)

    def precision_report(self) -> str:
        return self.retriever.precision_report()

    def __len__(self) -> int:
        """Gallery items (0 without a gallery)."""
        return len(self.index) if self.index is not None else 0

    def __bool__(self) -> bool:  # a session without a gallery is still a session
        return True

    # ------------------------------------------------------------------------------ one request
    def reference(self, source: str | Path | bytes | Image.Image) -> Reference:
        """An upload as a `Reference`: decoded once at about the model's input scale, hashed once."""
        image, notes = load_reference(source, self.backbone.image_size)
        ref = Reference.of(image)
        return Reference(ref.image, ref.key, tuple(notes))

    def item_reference(self, item_id: str, gallery: str = "", notes: Sequence[str] = ()) -> Reference:
        """A gallery item as a reference: its own pixels as the gallery embedded them (a shapes
        scene re-rendered at the gallery's render size, else its file), keyed by its id (no hash)."""
        if self.index is None or item_id not in self.index.metadata:
            raise BadRequest(f"gallery item {item_id!r} is not in this gallery")
        spec = item_spec(self.index.metadata[item_id])
        if spec is not None:
            image = render_spec(spec, int(self.index.info.get("render_size", self.backbone.image_size)))
        else:
            image = gallery_image(self.index, item_id, None)
        return Reference(image, item_key(gallery, item_id), tuple(notes), item_id)

    def caption(self, caption: str | None, check_vocabulary: bool = True) -> PreparedCaption:
        """The checked caption (`captions.prepare_caption`; words outside a small model's vocabulary noted)."""
        return prepare_caption(self.backbone, caption, self.template, self.trained if check_vocabulary else None)

    def check_method(self, method: str) -> None:
        if method not in ("phi", "oti"):
            raise BadRequest(f"unknown method {method!r}: choose phi or OTI")
        if method == "phi" and self.phi is None:
            raise BadRequest("phi is not available for this backbone: choose OTI")

    def search(self, ref: Reference | Image.Image | None, caption: str, k: int = 10, method: str = "phi",
               oti: OTIConfig | None = None, exclude: Sequence[str] = (), progress: bool = False) -> list[Hit]:
        """Top-k gallery hits of a composed query (the reference's own item left out), run with the
        process's torch thread count (`runtime.torch_threads`) and that count put back afterwards.

        A FAISS search sets OpenMP's thread count to 1 for the calling thread (faiss.omp_set_num_threads),
        which torch reads too: without this, every later query in the same worker thread would run
        torch single-threaded, and a query's numbers would depend on which thread ran it (the thread
        count changes the order of fp32 sums).
        """
        if isinstance(ref, Reference):
            exclude = [*exclude, *ref.exclude]
        set_threads(torch_threads(), faiss_threads=None)
        try:
            feature = self.retriever.query_feature(ref, caption, method, oti, progress)
            return self.retriever.search(feature, k, exclude)
        finally:
            set_threads(torch_threads(), faiss_threads=None)


def load_service(gallery: str | Path = DEFAULTS.gallery, model: str | None = None, pretrained: str | None = None,
                 phi: str | None = None, device: str | None = None, cache_size: int = 256,
                 backbone: Backbone | None = None, precision: str = "fp32") -> Session:
    """Open a gallery index, the backbone that embedded it (or `backbone`, checked) and a phi; tune
    the query path once for `precision` ("auto" measures fp32 and bf16 and ONNX Runtime, `tuning`).

    `phi` names one ("searle", "searle-xl", a checkpoint); by default the backbone's own, if it can
    be had. Raises NotFound / BackboneMismatch / WeightsUnavailable (all `IsearleError`).
    """
    from isearle.index import GalleryIndex

    gallery = Path(gallery)
    if not (gallery / "index.json").is_file() and not any(gallery.glob("*.faiss")):
        raise NotFound(f"no gallery index in {gallery}: build one with `isearle index`")
    index = GalleryIndex.load(gallery, expect_backbone=backbone)
    if backbone is None:
        info = index.info
        pretrained = pretrained or info.get("pretrained")
        model = canonical_name(model or info.get("model"), pretrained)  # the index records the QuickGELU name
        if (model, pretrained) != (info.get("model"), info.get("pretrained")):
            raise BadRequest(f"gallery {gallery} was embedded with {info.get('model')}/{info.get('pretrained')}, "
                             f"not {model}/{pretrained}: rebuild it with `isearle index --model {model}`")
        backbone = load_backbone(model, pretrained, device)
    return open_session(backbone, index, phi, cache_size=cache_size, precision=precision)


def open_session(backbone: Backbone, index: Any = None, phi: str | None = None, *, cache_size: int = 256,
                 precision: str = "fp32", vocabulary: str | None = None, trained_only: bool = True) -> Session:
    """A session over a loaded backbone (and a gallery index, or None for inversion alone), with
    phi resolved (given or the backbone's default) and the query path tuned for `precision`."""
    phi_net, phi_name = resolve_phi(backbone, phi)
    session = Session(backbone, index, phi_net, phi_name, cache_size=cache_size, vocabulary=vocabulary,
                      trained_only=trained_only)
    if precision != "fp32":
        tune(session.retriever, precision)
    return session

