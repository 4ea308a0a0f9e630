"""Prefix-cached, packed text encoding of pseudo-word prompts (OTI's inner loop).

With CLIP's causal text mask, the positions before "$" never see S*: their keys and values at every
layer are the same at every OTI step. `PrefixCache` computes them once per distinct prefix; each
step then runs the transformer on the suffixes only ("$" ... end-of-text), all rows packed into one
sequence without padding, each suffix attending to its own prefix's cached keys/values and to its
own earlier suffix positions (a block-causal mask). Same arithmetic as the full pass up to fp32
rounding (tests/test_prefix_cache.py). Models whose text tower is not a standard causal CLIP
transformer (nn.MultiheadAttention blocks, argmax pooling) are refused by `supported`; callers then
use `pseudo_word.encode_tokens`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from isearle.backbone import Backbone, embed_tokens, project_text


def supported(backbone: Backbone) -> bool:
    """Whether the text tower has the structure this module re-implements."""
    text = backbone.text
    blocks = getattr(getattr(text, "transformer", None), "resblocks", None)
    if blocks is None or getattr(text, "attn_mask", None) is None or not text.transformer.batch_first:
        return False
    if getattr(text, "text_pool_type", getattr(text, "pool_type", "argmax")) != "argmax":
        return False
    for blk in blocks:
        attn = getattr(blk, "attn", None)
        if (not isinstance(attn, torch.nn.MultiheadAttention) or not attn._qkv_same_embed_dim
                or attn.bias_k is not None or hasattr(blk, "ln_1_kv")):
            return False
    return True


def run_blocks(backbone: Backbone, x: torch.Tensor, mask: torch.Tensor,
               past: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
               keep: bool = False) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
    """Run the text transformer's blocks on x [B, T, W] with extra keys/values `past` (per layer,
    [B, P, W] each, prepended) and a boolean mask [B or 1, T, P + T] (True: may attend).
    Returns the output and, with `keep`, each layer's keys/values of x."""
    kept = []
    for i, blk in enumerate(backbone.text.transformer.resblocks):
        attn = blk.attn
        b, t, w = x.shape
        heads = attn.num_heads
        q, k, v = F.linear(blk.ln_1(x), attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
        if keep:
            kept.append((k, v))
        if past is not None:
            k, v = torch.cat([past[i][0], k], dim=1), torch.cat([past[i][1], v], dim=1)

        q, k, v = (z.reshape(b, z.shape[1], heads, w // heads).transpose(1, 2) for z in (q, k, v))
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.unsqueeze(1))
        o = F.linear(o.transpose(1, 2).reshape(b, t, w), attn.out_proj.weight, attn.out_proj.bias)
        x = x + blk.ls_1(o)
        x = x + blk.ls_2(blk.mlp(blk.ln_2(x)))
    return x, kept


class PrefixCache:
    """Cached keys/values of the prefixes (positions before "$") of a fixed set of prompt token rows.

    `tokens` [N, L] are the rows OTI will draw from (each holding one "$"); `encode(rows, pseudo)`
    gives the same features as `encode_tokens(backbone, tokens[rows], pseudo)`.
    """

    def __init__(self, backbone: Backbone, tokens: torch.Tensor) -> None:
        self.backbone = backbone
        tokens = tokens.to(backbone.device)
        dollar = (tokens == backbone.placeholder_id).int().argmax(dim=1)
        eot = tokens.argmax(dim=1)
        self.suffixes = [tokens[r, int(dollar[r]) : int(eot[r]) + 1] for r in range(len(tokens))]
        self.start = dollar.tolist()  # position of "$" = prefix length
        distinct: dict[tuple[int, ...], int] = {}
        self.prefix_of = [distinct.setdefault(tuple(tokens[r, : int(dollar[r])].tolist()), len(distinct))
                          for r in range(len(tokens))]
        self._build(list(distinct))

    @torch.no_grad()
    def _build(self, prefixes: list[tuple[int, ...]]) -> None:
        """Per layer, the keys and values of every distinct prefix, packed: [sum of lengths, W]."""
        text, cast = self.backbone.text, self.backbone.text.transformer.get_cast_dtype()
        longest = max(len(p) for p in prefixes)
        ids = torch.zeros(len(prefixes), longest, dtype=torch.long, device=self.backbone.device)
        for j, p in enumerate(prefixes):
            ids[j, : len(p)] = torch.tensor(p)
        x = text.token_embedding(ids).to(cast) + text.positional_embedding[:longest].to(cast)
        causal = torch.ones(longest, longest, dtype=torch.bool, device=ids.device).tril()[None]
        _, kept = run_blocks(self.backbone, x, causal, keep=True)  # padding sits after each prefix: unseen
        lengths = [len(p) for p in prefixes]
        self.offsets = [0]
        for n in lengths:
            self.offsets.append(self.offsets[-1] + n)
        self.keys = [torch.cat([k[j, :n] for j, n in enumerate(lengths)]) for k, _ in kept]
        self.values = [torch.cat([v[j, :n] for j, n in enumerate(lengths)]) for _, v in kept]
        self.lengths = lengths
        self.distinct = len(prefixes)

    def encode(self, rows: torch.Tensor | list[int], pseudo_tokens: torch.Tensor) -> torch.Tensor:
        """Un-normalised features [B, D] of token rows `rows` with S* `pseudo_tokens` [B, W] at "$"."""
        text, device = self.backbone.text, self.backbone.device
        cast = text.transformer.get_cast_dtype()
        rows = [int(r) for r in rows]
        prefixes = [self.prefix_of[r] for r in rows]
        sufs = [self.suffixes[r] for r in rows]
        # Packed: row b owns suffix positions [first_b, first_b + S_b) and prefix keys of length P_b.
        s_len = torch.tensor([len(s) for s in sufs], device=device)
        p_len = torch.tensor([self.lengths[p] for p in prefixes], device=device)
        index = torch.arange(len(rows), device=device)
        owner, p_owner = torch.repeat_interleave(index, s_len), torch.repeat_interleave(index, p_len)
        first = torch.cumsum(s_len, 0) - s_len
        local = torch.arange(len(owner), device=device) - first[owner]  # position within the suffix
        pos = local + torch.tensor(self.start, device=device)[rows][owner]
        x = text.token_embedding(torch.cat(sufs)).to(cast)
        x = x.index_put((first,), pseudo_tokens.to(cast))  # "$" opens every suffix
        x = x + text.positional_embedding[pos].to(cast)
        # each position sees its own row's prefix and its own row's earlier suffix positions
        own = owner[:, None] == owner[None, :]
        mask = torch.cat([owner[:, None] == p_owner[None, :], own & (local[None, :] <= local[:, None])], dim=1)
        gather = torch.cat([torch.arange(self.offsets[p], self.offsets[p + 1], device=device) for p in prefixes])
        past = [(k[gather][None], v[gather][None]) for k, v in zip(self.keys, self.values, strict=True)]
        x, _ = run_blocks(self.backbone, x[None], mask[None], past)
        return project(text, x[0, first + s_len - 1])  # each row's end-of-text token


class PromptPrefix:
    """Keys/values of a query prompt's fixed start, S* included ("<sot> a photo of S* that").

    The warm query path: a cached reference keeps the prefix of its prompt, and each new caption
    runs the transformer on the caption's tokens only. `PromptPrefix.first(...)` encodes a whole
    prompt (one pass, for the reference's first query) and keeps its start; `encode(tokens)` then
    equals `encode_tokens(backbone, tokens, pseudo)` (up to fp32 rounding) for any row that starts
    with the prefix, and is None for a row that does not (the caller then runs the full pass).
    """

    def __init__(self, backbone: Backbone, ids: torch.Tensor, past: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.backbone, self.ids, self.past = backbone, ids, past

    @classmethod
    def first(cls, backbone: Backbone, tokens: torch.Tensor, pseudo: torch.Tensor, prefix_ids: torch.Tensor
              ) -> tuple[torch.Tensor, PromptPrefix | None]:
        """Feature [1, D] of one prompt row [1, L] with S* at its first "$" and, when the row starts
        with `prefix_ids` [P], the keys/values of those P positions (else None)."""
        row = tokens[0].to(backbone.device)
        eot, n = int(row.argmax()), len(prefix_ids)
        ids = row[: eot + 1]
        x = embed_tokens(backbone, ids[None], pseudo)
        causal = torch.ones(eot + 1, eot + 1, dtype=torch.bool, device=x.device).tril()[None]
        x, kept = run_blocks(backbone, x, causal, keep=True)
        prefix = None
        if eot >= n and torch.equal(ids[:n], prefix_ids.to(ids.device)):
            prefix = cls(backbone, ids[:n], [(k[:, :n], v[:, :n]) for k, v in kept])
        return project(backbone.text, x[0, -1:]), prefix

    def inputs(self, tokens: torch.Tensor) -> torch.Tensor | None:
        """The transformer's input [1, T, W] for the rest of a token row [1, L] (its positions after
        the prefix, position embeddings added), None when the row does not continue the prefix."""
        text, n = self.backbone.text, len(self.ids)
        row = tokens[0].to(self.backbone.device)
        eot = int(row.argmax())
        if eot < n or not torch.equal(row[:n], self.ids):
            return None
        x = text.token_embedding(row[None, n : eot + 1]).to(text.transformer.get_cast_dtype())
        return x + text.positional_embedding[n : eot + 1].to(x.dtype)

    def stacked(self) -> torch.Tensor:
        """The keys/values as one tensor [layers, 2, 1, P, W] (what an exported graph takes)."""
        return torch.stack([torch.stack([k, v]) for k, v in self.past])

    def encode(self, tokens: torch.Tensor, engine: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
               ) -> torch.Tensor | None:
        """Un-normalised feature [1, D] of one token row [1, L] that continues the prefix, else None.
        `engine(x, stacked keys/values)` runs the blocks instead of PyTorch (`onnx_text.OnnxText`)."""
        x = self.inputs(tokens)
        if x is None:
            return None
        if engine is not None:
            return engine(x, self.stacked())
        return continue_blocks(self.backbone, x, self.past)


def continue_blocks(backbone: Backbone, x: torch.Tensor, past: list[tuple[torch.Tensor, torch.Tensor]]
                    ) -> torch.Tensor:
    """Feature [1, D] of the last position of x [1, T, W] run after a prefix's keys/values `past`
    (each position sees the whole prefix and its own earlier positions)."""
    t, n = x.shape[1], past[0][0].shape[1]
    mask = torch.cat([torch.ones(t, n, dtype=torch.bool, device=x.device),
                      torch.ones(t, t, dtype=torch.bool, device=x.device).tril()], dim=1)[None]
    y, _ = run_blocks(backbone, x, mask, past)
    return project(backbone.text, y[0, -1:])


def project(text: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Final LayerNorm and text projection of end-of-text states [B, W] -> features [B, D]."""
    return project_text(text, text.ln_final(x))
