"""The token vocabulary seen from a pseudo-word: readable BPE pieces and the nearest tokens of S*.

Which tokens a small shapes-world model was trained on belongs to that world
(`isearle.shapes.vocabulary`); `TokenTable.nearest` takes them as `allowed`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from isearle.backbone import Backbone


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
        self._allowed: dict[frozenset[int], torch.Tensor] = {}  # allowed ids -> the rows compared

    @torch.inference_mode()
    def nearest(self, token: torch.Tensor, k: int = 10, allowed: Iterable[int] | None = None
                ) -> list[tuple[str, float]]:
        """The k most similar vocabulary tokens (readable, cosine), among `allowed` ids when given
        (then only those rows are compared: a small model's trained vocabulary is a few hundred)."""
        weight = self.backbone.token_embedding.weight
        t = token.to(weight.device).float()
        if allowed is None:
            sims = (weight.float() @ t) * self.inv_norm.to(weight.device) / t.norm().clamp_min(1e-8)
            sims[self.excluded.to(weight.device)] = -2.0
            scores, ids = sims.topk(k)
        else:
            key = frozenset(allowed)
            rows = self._allowed.get(key)
            if rows is None:  # the allowed ids, special tokens left out, sorted
                keep = sorted(set(key) - set(self.excluded.tolist()))
                rows = self._allowed[key] = torch.tensor(keep, dtype=torch.long, device=weight.device)
            sims = (weight[rows].float() @ t) * self.inv_norm.to(weight.device)[rows] / t.norm().clamp_min(1e-8)
            scores, where = sims.topk(min(k, len(rows)))
            ids = rows[where]
        return [(readable_token(self.backbone.tokenizer, i), float(s))
                for s, i in zip(scores.tolist(), ids.tolist(), strict=True) if s > -2.0]
