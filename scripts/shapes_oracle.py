"""ShapesCIR diagnostic: how far a perfect pseudo-word could go with the bundled tiny CLIP.

"oracle" replaces S* by a written description of the reference ("a photo of {description} that
{caption}"); "composite word" by one vector, the mean of the description's word embeddings (the
input the trainer's --composite teaches the text tower to read); "text-target OTI" inverts the
description's *text* feature into one token (OTI with no modality gap to bridge), "image-target
OTI" the image feature (OTI proper; both gamma 0, norm cap 2). image+text is computed as `isearle eval` does, a check of this script's scoring.
Usage: python scripts/shapes_oracle.py [--split val] [--model isearle-shapes] [--pretrained isearle-shapes]
"""

from __future__ import annotations

import argparse
import random

import torch
import torch.nn.functional as F

from isearle.backbone import load_backbone
from isearle.clip_training import composite_words
from isearle.oti import OTIConfig, invert
from isearle.pseudo_word import encode_tokens, tokenize_prompts
from isearle.shapes.benchmark import load_benchmark, render_image
from isearle.shapes.captions import describe


def score(queries: torch.Tensor, gallery: torch.Tensor, rows: list[dict], row: dict[str, int]) -> tuple[float, float]:
    """(R@1, mAP@10) in percent, the reference removed from its own ranking (as `isearle eval`)."""
    sims = queries @ gallery.T
    r1 = m10 = 0.0
    for j, a in enumerate(rows):
        s = sims[j].clone()
        s[row[a["reference_img_id"]]] = float("-inf")
        top = s.topk(10).indices.tolist()
        gts = {row[g] for g in a["gt_img_ids"]}
        r1 += top[0] in gts
        hits, ap = 0, 0.0
        for k, t in enumerate(top):
            if t in gts:
                hits += 1
                ap += hits / (k + 1)
        m10 += ap / min(10, len(gts))
    return round(100 * r1 / len(rows), 2), round(100 * m10 / len(rows), 2)


@torch.no_grad()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--split", default="val")
    p.add_argument("--model", default="isearle-shapes", help="open_clip model name")
    p.add_argument("--pretrained", default="isearle-shapes", help="weights tag or a .safetensors path")
    args = p.parse_args()
    bb = load_backbone(args.model, args.pretrained, device="cpu")
    rows, gallery = load_benchmark(split=args.split)
    ids = list(gallery)
    row = {i: k for k, i in enumerate(ids)}
    feats = torch.cat([bb.encode_images(torch.stack([bb.preprocess(render_image(gallery, i, bb.image_size))
                                                     for i in ids[s:s + 500]])) for s in range(0, len(ids), 500)])
    g = F.normalize(feats.float(), dim=-1)
    rng = random.Random(0)
    oracle = [f"a photo of {describe(gallery[a['reference_img_id']], rng, p_background=1.0)} that "
              f"{a['relative_caption']}" for a in rows]
    q_oracle = F.normalize(bb.encode_texts(oracle).float(), dim=-1)
    q_text = F.normalize(bb.encode_texts([a["relative_caption"] for a in rows]).float(), dim=-1)
    q_sum = F.normalize(g[[row[a["reference_img_id"]] for a in rows]] + q_text, dim=-1)
    print(f"ShapesCIR {args.split} ({len(rows)} queries), R@1 / mAP@10")
    print("oracle (description + caption):", *score(q_oracle, g, rows, row))
    print("image+text:                    ", *score(q_sum, g, rows, row))
    prompts = tokenize_prompts(bb, [f"a photo of $ that {a['relative_caption']}" for a in rows])
    written = [t.split(" that ")[0].removeprefix("a photo of ") for t in oracle]
    words = composite_words(bb.token_embedding, bb.tokenize(written), bb.tokenizer.sot_token_id)
    print("composite word (mean of words):", *score(F.normalize(encode_tokens(bb, prompts, words).float(), dim=-1),
                                                     g, rows, row))
    descriptions = bb.encode_texts(["a photo of " + t for t in written]).float()
    for name, target in (("text-target OTI", descriptions), ("image-target OTI", g[[row[a["reference_img_id"]] for a in rows]])):
        with torch.enable_grad():
            tokens = invert(bb, target, OTIConfig(batch_size=len(rows), gamma=0.0, max_norm=2.0))
        q = F.normalize(encode_tokens(bb, prompts, tokens).float(), dim=-1)
        print(f"{name + ':':31s}", *score(q, g, rows, row))


if __name__ == "__main__":
    main()
