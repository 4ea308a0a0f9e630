"""Concept association: a vocabulary embedded by prompt ensembling, and each image's top-k concepts.

SEARLE takes the Open Images V7 class names, embeds each with 24 prompt templates (each feature
L2-normalised, averaged, renormalised) and keeps, per image, the concepts of highest cosine
similarity; OTI's GPT loss draws phrases about the top 15, phi training about the top 150.
"""

from __future__ import annotations

import csv
import io
import json
import re
import urllib.request
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from isearle import paths
from isearle.backbone import Backbone, WeightsUnavailable
from isearle.runtime import hub_offline

#: PALAVRA's 24 prompt templates, as SEARLE lists them (src/utils.py `get_templates`, spelling kept):
#: concept ensembling formats each with the concept padded by spaces, OTI's content loss with " $ ".
TEMPLATES: tuple[str, ...] = (
    "This is a photo of a {}", "This photo contains a {}", "A photo of a {}", "This is an illustration of a {}",
    "This illustration contains a {}", "An illustrations of a {}", "This is a sketch of a {}",
    "This sketch contains a {}", "A sketch of a {}", "This is a diagram of a {}", "This diagram contains a {}",
    "A diagram of a {}", "A {}", "We see a {}", "{}", "We see a {} in this photo", "We see a {} in this image",
    "We see a {} in this illustration", "We see a {} photo", "We see a {} image", "We see a {} illustration",
    "{} photo", "{} image", "{} illustration",
)


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
                path.write_bytes(response.read())
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

    def save(self, path: str | Path) -> None:
        save_file({"features": self.features.contiguous()}, str(path), metadata={"names": json.dumps(self.names)})

    @classmethod
    def load(cls, path: str | Path) -> ConceptBank:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            names = json.loads(f.metadata()["names"])
        return cls(names, load_file(str(path))["features"])


def concept_bank(backbone: Backbone, source: str, cache_dir: str | Path | None = None,
                 progress: bool = True, cache: bool = True) -> ConceptBank:
    """The bank of `source` for `backbone`, built once and cached on disk (unless not `cache`, e.g.
    random-init weights). The cache key holds the weights' id (`weights.weights_fingerprint`: a local file's
    digest), so a retrained model never meets the bank of its predecessor."""
    if not cache:
        return ConceptBank.build(backbone, load_vocabulary(source), progress=progress)
    from isearle.weights import weights_fingerprint

    key = f"{backbone.name}_{weights_fingerprint(backbone.pretrained)}_{Path(source).stem}"
    key = re.sub(r"[^A-Za-z0-9._-]+", "-", key)
    path = Path(cache_dir or paths.CACHE_DIR / "concepts") / f"{key}.safetensors"
    if path.is_file():
        return ConceptBank.load(path)
    bank = ConceptBank.build(backbone, load_vocabulary(source), progress=progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    bank.save(path)
    return bank
