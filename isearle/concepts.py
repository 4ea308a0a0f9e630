"""Concept association: a vocabulary embedded by prompt ensembling, and each image's top-k concepts.

SEARLE takes the Open Images V7 class names, embeds each with 24 prompt templates (each feature
L2-normalised, averaged, renormalised) and keeps, per image, the concepts of highest cosine
similarity; OTI's GPT loss draws phrases about the top 15, phi training about the top 150.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import urllib.request
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from isearle import paths
from isearle.artifacts import ArtifactError, display, load_tensors, save_tensors, write_bytes
from isearle.backbone import Backbone, WeightsUnavailable
from isearle.runtime import hub_offline
from isearle.templates import PALAVRA_TEMPLATES

log = logging.getLogger(__name__)

#: PALAVRA's 24 templates (`templates.PALAVRA_TEMPLATES`): concept ensembling formats each with the
#: concept padded by spaces.
TEMPLATES = PALAVRA_TEMPLATES


def ensemble_prompt(template: str, concept: str) -> str:
    """SEARLE's concept prompt: the concept padded by spaces (`template.format(f" {c} ")`)."""
    return template.format(f" {concept} ")


OPENIMAGES_URL = "https://storage.googleapis.com/openimages/v7/oidv7-class-descriptions.csv"


def load_vocabulary(source: str) -> list[str]:
    """Concept names from "openimages" (fetched once, cached), "imagenet", "shapes" or a text file."""
    if source == "imagenet":
        from open_clip import IMAGENET_CLASSNAMES

        # open_clip names two pairs of classes alike (657/744 "missile", 836/837 "sunglasses");
        # WordNet's names for 744 and 836 keep all 1000 classes, distinct and in class order.
        names = list(IMAGENET_CLASSNAMES)
        if names[744] == names[657] == "missile" and names[836] == names[837] == "sunglasses":
            names[744], names[836] = "projectile", "sunglass"
        return names
    if source == "shapes":
        from isearle.shapes.captions import vocabulary

        return vocabulary()
    if source == "openimages":
        return _openimages()
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"vocabulary {source!r}: use openimages, imagenet, shapes or a text file")
    lines = (line.strip() for line in path.read_text(encoding="utf-8").splitlines())
    return list(dict.fromkeys(line for line in lines if line))


def _openimages() -> list[str]:
    """The 20,931 Open Images V7 class display names (CC BY 4.0)."""
    path = paths.CACHE_DIR / "oidv7-class-descriptions.csv"
    if not path.is_file():
        if hub_offline():
            raise WeightsUnavailable(f"Open Images class names are not cached at {path} and the network is "
                                     f"off: download {OPENIMAGES_URL} there, or use --vocabulary imagenet")
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with urllib.request.urlopen(OPENIMAGES_URL, timeout=30) as response:
                write_bytes(path, response.read())
        except OSError as err:
            raise WeightsUnavailable(f"could not download the Open Images class names: {err}") from err
    rows = csv.DictReader(io.StringIO(path.read_text(encoding="utf-8")))
    return list(dict.fromkeys(row["DisplayName"].strip() for row in rows if row.get("DisplayName")))


class ConceptBank:
    """Concept names with their prompt-ensembled, L2-normalised text features [C, D]."""

    def __init__(self, names: Sequence[str], features: torch.Tensor) -> None:
        if len(names) != features.shape[0]:
            raise ValueError("one feature row per concept name")
        self.names, self.features = list(names), features

    @classmethod
    @torch.inference_mode()
    def build(cls, backbone: Backbone, names: Sequence[str], templates: Sequence[str] = TEMPLATES,
              batch_size: int = 256, progress: bool = True) -> ConceptBank:
        feats = []
        for start in tqdm(range(0, len(names), batch_size), desc="concepts", disable=not progress):
            chunk = names[start : start + batch_size]
            prompts = [ensemble_prompt(t, name) for name in chunk for t in templates]
            f = F.normalize(backbone.encode_texts(prompts), dim=-1).view(len(chunk), len(templates), -1)
            feats.append(F.normalize(f.mean(dim=1), dim=-1).cpu())
        return cls(names, torch.cat(feats))

    def topk(self, image_features: torch.Tensor, k: int = 250) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores, indices), each [N, k], of the concepts most similar to each image."""
        sims = F.normalize(image_features.float().cpu(), dim=-1) @ self.features.T
        return sims.topk(min(k, len(self.names)), dim=-1)

    def top_names(self, image_features: torch.Tensor, k: int = 15) -> list[list[str]]:
        _, idx = self.topk(image_features, k)
        return [[self.names[i] for i in row] for row in idx.tolist()]

    def save(self, path: str | Path, backbone: Backbone | None = None) -> None:
        """The bank as a verified safetensors file (atomic), recording the backbone it was built with."""
        meta = {"names": json.dumps(self.names)}
        if backbone is not None:
            meta["backbone"] = json.dumps([backbone.name, str(backbone.pretrained)])
        save_tensors(path, {"features": self.features}, "concept-bank", meta)

    @classmethod
    def load(cls, path: str | Path, backbone: Backbone | None = None) -> ConceptBank:
        """A saved bank (ArtifactError when damaged, or built with another backbone than `backbone`)."""
        remedy = "delete it: the bank is rebuilt when next needed"
        tensors, meta = load_tensors(path, "concept-bank", remedy)
        try:
            names, features = json.loads(meta["names"]), tensors["features"]
            bank = cls(names, features)
        except (KeyError, ValueError):
            raise ArtifactError(path, "is not a concept bank", remedy) from None
        if backbone is not None:
            made = json.loads(meta.get("backbone", "null"))
            if features.shape[1] != backbone.embed_dim or made not in (None, [backbone.name, str(backbone.pretrained)]):
                raise ArtifactError(path, f"was built for another backbone ({made or features.shape[1]})", remedy)
        return bank


def concept_settings(backbone: Backbone, source: str, templates: Sequence[str] = TEMPLATES) -> dict:
    """Everything besides the weights that changes a concept bank: the vocabulary (a file by its
    content), the ensembling templates and the precision its texts are encoded in."""
    from isearle.precision import effective_precision
    from isearle.weights import file_digest

    vocabulary = f"file:{file_digest(source)}" if Path(source).is_file() else source
    return {"what": "concepts", "version": 2, "vocabulary": vocabulary, "templates": list(templates),
            "precision": effective_precision(backbone.precision, backbone.device)}


def concept_bank(backbone: Backbone, source: str, cache_dir: str | Path | None = None,
                 progress: bool = True, cache: bool = True, templates: Sequence[str] = TEMPLATES) -> ConceptBank:
    """The bank of `source` for `backbone`, built once and cached on disk (unless not `cache`, or
    random-init weights); a damaged cache is rebuilt. The cache key (`isearle.keys.cache_key`) holds
    the weights' id and `concept_settings` (vocabulary, templates, precision), so a retrained model
    or an fp16 build never meets the bank of another."""
    from isearle.keys import cache_key

    key = cache_key(backbone.name, backbone.pretrained, **concept_settings(backbone, source, templates)) \
        if cache else None
    if key is None:
        return ConceptBank.build(backbone, load_vocabulary(source), templates, progress=progress)
    path = Path(cache_dir or paths.CACHE_DIR / "concepts") / f"{key}.safetensors"
    if path.exists():
        try:
            return ConceptBank.load(path, backbone)
        except ArtifactError as err:
            log.warning("%s %s: rebuilding it", display(path), err.problem)
    bank = ConceptBank.build(backbone, load_vocabulary(source), templates, progress=progress)
    bank.save(path, backbone)
    return bank
