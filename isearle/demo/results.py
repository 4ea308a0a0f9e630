"""What a query returns to the app: result items, the status line, the pseudo-word panel."""

from __future__ import annotations

from dataclasses import dataclass

from PIL import Image

METHOD_LABELS = {"phi": "phi (fast)", "oti": "OTI (precise)"}


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
