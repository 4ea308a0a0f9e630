"""The evaluation's results as text and strict JSON: `format_table` prints what `isearle.evaluation.evaluate`
returns, `jsonable` makes it strict JSON."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

TITLES = {"cirr": "CIRR", "circo": "CIRCO", "fashioniq": "FashionIQ", "imagenet-r": "ImageNet-R domain conversion",
          "shapes": "ShapesCIR"}


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "-" if v != v else f"{v:.2f}"  # nan: no query in that group
    return str(v)


def _grid(header: Sequence[str], rows: Sequence[Sequence[Any]], label_column: bool = True) -> list[str]:
    cells = [list(map(str, header))] + [[_fmt(v) for v in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]

    def line(r: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 and label_column else c.rjust(w)
                         for i, (c, w) in enumerate(zip(r, widths, strict=True)))

    return [line(cells[0]), line(["-" * w for w in widths])] + [line(r) for r in cells[1:]]


def format_table(result: dict[str, Any]) -> str:
    """A plain-text results table: the headline metrics, then one block per breakdown."""
    meta = result.get("meta", {})
    head = (f"{TITLES.get(meta.get('benchmark'), meta.get('benchmark'))} {meta.get('split')} | method "
            f"{meta.get('method')}{' (' + str(meta.get('phi')) + ')' if meta.get('phi') else ''} | "
            f"{meta.get('backbone')}/{meta.get('pretrained')} | {meta.get('n_queries')} queries, "
            f"gallery {meta.get('gallery_size')}")
    lines = [head]
    flat = {k: v for k, v in result.items() if isinstance(v, (int, float)) and k != "meta"}
    if flat:
        lines += _grid(list(flat), [list(flat.values())], label_column=False)
    elif not meta.get("ground_truth", True):
        lines.append("no ground truth in this split: submit the files below to the test server")
    for key, value in result.items():
        if not isinstance(value, dict) or key == "meta" or not value:
            continue
        first = next(iter(value.values()))
        title = {"per_aspect": "mAP@10 per semantic aspect", "per_edit": "mAP@10 per edit type",
                 "per_category": "per category", "per_domain": "per domain"}.get(key, key)
        lines.append("")
        lines.append(title)
        if isinstance(first, dict):
            cols = list(first)
            lines += _grid(["", *cols], [[g, *[m.get(c, "") for c in cols]] for g, m in value.items()])
        else:
            lines += _grid(["", "mAP@10"], list(value.items()))
    for path in result.get("submissions", []):
        lines.append(f"submission: {path}")
    return "\n".join(lines)


def jsonable(obj: Any) -> Any:
    """NaN / inf -> None (strict JSON), recursively."""
    if isinstance(obj, float):
        return obj if obj == obj and abs(obj) != float("inf") else None
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    return obj
