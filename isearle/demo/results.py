"""What a query returns to the app: result items, the status line, the pseudo-word panel."""

from __future__ import annotations

from dataclasses import dataclass, field

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
    #: the ground truths with their rank in the whole ranking (also those outside the top k)
    truth: list[ResultItem] = field(default_factory=list)

    @property
    def gt_found(self) -> int:
        return sum(1 for it in self.items if it.ground_truth)

    def truth_gallery(self) -> list[tuple[str, str]]:
        """(thumbnail, caption) per ground truth, best rank first: "#3 ✓" in the top k, else "#27 · not in top 10"."""
        k = len(self.items)
        return [(it.image, f"#{it.rank} ✓" if it.rank <= k else f"#{it.rank} · not in top {k}")
                for it in sorted(self.truth, key=lambda it: it.rank)]

    def summary(self) -> str:
        """A one-paragraph Markdown status line."""
        method = METHOD_LABELS.get(self.method, self.method)
        shown = self.prompt.replace("$", "S*")
        shown = shown if len(shown) <= 160 else shown[:80] + " … " + shown[-60:]
        text = (f"**{len(self.items)} results** for “{shown}” · {method} · {self.elapsed_ms:.0f} ms"
                f"{f' ({self.cached} cached)' if self.cached else ''}")
        if self.gt_ids is not None:
            text += (f"  \nThe benchmark's answers: **{self.gt_found} of {len(self.gt_ids)}** in the top "
                     f"{len(self.items)} (marked ✓)")
            outside = sorted(it.rank for it in self.truth if it.rank > len(self.items))
            if outside:
                text += "; the others rank " + ", ".join(f"#{r}" for r in outside)
        if self.reference_id is not None:
            text += f"  \nReference: gallery item `{self.reference_id}` (left out of the results)"
        for note in self.notes:
            text += f"  \n⚠ {note}"
        return text

    def as_json(self) -> list[dict]:
        return [{"rank": it.rank, "id": it.id, "score": round(it.score, 6), "ground_truth": it.ground_truth}
                for it in self.items]

    def truth_json(self) -> list[dict]:
        """The ground truths with their rank in the whole ranking and score (empty without ground truth)."""
        return [{"id": it.id, "rank": it.rank, "score": round(it.score, 6)}
                for it in sorted(self.truth, key=lambda it: it.rank)]


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
