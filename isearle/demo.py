"""Everything the Gradio demo does besides drawing widgets (no gradio import here).

`app.py` wires widgets to a `DemoEngine`: it opens the configured galleries (the bundled offline
shapes world, and on a Space a real CLIP over an image folder or a Hugging Face dataset, built
once and cached in gallery_index/), runs composed queries through the cached `Retriever`, marks
ShapesCIR ground truths, explains the pseudo-word S* (nearest vocabulary tokens and concepts, as
bar charts) and shows what image-only and text-only retrieval would return. Bad inputs surface as
`BadImage` / `CaptionError` with a one-line message; conversions and cut captions as notes.

Also here: settings (CLI flags with environment-variable defaults), the offline gallery builder
(`build_shapes_gallery`), the examples file builder (`make_examples`), latency statistics and
`AppProcess`, which runs `app.py` on a free localhost port for tests and benchmarks.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import html
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
import unicodedata
import urllib.request
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from isearle.backbone import ASSETS_DIR, REPO_DIR, Backbone, WeightsUnavailable, load_backbone
from isearle.images import BadImage, open_image
from isearle.oti import OTIConfig
from isearle.pseudo_word import encode_with_pseudo_tokens, fill_template, normalize_prompt, truncated
from isearle.retrieval import DEFAULT_TEMPLATE, Hit, LRUCache, Retriever, image_key
from isearle.service import DEFAULT_PHI, Service, load_service

EXAMPLES_PATH = ASSETS_DIR / "examples.json"
THUMB_SIZE = 160  # result thumbnails (px)
REFERENCE_SIZE = 256  # a gallery item shown as the reference (px)
MAX_CAPTION_CHARS = 1000  # longer input is cut before tokenising (the context is far shorter anyway)
MAX_UPLOAD_BYTES = 25 * 1024 * 1024
DEFAULT_OTI_STEPS = 150
METHOD_LABELS = {"phi": "phi (fast)", "oti": "OTI (precise)"}
CONCEPT_TEMPLATE = "a photo of $"
SHAPES_MODELS = ("isearle-shapes", "isearle-tiny-test")
BENCHMARK = "shapescir"

#: Relative captions offered as clickable examples (shapes world / real photos).
SHAPES_CAPTIONS = (
    "is blue instead", "is a star instead", "has a black background instead", "is larger",
    "is moved to the left", "also has a small red circle", "make it green and put it at the top",
)
PHOTO_CAPTIONS = (
    "is a dog instead", "shows the same scene at night", "is in black and white", "has two of them",
    "is red", "is on a beach",
)


class CaptionError(ValueError):
    """The caption cannot be used; the message says why in one line."""


# ------------------------------------------------------------------------------------ inputs
_MODE_NOTES = {
    "RGBA": "the image has transparency: transparent areas were filled with white",
    "LA": "the image has transparency: transparent areas were filled with white",
    "PA": "the palette image has transparency: transparent areas were filled with white",
    "P": "palette image converted to RGB",
    "CMYK": "CMYK image converted to RGB",
    "1": "1-bit black-and-white image converted to RGB",
    "I;16": "16-bit image scaled to 8 bits per channel",
    "I;16B": "16-bit image scaled to 8 bits per channel",
    "I;16L": "16-bit image scaled to 8 bits per channel",
    "I": "32-bit integer image scaled to 8 bits per channel",
    "F": "floating-point image converted to RGB",
    "YCbCr": "YCbCr image converted to RGB",
    "LAB": "Lab image converted to RGB",
}


def load_reference(source: str | Path | bytes | Image.Image, max_bytes: int = MAX_UPLOAD_BYTES
                   ) -> tuple[Image.Image, list[str]]:
    """An RGB reference image and notes on what was converted, or `BadImage` with a one-line reason."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise BadImage("the uploaded file is gone: upload the image again")
        size = path.stat().st_size
        if size == 0:
            raise BadImage("the file is empty (0 bytes): upload a PNG, JPEG or WebP image")
        if size > max_bytes:
            raise BadImage(f"the file is too large ({size / 2**20:.1f} MB, limit {max_bytes / 2**20:.0f} MB)")
    notes: list[str] = []
    header = _peek(source)
    image = open_image(source)
    if header:
        mode, orientation, frames, transparent = header
        if mode == "P" and transparent:
            mode = "PA"
        if mode in _MODE_NOTES:
            notes.append(_MODE_NOTES[mode])
        if orientation not in (None, 1):
            notes.append("EXIF orientation applied: the image was turned the way the camera recorded it")
        if frames > 1:
            notes.append(f"animated image: only the first of its {frames} frames was used")
    return image, notes


def _peek(source: Any) -> tuple[str, int | None, int, bool] | None:
    """(mode, EXIF orientation, frames, palette transparency) from the header, None if unreadable."""
    if isinstance(source, Image.Image):
        return source.mode, None, 1, "transparency" in source.info
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import io

            with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as im:
                try:
                    orientation = im.getexif().get(274)
                except Exception:  # a broken EXIF block is ignored, as open_image does
                    orientation = None
                return im.mode, orientation, int(getattr(im, "n_frames", 1) or 1), "transparency" in im.info
    except Exception:  # open_image gives the one-line reason
        return None


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def clean_caption(text: str | None) -> str:
    """The caption as the tokenizer will read it: HTML entities decoded, NFKC, no control characters."""
    text = text or ""
    text = "".join(ch for ch in text if not 0xD800 <= ord(ch) <= 0xDFFF)  # lone surrogates
    text = html.unescape(html.unescape(text))  # what open_clip's basic_clean does: "&#36;" is "$"
    text = unicodedata.normalize("NFKC", text)  # full-width "＄" becomes "$"
    return " ".join(_CONTROL.sub(" ", text).split())


@dataclass
class PreparedCaption:
    """A checked caption: what the user wrote (cleaned), the prompt, the part the model reads, notes."""

    caption: str
    prompt: str
    used: str
    notes: list[str] = field(default_factory=list)
    cut: bool = False


def prepare_caption(backbone: Backbone, caption: str | None, template: str = DEFAULT_TEMPLATE,
                    known_ids: set[int] | None = None) -> PreparedCaption:
    """Check and clean a relative caption; `CaptionError` for an empty one or one holding "$"."""
    text = clean_caption(caption)
    notes: list[str] = []
    if not text:
        raise CaptionError('the caption is empty: describe the change, e.g. "is blue instead"')
    if len(text) > MAX_CAPTION_CHARS:
        text = text[:MAX_CAPTION_CHARS].rsplit(" ", 1)[0]
        notes.append(f"the caption was cut to its first {MAX_CAPTION_CHARS} characters")
    try:
        prompt = fill_template(template, text)
    except ValueError as err:
        raise CaptionError(str(err)) from err
    used, cut = prompt, False
    if truncated(backbone, prompt):
        keep = backbone.context_length - 2
        ids = backbone.tokenizer.encode(normalize_prompt(prompt))[:keep]
        used, cut = backbone.tokenizer.decode(ids).strip(), True
        tail = " ".join(used.split()[-8:])
        notes.append(f"the caption is longer than the model's context ({backbone.context_length} tokens): "
                     f"it was cut at the context length, after “…{tail}”")
    if known_ids is not None:
        unknown = [w for w in dict.fromkeys(text.split()) if not set(_encode(backbone, w)) <= known_ids]
        if unknown:
            shown = ", ".join(f"“{w}”" for w in unknown[:6]) + (" …" if len(unknown) > 6 else "")
            notes.append(f"not in the vocabulary this model was trained on: {shown}")
    return PreparedCaption(text, prompt, used, notes, cut)


def _encode(backbone: Backbone, text: str) -> list[int]:
    tok = backbone.tokenizer
    return list(tok.encode(text)) if hasattr(tok, "encode") else backbone.tokenize([text])[0].tolist()


# ---------------------------------------------------------------------------- token vocabulary
def readable_token(tokenizer: Any, token_id: int) -> str:
    """A BPE piece as a readable word: "blue</w>" -> "blue", a word start "blu" -> "blu-"."""
    decoder = getattr(tokenizer, "decoder", None)
    byte_decoder = getattr(tokenizer, "byte_decoder", None)
    if isinstance(decoder, dict) and byte_decoder is not None:
        piece = decoder.get(int(token_id), "")
        end = piece.endswith("</w>")
        piece = piece[:-4] if end else piece
        raw = bytes(byte_decoder.get(c, 0x3F) for c in piece)
        try:
            word = raw.decode("utf-8")
        except UnicodeDecodeError:
            word = "⟨" + raw.hex(" ") + "⟩"  # part of a multi-byte character
        return word if end else word + "-"
    inner = getattr(tokenizer, "tokenizer", None)  # open_clip's HFTokenizer
    if inner is not None and hasattr(inner, "convert_ids_to_tokens"):
        return str(inner.convert_ids_to_tokens(int(token_id))).replace("</w>", "").replace("Ġ", "")
    return f"#{int(token_id)}"


def _world_strings() -> Iterable[str]:
    """Word lists of the shapes world's caption grammar (every caption is built from these)."""
    from isearle.shapes import world as w

    for table in (w.SHAPES, w.COLOURS, w.BACKGROUNDS, w.PATTERNS, w.PREFIXES, w.THING_WORDS):
        yield from table
    for table in (w.SIZE_WORDS, w.COMPARATIVES, w.POSITION_PHRASES, w.MOVE_PHRASES):
        for words in table.values():
            yield from words


@functools.lru_cache(maxsize=4)
def world_token_ids(tokenizer: Any, n_captions: int = 3000, seed: int = 0) -> frozenset[int]:
    """Token ids of the shapes world's captions: the rows of a shapes model's table that training moved.

    The tiny CLIP was trained on captions drawn from the world's grammar only, so a deterministic
    sample of them (every form, every edit) plus the grammar's word lists covers its vocabulary.
    """
    import random

    from isearle.shapes.world import (
        EDIT_TYPES,
        caption,
        edit_scene,
        random_scene,
        relative_caption,
        vocabulary,
    )

    rng = random.Random(seed)
    texts = list(_world_strings()) + vocabulary()
    texts += [caption(random_scene(rng), rng, (1, 1, 1, 1)) for _ in range(n_captions)]
    for i in range(n_captions // 2):  # every edit, stated both ways: the rarer clause forms
        ref = random_scene(rng, n_objects=1 + i % 2)
        _, changes = edit_scene(ref, EDIT_TYPES[i % len(EDIT_TYPES)], rng)
        texts.append(relative_caption(ref, changes, rng, imperative=bool(i // len(EDIT_TYPES) % 2)))
    ids: set[int] = set()
    for text in texts:
        ids.update(tokenizer.encode(text))
    return frozenset(ids)


def trained_token_ids(backbone: Backbone) -> frozenset[int] | None:
    """The token ids a small model was trained on (the shapes world's vocabulary), None for real CLIPs."""
    if backbone.name in SHAPES_MODELS and hasattr(backbone.tokenizer, "encode"):
        return world_token_ids(backbone.tokenizer)
    return None


class TokenTable:
    """Cosine between a pseudo-token and every row of a backbone's token-embedding table."""

    def __init__(self, backbone: Backbone) -> None:
        self.backbone = backbone
        weight = backbone.token_embedding.weight
        with torch.inference_mode():
            self.inv_norm = 1.0 / weight.float().norm(dim=1).clamp_min(1e-8)
            self.median_norm = float(weight.float().norm(dim=1).median())
        tok = backbone.tokenizer
        special = {getattr(tok, "sot_token_id", None), getattr(tok, "eot_token_id", None), backbone.placeholder_id}
        self.excluded = torch.tensor(sorted(i for i in special if i is not None), dtype=torch.long)

    @torch.inference_mode()
    def nearest(self, token: torch.Tensor, k: int = 10, allowed: Iterable[int] | None = None
                ) -> list[tuple[str, float]]:
        """The k most similar vocabulary tokens (readable, cosine), among `allowed` ids when given."""
        weight = self.backbone.token_embedding.weight
        t = token.to(weight.device).float()
        sims = (weight.float() @ t) * self.inv_norm.to(weight.device) / t.norm().clamp_min(1e-8)
        sims[self.excluded.to(weight.device)] = -2.0
        if allowed is not None:
            mask = torch.full_like(sims, -2.0)
            idx = torch.tensor(sorted(allowed), dtype=torch.long, device=sims.device)
            mask[idx] = sims[idx]
            mask[self.excluded.to(weight.device)] = -2.0
            sims = mask
        scores, ids = sims.topk(k)
        return [(readable_token(self.backbone.tokenizer, i), float(s))
                for s, i in zip(scores.tolist(), ids.tolist(), strict=True) if s > -2.0]


# ----------------------------------------------------------------------------------- charts
_PLOT_LOCK = threading.Lock()  # matplotlib's text rendering is not thread-safe


def bar_chart(labels: Sequence[str], values: Sequence[float], title: str, color: str = "#4f46e5",
              xlabel: str = "cosine similarity") -> Image.Image:
    """A horizontal bar chart as an RGB image (matplotlib's object API, no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = max(1, len(labels))
    with _PLOT_LOCK, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # missing glyphs (emoji, CJK) are drawn as boxes, not warned
        fig = Figure(figsize=(4.4, 0.9 + 0.28 * n), dpi=100)
        canvas = FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        y = np.arange(len(labels))
        ax.barh(y, list(values), color=color, height=0.7)
        ax.set_yticks(y, [str(s)[:28] for s in labels])
        ax.invert_yaxis()
        lo = min([0.0, *values])
        hi = max([0.0, *values]) or 1.0
        ax.set_xlim(lo - 0.05 * (hi - lo), hi + 0.22 * (hi - lo))
        for i, v in enumerate(values):
            ax.text(v, i, f" {v:.2f}", va="center", fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.tick_params(labelsize=8)
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
        fig.tight_layout()
        canvas.draw()
        w, h = canvas.get_width_height()
        return Image.frombuffer("RGBA", (w, h), bytes(canvas.buffer_rgba())).convert("RGB")


# --------------------------------------------------------------------------- gallery images
def item_spec(metadata: dict) -> dict | None:
    """The shapes scene spec of a gallery item ("spec", or `isearle index --shapes`'s "scene")."""
    for key in ("spec", "scene"):
        value = metadata.get(key)
        if isinstance(value, dict) and "objects" in value:
            return value
    return None


def render_spec(spec: dict, size: int, supersample: int = 4) -> Image.Image:
    """A shapes scene dict rendered at `size` px (4x supersampling, as the gallery was embedded)."""
    from isearle.shapes.world import SceneSpec, render

    return render(SceneSpec.from_dict(spec), size, supersample=supersample)


def _placeholder(size: int, text: str = "no preview") -> Image.Image:
    image = Image.new("RGB", (size, size), (230, 230, 230))
    ImageDraw.Draw(image).text((8, size // 2 - 6), text, fill=(90, 90, 90))
    return image


def gallery_image(index: Any, item_id: str, size: int | None, supersample: int = 4) -> Image.Image:
    """A gallery item as an RGB image: re-rendered from its spec at `size`, or its file (fit in `size`)."""
    meta = index.metadata.get(item_id, {})
    spec = item_spec(meta)
    if spec is not None:
        return render_spec(spec, size or REFERENCE_SIZE, supersample)
    path = index.path_of(item_id) if hasattr(index, "path_of") else meta.get("path")
    if path is None:
        return _placeholder(size or THUMB_SIZE)
    try:
        image = open_image(path)
    except BadImage:
        return _placeholder(size or THUMB_SIZE, "unreadable")
    if size is not None:
        image.thumbnail((size, size))
    return image


class ThumbnailCache:
    """PNG files of gallery items at display size, written once under a served folder."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, gallery_key: str, index: Any, item_id: str, size: int = THUMB_SIZE) -> str:
        """A result thumbnail: the item fit in `size`, over a white band that the caption label covers."""
        name = hashlib.blake2b(f"{gallery_key}\0{item_id}".encode(), digest_size=10).hexdigest()
        out = self.root / str(size) / f"{name}.png"
        if not out.is_file():
            out.parent.mkdir(parents=True, exist_ok=True)
            image = gallery_image(index, item_id, size, supersample=2)  # 2x: enough at thumbnail size
            canvas = Image.new("RGB", (size, size + size // 5), "white")
            canvas.paste(image, ((size - image.width) // 2, (size - image.height) // 2))
            tmp = out.with_suffix(f".{threading.get_ident()}.tmp")
            canvas.save(tmp, format="PNG", compress_level=1)  # written once, read locally: speed over size
            os.replace(tmp, out)  # atomic: concurrent requests never serve a half-written file
        return str(out)

    def save(self, image: Image.Image, name: str) -> str:
        out = self.root / "refs" / f"{name}.png"
        if not out.is_file():
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.with_suffix(f".{threading.get_ident()}.tmp")
            image.save(tmp, format="PNG")
            os.replace(tmp, out)
        return str(out)


# --------------------------------------------------------------------- benchmark and examples
def caption_key(caption: str) -> str:
    return " ".join(clean_caption(caption).lower().split())


@dataclass
class Example:
    """A ShapesCIR reference with its relative caption and ground truths."""

    reference_id: str
    caption: str
    gt_ids: list[str]
    edit_type: str = ""
    spec: dict | None = None


@dataclass
class Examples:
    references: list[Example]
    captions: list[str]
    source: str = ""


def load_examples(path: str | Path = EXAMPLES_PATH) -> Examples | None:
    """The examples file (see `make_examples`), or None when there is none."""
    path = Path(path)
    if not path.is_file():
        return None
    data = json.loads(path.read_text(encoding="utf-8"))
    refs = [Example(str(r["reference_img_id"]), r["relative_caption"], [str(g) for g in r.get("gt_img_ids", [])],
                    r.get("edit_type", ""), r.get("reference_spec")) for r in data.get("references", [])]
    return Examples(refs, list(data.get("captions", SHAPES_CAPTIONS)), data.get("source", ""))


def make_examples(benchmark_dir: str | Path | None = None, out: str | Path = EXAMPLES_PATH, n: int = 12,
                  split: str = "val") -> Path:
    """assets/examples.json: `n` ShapesCIR queries of `split`, round-robin over edit types (first of each)."""
    from isearle.shapes.benchmark import BENCHMARK_DIR, compact, load_benchmark
    from isearle.shapes.world import EDIT_TYPES

    queries, gallery = load_benchmark(benchmark_dir or BENCHMARK_DIR, split)
    by_type: dict[str, list[dict]] = {t: [q for q in queries if q["edit_type"] == t] for t in EDIT_TYPES}
    chosen: list[dict] = []
    for rnd in range(n):
        for t in EDIT_TYPES:
            if len(chosen) < n and rnd < len(by_type[t]):
                chosen.append(by_type[t][rnd])
    refs = [{"query_id": q["id"], "reference_img_id": q["reference_img_id"], "relative_caption": q["relative_caption"],
             "gt_img_ids": q["gt_img_ids"], "edit_type": q["edit_type"],
             "reference_spec": compact(gallery[q["reference_img_id"]])} for q in chosen]
    data = {"source": f"ShapesCIR {split} split: the first queries of each edit type, in edit-type order",
            "references": refs, "captions": list(SHAPES_CAPTIONS)}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return out


class GroundTruth:
    """(reference id, caption) -> ground-truth ids, from the benchmark annotations and the examples."""

    def __init__(self, table: dict[tuple[str, str], list[str]] | None = None) -> None:
        self.table = dict(table or {})

    @classmethod
    def load(cls, benchmark_dir: str | Path | None = None, examples: Examples | None = None) -> GroundTruth:
        table: dict[tuple[str, str], list[str]] = {}
        if benchmark_dir is None:
            from isearle.shapes.benchmark import BENCHMARK_DIR

            benchmark_dir = BENCHMARK_DIR
        for split in ("val", "test"):
            path = Path(benchmark_dir) / "annotations" / f"{split}.json"
            if path.is_file():
                for q in json.loads(path.read_text()):
                    table[(str(q["reference_img_id"]), caption_key(q["relative_caption"]))] = [
                        str(g) for g in q["gt_img_ids"]]
        for ex in examples.references if examples else ():
            table.setdefault((ex.reference_id, caption_key(ex.caption)), ex.gt_ids)
        return cls(table)

    def get(self, reference_id: str | None, caption: str) -> list[str] | None:
        if reference_id is None:
            return None
        return self.table.get((reference_id, caption_key(caption)))


# ------------------------------------------------------------------------------ galleries
@dataclass
class GalleryEntry:
    """One backbone choice: a gallery index folder, and how to build it when it is missing."""

    directory: Path
    model: str | None = None
    pretrained: str | None = None
    phi: str | None = None
    images: Path | None = None
    hf_dataset: str | None = None
    hf_split: str = "train"
    hf_limit: int | None = None
    label: str = ""

    @property
    def key(self) -> str:
        return self.label or str(self.directory)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-").lower()[:60] or "gallery"


def hub_gallery_dir(root: Path, model: str, pretrained: str | None, source: str, limit: int | None) -> Path:
    """Where a gallery built from `source` with `model` is cached (one folder per combination)."""
    name = f"hub-{_slug(model)}-{_slug(str(pretrained))}-{_slug(Path(source).name or source)}"
    return root / (name + (f"-{limit}" if limit else ""))


def build_shapes_gallery(out_dir: str | Path, backbone: Backbone, specs: dict[str, dict] | None = None,
                         benchmark_dir: str | Path | None = None, batch_size: int = 256,
                         progress: bool = True, benchmark: str = BENCHMARK) -> Path:
    """The offline world's gallery: every ShapesCIR gallery scene (or `specs`), embedded and indexed.

    Items keep their scene spec as metadata ({"spec": ...}), so the demo re-renders them at any size
    and the gallery ids are the benchmark's (ground truths can be marked).
    """
    from isearle.index import build_gallery_index

    if specs is None:
        from isearle.shapes.benchmark import BENCHMARK_DIR

        path = Path(benchmark_dir or BENCHMARK_DIR) / "gallery.json"
        if not path.is_file():
            raise FileNotFoundError(f"no ShapesCIR gallery at {path}: run `isearle build-shapes` first")
        specs = json.loads(path.read_text())
    size = backbone.image_size
    items = [(i, functools.partial(render_spec, s, size), {"spec": s}) for i, s in specs.items()]
    index = build_gallery_index(backbone, items, batch_size=batch_size, num_workers=0, progress=progress)
    index.info["benchmark"] = benchmark
    index.info["render_size"] = size
    index.info["weights"] = weights_fingerprint(backbone)
    return index.save(out_dir)


def build_test_world(out_dir: str | Path, n: int = 300, seed: int = 7) -> dict[str, Path]:
    """A random-init stand-in for the offline world (tests, development before the weights exist).

    The tiny test CLIP is saved as a checkpoint so that every process loads the same weights; the
    gallery holds `n` random scenes with benchmark-style ids, and phi is random too.
    """
    from isearle.phi import Phi, save_phi
    from isearle.shapes.benchmark import compact
    from isearle.shapes.world import scene_specs

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = out / "tiny-test.pt"
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        backbone = load_backbone("isearle-tiny-test", None, "cpu")
        phi = Phi.for_backbone(backbone.embed_dim, backbone.token_width).eval()
    torch.save(backbone.model.state_dict(), checkpoint)
    backbone = load_backbone("isearle-tiny-test", str(checkpoint), "cpu")
    specs = {f"{i:06d}": compact(s) for i, s in enumerate(scene_specs(n, seed))}
    gallery = build_shapes_gallery(out / "gallery", backbone, specs=specs, progress=False)
    return {"gallery": gallery, "phi": save_phi(phi, out / "phi.safetensors"), "checkpoint": checkpoint}


def _build_hub_gallery(entry: GalleryEntry, backbone: Backbone, progress: bool = True) -> None:
    """Embed the entry's image folder or Hugging Face dataset into `entry.directory` (what `isearle index` does)."""
    from isearle.index import build_gallery_index, folder_items, hf_items

    if entry.images is not None:
        items: list = folder_items(entry.images)
        thumbs = None
    else:
        items = hf_items(str(entry.hf_dataset), entry.hf_split, limit=entry.hf_limit)
        thumbs = entry.directory
    items = items[: entry.hf_limit] if entry.hf_limit else items
    if not items:
        raise FileNotFoundError(f"no images to index in {entry.images or entry.hf_dataset}")
    print(f"building the gallery {entry.directory} from {len(items)} images "
          f"({entry.images or entry.hf_dataset}) with {backbone.name}/{backbone.pretrained}", flush=True)
    index = build_gallery_index(backbone, items, batch_size=64, num_workers=min(2, os.cpu_count() or 1),
                                progress=progress, thumbnails=thumbs)
    index.save(entry.directory)


def _index_present(directory: Path) -> bool:
    return (directory / "index.json").is_file()


def open_service(entry: GalleryEntry, device: str | None = None, cache_size: int = 256,
                 progress: bool = True) -> Service:
    """The query service of a gallery entry, building its index first when it has a source and none is cached."""
    from isearle.index import GalleryIndex
    from isearle.phi import load_phi

    if not _index_present(entry.directory) and (entry.images is not None or entry.hf_dataset):
        backbone = load_backbone(entry.model or "ViT-B-32", entry.pretrained, device)
        _build_hub_gallery(entry, backbone, progress)
        index = GalleryIndex.load(entry.directory)
        phi_name = entry.phi or DEFAULT_PHI.get((backbone.name, backbone.pretrained))
        phi = None
        if phi_name:
            try:
                phi = load_phi(phi_name, backbone.device)
            except WeightsUnavailable:
                if entry.phi:
                    raise
                phi_name = None
        return Service(backbone, index, Retriever(backbone, index, phi, cache_size=cache_size), phi, phi_name)
    if not _index_present(entry.directory):
        raise FileNotFoundError(f"no gallery index in {entry.directory}: build one with `isearle index` "
                                f"(or `python -m isearle.demo build-gallery` for the offline world)")
    service = load_service(entry.directory, phi=entry.phi, device=device)
    if cache_size != 256:
        service.retriever = Retriever(service.backbone, service.index, service.phi, cache_size=cache_size)
    return service


# ------------------------------------------------------------------------------- the engine
@dataclass
class ResultItem:
    """A gallery hit ready for display."""

    rank: int
    id: str
    score: float
    image: str
    caption: str
    ground_truth: bool = False


@dataclass
class SearchResult:
    items: list[ResultItem]
    notes: list[str]
    prompt: str
    method: str
    elapsed_ms: float
    cached: str  # "query" (feature reused), "reference" (S* reused) or ""
    reference_id: str | None = None
    gt_ids: list[str] | None = None

    @property
    def gt_found(self) -> int:
        return sum(1 for it in self.items if it.ground_truth)

    def summary(self) -> str:
        """A one-paragraph Markdown status line."""
        method = METHOD_LABELS.get(self.method, self.method)
        shown = self.prompt.replace("$", "S*")
        shown = shown if len(shown) <= 160 else shown[:80] + " … " + shown[-60:]
        text = (f"**{len(self.items)} results** for “{shown}” · {method} · {self.elapsed_ms:.0f} ms"
                f"{f' ({self.cached} cached)' if self.cached else ''}")
        if self.gt_ids is not None:
            text += (f"  \nShapesCIR ground truth: **{self.gt_found} of {len(self.gt_ids)}** in the top "
                     f"{len(self.items)} (marked ✓)")
        if self.reference_id is not None:
            text += f"  \nReference: gallery item `{self.reference_id}` (left out of the results)"
        for note in self.notes:
            text += f"  \n⚠ {note}"
        return text

    def as_json(self) -> list[dict]:
        return [{"rank": it.rank, "id": it.id, "score": round(it.score, 6), "ground_truth": it.ground_truth}
                for it in self.items]


@dataclass
class Explanation:
    """The pseudo-word panel: nearest tokens and concepts of S*, and the two one-modality baselines."""

    tokens_chart: Image.Image
    concepts_chart: Image.Image | None
    tokens: list[tuple[str, float]]
    concepts: list[tuple[str, float]]
    image_only: list[ResultItem]
    text_only: list[ResultItem]
    summary: str


def weights_file(pretrained: str | None) -> Path | None:
    """The local file behind a pretrained tag (a path, or a bundled tag), None for hub tags."""
    from isearle.backbone import BUNDLED_WEIGHTS

    if pretrained is None:
        return None
    path = Path(pretrained) if Path(pretrained).is_file() else ASSETS_DIR / BUNDLED_WEIGHTS.get(pretrained, "-")
    return path if path.is_file() else None


@functools.lru_cache(maxsize=16)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.blake2b(digest_size=6)
    if size <= 256 * 2**20:  # content: a checkout or a copy keeps it, a retrained model changes it
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    else:  # large checkpoints: where and when
        h.update(f"{path}:{size}:{mtime_ns}".encode())
    return h.hexdigest()


def weights_fingerprint(backbone: Backbone) -> str | None:
    """A short id of the weights behind a backbone: a local file's content hash, else its tag."""
    if backbone.pretrained is None:
        return None
    path = weights_file(backbone.pretrained)
    if path is None:
        return _slug(str(backbone.pretrained))
    st = path.stat()
    return _file_digest(str(path.resolve()), st.st_size, st.st_mtime_ns)


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
        """The concept bank (shapes vocabulary, or ImageNet names for real CLIPs), built once and disk-cached.

        The cache folder carries a fingerprint of the weights file, so a retrained model (same tag)
        never meets the bank of its predecessor; random-init weights are never cached.
        """
        with self._bank_lock:
            if self._bank is None:
                from isearle import concepts

                source = "shapes" if self.shapes else "imagenet"
                fingerprint = weights_fingerprint(self.backbone)
                if fingerprint is None:
                    self._bank = concepts.ConceptBank.build(self.backbone, concepts.load_vocabulary(source),
                                                            progress=False)
                else:
                    self._bank = concepts.concept_bank(self.backbone, source, progress=False,
                                                       cache_dir=concepts.CACHE_DIR / "concepts" / fingerprint)
            return self._bank

    def label(self) -> str:
        b, n = self.backbone, len(self.service.index)
        world = "offline shapes world" if self.benchmark else self.entry.directory.name
        return f"{b.name} / {b.pretrained} · {world} ({n:,} images)"


class DemoEngine:
    """The demo's state: gallery entries (loaded lazily, once), caches, example references."""

    def __init__(self, entries: Sequence[GalleryEntry], device: str | None = None, cache_size: int = 256,
                 thumbs_dir: str | Path | None = None, examples: Examples | None = None,
                 benchmark_dir: str | Path | None = None) -> None:
        if not entries:
            raise ValueError("no gallery configured")
        self.entries = {e.key: e for e in entries}
        self.default_key = entries[0].key
        self.device, self.cache_size = device, cache_size
        self.thumbs = ThumbnailCache(thumbs_dir or Path(tempfile.gettempdir()) / "isearle-demo")
        self.examples = examples
        self.truth = GroundTruth.load(benchmark_dir, examples)
        self._loaded: dict[str, Loaded] = {}
        self._load_lock = threading.Lock()
        self.threads = torch.get_num_threads()  # after `set_threads()`: the CPU quota
        #: display-image content hash -> (gallery key, item id): references picked from a gallery
        self.known = LRUCache(4096)
        #: (gallery, image hash, method, steps, caption) -> query feature: a repeated query skips the encoders
        self.query_features = LRUCache(4 * cache_size)

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
        entries, problems = [], []
        for entry in entries_from_args(args):
            if not entry.directory.is_absolute() and not entry.directory.exists():
                entry.directory = REPO_DIR / entry.directory
            has_source = entry.images is not None or bool(entry.hf_dataset)
            if not has_source and entry.directory.resolve() == (REPO_DIR / "gallery_index").resolve():
                ensure_offline_gallery(entry.directory)  # the offline world: built when missing or stale
            if has_source or _index_present(entry.directory):
                entries.append(entry)
            else:
                problems.append(f"no gallery index in {entry.directory}")
        engine = None
        while entries:
            engine = cls(entries, args.device, args.cache_size, examples=load_examples(args.examples))
            try:
                engine.warm_up() if warm else engine.load()
                break
            except (WeightsUnavailable, FileNotFoundError, ValueError, OSError) as err:
                problems.append(f"{entries[0].key}: {err}")
                print(f"warning: skipping {entries[0].key}: {err}", file=sys.stderr, flush=True)
                entries = entries[1:]
        if not entries or engine is None:
            raise FileNotFoundError("nothing to serve: " + "; ".join(problems) +
                                    " (build the offline gallery with `python -m isearle.demo build-gallery`)")
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
            path = self.thumbs.save(image, f"example-{_slug(ex.reference_id)}")
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

    def _resolve(self, loaded: Loaded, key: str, image: Image.Image) -> tuple[Image.Image, str | None]:
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
        query_image, ref_id = self._resolve(loaded, key, image)
        retriever = loaded.service.retriever
        oti = loaded.service.oti_config(steps)
        steps_key = oti.steps if method == "oti" else 0
        ikey = image_key(query_image)
        qkey = (key, ikey, method, steps_key, cap.caption)
        feature = self.query_features.get(qkey)
        cached = "query" if feature is not None else (
            "reference" if retriever.tokens.get((ikey, method, steps_key)) is not None else "")
        k = max(1, min(int(k), len(loaded.service.index) - (1 if ref_id else 0)))
        try:
            if feature is None:
                feature = retriever.query_feature(query_image, cap.caption, method, oti, progress)
                self.query_features.put(qkey, feature)
            hits = retriever.search(feature, k, exclude=[ref_id] if ref_id else ())
        finally:
            restore_torch_threads(self.threads)
        gts = self.truth.get(ref_id, cap.caption) if loaded.benchmark else None
        items = self._items(key, loaded, hits, set(gts or ()))
        return SearchResult(items, notes, cap.used if cap.cut else cap.prompt, method,
                            1000 * (time.perf_counter() - start), cached, ref_id, gts)

    def _query(self, retriever: Retriever, *args: Any, **kwargs: Any) -> list[Hit]:
        """`Retriever.query`, then torch's thread count put back.

        A FAISS search sets OpenMP's thread count to 1 for this thread (faiss.omp_set_num_threads),
        which torch reads too: without this, every later query in the same worker thread would run
        torch single-threaded (and, with OpenMP's default spin-waiting, 10-25x slower: measured on
        scaled_dot_product_attention; app.py sets OMP_WAIT_POLICY=PASSIVE against that).
        """
        try:
            return retriever.query(*args, **kwargs)
        finally:
            restore_torch_threads(self.threads)

    def _items(self, key: str, loaded: Loaded, hits: Sequence[Hit], gts: set[str]) -> list[ResultItem]:
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
        query_image, ref_id = self._resolve(loaded, key, image)
        if method == "phi" and loaded.service.phi is None:
            method = "oti"
        return self._explain(loaded, query_image, cap.caption, method, loaded.service.oti_config(steps),
                             k, trained_only, key, ref_id)

    def _explain(self, loaded: Loaded, image: Image.Image, caption: str, method: str, oti: OTIConfig,
                 k: int, trained_only: bool, key: str | None = None, ref_id: str | None = None) -> Explanation:
        retriever, backbone = loaded.service.retriever, loaded.backbone
        token = retriever.pseudo_token(image, method, oti)
        allowed = loaded.trained if (trained_only and loaded.trained is not None) else None
        tokens = loaded.table.nearest(token, 10, allowed)
        bank = loaded.concepts()
        with torch.inference_mode():
            feat = F.normalize(encode_with_pseudo_tokens(backbone, [CONCEPT_TEMPLATE], token), dim=-1)[0]
            sims = bank.features.to(feat.device) @ feat.float()
            top = sims.topk(min(10, len(bank.names)))
        concepts = [(bank.names[i], float(s)) for s, i in zip(top.values.tolist(), top.indices.tolist(), strict=True)]
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
            image_only = self._items(key, loaded, self._query(retriever, image, caption, k, "image", exclude=exclude), gts)
            text_only = self._items(key, loaded, self._query(retriever, None, caption, k, "text", exclude=exclude), gts)
        norm = float(token.float().norm())
        summary = (f"S* reads as **{', '.join(w for w, _ in tokens[:3])}** · concepts: "
                   f"**{', '.join(c for c, _ in concepts[:3])}** · ‖S*‖ = {norm:.2f} "
                   f"(median token norm {loaded.table.median_norm:.2f})")
        return Explanation(tokens_chart, concepts_chart, tokens, concepts, image_only, text_only, summary)

    def info(self, key: str | None = None) -> dict[str, Any]:
        """What a backbone choice offers (the app's /info endpoint for API users)."""
        key = key or self.default_key
        loaded = self.load(key)
        return {"backbone": key, "label": self.label(key), "backbones": list(self.entries),
                "methods": (["phi"] if loaded.service.phi is not None else []) + ["oti"],
                "phi": loaded.service.phi_name, "gallery_size": len(loaded.service.index),
                "context_length": loaded.backbone.context_length, "benchmark": loaded.benchmark,
                "trained_vocabulary": loaded.trained is not None}

    def captions(self, key: str | None = None) -> list[str]:
        """Example captions suited to the entry's world."""
        if self.examples and self.examples.captions and (key is None or self.load(key).shapes):
            return self.examples.captions
        loaded = self.load(key)
        return list(SHAPES_CAPTIONS if loaded.shapes else PHOTO_CAPTIONS)

    def served_paths(self) -> list[str]:
        """Folders the app may serve files from: thumbnails, galleries, image folders."""
        paths = {str(self.thumbs.root)}
        for e in self.entries.values():
            paths.add(str(e.directory))
            if e.images is not None:
                paths.add(str(e.images))
        return sorted(paths)


def restore_torch_threads(n: int) -> None:
    """Set torch's intra-op threads to `n` in this thread (see `DemoEngine._query`)."""
    torch.set_num_threads(n)


def _warm_image(size: int) -> Image.Image:
    image = Image.new("RGB", (size, size), (128, 128, 128))
    ImageDraw.Draw(image).ellipse([size // 4, size // 4, 3 * size // 4, 3 * size // 4], fill=(40, 80, 225))
    return image


# ---------------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class Setting:
    """One demo setting: flag, environment variable, default, help."""

    flag: str
    env: str
    default: Any
    help: str
    type: Callable[[str], Any] = str


SETTINGS: tuple[Setting, ...] = (
    Setting("--gallery", "ISEARLE_GALLERY", "gallery_index",
            "gallery index folder(s), comma-separated; each is a backbone choice (default: the offline world)"),
    Setting("--images", "ISEARLE_IMAGES", None, "image folder to index with --model at start-up (once: cached under --hub-cache)"),
    Setting("--hf-dataset", "ISEARLE_HF_DATASET", None, "Hugging Face dataset to index with --model at start-up (cached likewise)"),
    Setting("--hf-split", "ISEARLE_HF_SPLIT", "train", "dataset split for --hf-dataset"),
    Setting("--hf-limit", "ISEARLE_HF_LIMIT", None, "index only the first N images of the folder or dataset", int),
    Setting("--hub-cache", "ISEARLE_HUB_CACHE", "gallery_index",
            "where galleries built from --images / --hf-dataset are kept (on a Space: /data/... for persistence)"),
    Setting("--model", "ISEARLE_MODEL", "ViT-B-32", "open_clip backbone for --images / --hf-dataset"),
    Setting("--pretrained", "ISEARLE_PRETRAINED", "openai", "its pretrained tag or a local checkpoint"),
    Setting("--phi", "ISEARLE_PHI", None,
            "phi of the default backbone: searle, searle-xl or a checkpoint (default: the backbone's own)"),
    Setting("--device", "ISEARLE_DEVICE", None, "cuda or cpu (default: cuda when available)"),
    Setting("--host", "ISEARLE_HOST", None, "interface to listen on (default 127.0.0.1; Spaces set 0.0.0.0)"),
    Setting("--port", "ISEARLE_PORT", None, "port (default 7860, or the first free one after it)", int),
    Setting("--queue-size", "ISEARLE_QUEUE_SIZE", 64, "requests waiting at most; more are refused", int),
    Setting("--concurrency", "ISEARLE_CONCURRENCY", 2, "queries run at the same time", int),
    Setting("--cache-size", "ISEARLE_CACHE_SIZE", 256, "reference images kept in the feature/pseudo-word cache", int),
    Setting("--oti-steps", "ISEARLE_OTI_STEPS", DEFAULT_OTI_STEPS, "default OTI steps (slider start)", int),
    Setting("--examples", "ISEARLE_EXAMPLES", str(EXAMPLES_PATH), "example references and captions (JSON)"),
    Setting("--max-file-size", "ISEARLE_MAX_FILE_SIZE", "25mb", "largest upload"),
    Setting("--no-warmup", "ISEARLE_NO_WARMUP", False, "skip the warm-up query at start-up", lambda v: v.lower() in ("1", "true", "yes")),
)


def add_arguments(parser: argparse.ArgumentParser, environ: dict[str, str] | None = None) -> None:
    """The demo's flags; each defaults to its environment variable, then to its built-in default."""
    env = os.environ if environ is None else environ
    for s in SETTINGS:
        default = s.type(env[s.env]) if env.get(s.env) not in (None, "") else s.default
        if isinstance(s.default, bool):
            parser.add_argument(s.flag, action="store_true", default=default, help=f"{s.help} [{s.env}]")
        else:
            parser.add_argument(s.flag, type=s.type, default=default, help=f"{s.help} [{s.env}]")


def settings_table() -> str:
    """The settings as a Markdown table (README)."""
    rows = ["| flag | environment variable | default | meaning |", "|---|---|---|---|"]
    for s in SETTINGS:
        default = "off" if s.default is False else ("—" if s.default is None else f"`{s.default}`")
        if s.flag == "--examples":
            default = "`assets/examples.json`"
        rows.append(f"| `{s.flag}` | `{s.env}` | {default} | {s.help} |")
    return "\n".join(rows)


def entries_from_args(args: argparse.Namespace) -> list[GalleryEntry]:
    """Gallery entries: a source to index (first, the default) then the listed index folders."""
    entries: list[GalleryEntry] = []
    galleries = [Path(g.strip()) for g in str(args.gallery or "").split(",") if g.strip()]
    if args.images or args.hf_dataset:
        root = Path(getattr(args, "hub_cache", None) or "gallery_index")
        source = str(args.images or args.hf_dataset)
        entries.append(GalleryEntry(hub_gallery_dir(root, args.model, args.pretrained, source, args.hf_limit),
                                    model=args.model, pretrained=args.pretrained, phi=args.phi,
                                    images=Path(args.images) if args.images else None, hf_dataset=args.hf_dataset,
                                    hf_split=args.hf_split, hf_limit=args.hf_limit))
    for g in galleries:
        entries.append(GalleryEntry(g, phi=args.phi if not entries else None))
    return entries


def offline_gallery_stale(directory: Path) -> bool:
    """Whether an offline-world gallery was embedded with other weights than the bundled isearle-shapes."""
    try:
        info = json.loads((directory / "index.json").read_text()).get("info", {})
    except (OSError, ValueError):
        return False
    bundled = weights_file("isearle-shapes")
    if info.get("pretrained") != "isearle-shapes" or not info.get("weights") or bundled is None:
        return False
    st = bundled.stat()
    return info["weights"] != _file_digest(str(bundled.resolve()), st.st_size, st.st_mtime_ns)


def ensure_offline_gallery(directory: Path, progress: bool = True) -> bool:
    """Build the offline world's gallery when it is missing or was embedded with other shapes weights.

    Returns whether `directory` holds an index afterwards. Needs the benchmark and the weights.
    """
    from isearle.shapes.benchmark import BENCHMARK_DIR

    present = _index_present(directory)
    if present:
        if not offline_gallery_stale(directory):
            return True
        print(f"{directory} was embedded with other isearle-shapes weights: rebuilding it", flush=True)
    if not (BENCHMARK_DIR / "gallery.json").is_file():
        return present
    try:
        backbone = load_backbone("isearle-shapes", "isearle-shapes", "cpu")
    except WeightsUnavailable:
        return present
    print(f"building the offline world's gallery in {directory} (once)", flush=True)
    build_shapes_gallery(directory, backbone, benchmark_dir=BENCHMARK_DIR, progress=progress)
    return True


# ----------------------------------------------------------------------------------- latency
def latency_stats(ms: Sequence[float]) -> dict[str, float]:
    """n, p50, p95, mean and max of latencies in milliseconds."""
    a = np.asarray(list(ms), dtype=np.float64)
    if a.size == 0:
        return {"n": 0, "p50": float("nan"), "p95": float("nan"), "mean": float("nan"), "max": float("nan")}
    return {"n": int(a.size), "p50": float(np.percentile(a, 50)), "p95": float(np.percentile(a, 95)),
            "mean": float(a.mean()), "max": float(a.max())}


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    """(result, milliseconds) of one call."""
    start = time.perf_counter()
    out = fn()
    return out, 1000 * (time.perf_counter() - start)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class AppProcess:
    """`python app.py ARGS` on a free localhost port, until it answers HTTP (tests, benchmarks)."""

    def __init__(self, args: Sequence[str] = (), env: dict[str, str] | None = None, timeout: float = 180,
                 app: str | Path = REPO_DIR / "app.py", log: str | Path | None = None) -> None:
        self.port = free_port()
        self.args, self.timeout, self.app = list(args), timeout, Path(app)
        self.env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False",
                    "PYTHONUNBUFFERED": "1", **(env or {})}
        self.log_path = Path(log) if log else Path(tempfile.mkstemp(prefix="isearle-app-", suffix=".log")[1])
        self.proc: subprocess.Popen | None = None
        self.startup_s = float("nan")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def log(self, tail: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-tail:]
        except OSError:
            return ""

    def start(self) -> AppProcess:
        start = time.perf_counter()
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen([sys.executable, str(self.app), "--host", "127.0.0.1",
                                          "--port", str(self.port), *self.args],
                                         cwd=str(self.app.parent), env=self.env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"app.py exited with {self.proc.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(self.url + "config", timeout=2) as r:
                    if r.status == 200:
                        self.startup_s = time.perf_counter() - start
                        return self
            except OSError:
                pass
            time.sleep(0.3)
        self.stop()
        raise TimeoutError(f"app.py did not answer within {self.timeout} s:\n{self.log()}")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def __enter__(self) -> AppProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --------------------------------------------------------------------------------------- CLI
def main(argv: Sequence[str] | None = None) -> int:
    """`python -m isearle.demo build-gallery | make-examples | settings`."""
    p = argparse.ArgumentParser(prog="python -m isearle.demo", description="helpers of the Gradio demo")
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build-gallery", help="embed the ShapesCIR gallery into gallery_index/ (offline world)")
    b.add_argument("--out", type=Path, default=REPO_DIR / "gallery_index")
    b.add_argument("--model", default="isearle-shapes")
    b.add_argument("--pretrained", default="isearle-shapes")
    b.add_argument("--benchmark", type=Path, default=None, help="ShapesCIR folder (default assets/shapescir)")
    e = sub.add_parser("make-examples", help="write assets/examples.json from the ShapesCIR val split")
    e.add_argument("--benchmark", type=Path, default=None)
    e.add_argument("--out", type=Path, default=EXAMPLES_PATH)
    e.add_argument("--n", type=int, default=12)
    sub.add_parser("settings", help="print the settings table (Markdown)")
    args = p.parse_args(argv)
    if args.cmd == "build-gallery":
        from isearle.shapes.benchmark import BENCHMARK_DIR

        backbone = load_backbone(args.model, None if args.pretrained == "none" else args.pretrained, "cpu")
        out = build_shapes_gallery(args.out, backbone, benchmark_dir=args.benchmark or BENCHMARK_DIR)
        print(f"offline gallery written to {out}")
    elif args.cmd == "make-examples":
        print(f"wrote {make_examples(args.benchmark, args.out, args.n)}")
    else:
        print(settings_table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
