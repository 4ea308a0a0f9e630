"""Example references and captions (assets/examples.json) and the ShapesCIR ground truths the
demo marks with a check."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from isearle.artifacts import write_text
from isearle.demo.inputs import clean_caption
from isearle.paths import ASSETS_DIR

EXAMPLES_PATH = ASSETS_DIR / "examples.json"

#: Relative captions offered as clickable examples (shapes world / real photos).
SHAPES_CAPTIONS = (
    "is blue instead", "is a star instead", "has a black background instead", "is larger",
    "is moved to the left", "also has a small red circle", "make it green and put it at the top",
)
PHOTO_CAPTIONS = (
    "is a dog instead", "shows the same scene at night", "is in black and white", "has two of them",
    "is red", "is on a beach",
)


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
    write_text(out, json.dumps(data, indent=1, ensure_ascii=False) + "\n")
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
