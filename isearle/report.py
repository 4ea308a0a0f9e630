"""The static report of `isearle inspect`: one self-contained HTML page (no server) and its JSON twin.

Per image: a thumbnail, S*'s norm per method, its nearest tokens and concepts, the folder's images
that "a photo of S*" retrieves (the folder is the gallery), and the phi-vs-OTI cosine when both were
asked; over the folder, the distributions of norms and cosines as inline SVG plots. Files that are
not readable images are skipped and named (as `isearle index` does). Everything is embedded (images
as data URIs, plots as SVG): the page opens from file://.
"""

from __future__ import annotations

import base64
import html
import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

from isearle.artifacts import write_json, write_text
from isearle.errors import NotFound
from isearle.explain import ImageRecord, summarise
from isearle.service import Session

log = logging.getLogger(__name__)
RETRIEVED = 3  # images of the folder shown per S* (its nearest by "a photo of S*")

COLORS = {"phi": "#4f46e5", "oti": "#db2777", "cosine": "#059669"}
CSS = """
body{font-family:system-ui,sans-serif;margin:24px;color:#111}
table{border-collapse:collapse;width:100%}td,th{border-top:1px solid #ddd;padding:6px;vertical-align:top;text-align:left}
th{background:#f4f4f5}img.thumb{width:96px;height:auto;image-rendering:pixelated}
.num{font-variant-numeric:tabular-nums;white-space:nowrap}.plots{display:flex;flex-wrap:wrap;gap:16px}
.list{font-size:13px;line-height:1.4}.muted{color:#666;font-size:13px}
dl.settings{display:grid;grid-template-columns:max-content auto;gap:2px 14px;font-size:14px}
dl.settings dt{color:#555}dl.settings dd{margin:0}
.hits{display:flex;gap:6px}.hits figure{margin:0;text-align:center;font-size:11px;color:#555}
.hits img{width:64px;height:64px;object-fit:contain;display:block;background:#f4f4f5}
"""


@dataclass
class Extras:
    """What the report shows besides the records: the folder's images each S* retrieves (per row,
    per method: [(path, cosine)]), their thumbnails, and the files skipped as unreadable."""

    retrieved: list[dict[str, list[tuple[str, float]]]] = field(default_factory=list)
    thumbnails: dict[str, str] = field(default_factory=dict)  # path -> data URI
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)



def histogram_svg(series: dict[str, Sequence[float]], title: str, xlabel: str) -> str:
    """Overlaid histograms of named value lists as an inline SVG (matplotlib's object API, text as text)."""
    import matplotlib
    from matplotlib.backends.backend_svg import FigureCanvasSVG
    from matplotlib.figure import Figure

    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "isearle"}):
        fig = Figure(figsize=(4.6, 2.8), dpi=100)
        FigureCanvasSVG(fig)
        ax = fig.add_subplot()
        for name, values in series.items():
            if len(values):
                ax.hist(list(values), bins=min(20, max(3, len(values))), alpha=0.6, label=f"{name} (n={len(values)})",
                        color=COLORS.get(name))
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(xlabel, fontsize=9)
        ax.set_ylabel("images", fontsize=9)
        ax.tick_params(labelsize=8)
        ax.legend(fontsize=8)
        fig.tight_layout()
        buf = io.StringIO()
        fig.savefig(buf, format="svg")
    text = buf.getvalue()
    return text[text.index("<svg"):]


def _data_uri(image: Image.Image | None) -> str:
    if image is None:
        return ""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _hits(hits: Sequence[tuple[str, float]], thumbnails: dict[str, str]) -> str:
    cells = [f"<figure><img alt='' src='{thumbnails.get(path, '')}'>{html.escape(Path(path).name)}<br>"
             f"<span class=num>{score:.3f}</span></figure>" for path, score in hits]
    return f"<div class=hits>{''.join(cells)}</div>"


def _settings(info: dict[str, Any]) -> str:
    """The report's header as readable lines (what made these numbers), not a JSON dump."""
    rows = [("Model", f"{info.get('model')} / {info.get('pretrained')}"), ("phi", info.get("phi") or "none"),
            ("Methods", ", ".join("OTI" if m == "oti" else m for m in info.get("methods", [])))]
    oti = info.get("oti")
    if oti:
        start = f"warm start from phi ({oti['warm_start']})" if oti.get("warm_start") else "cold start from noise"
        rows.append(("OTI", f"{oti['steps']} steps, γ = {oti['gamma']}, max norm {oti['max_norm']}, {start}"))
    rows.append(("Vocabulary", f"{info.get('vocabulary')} concepts"))
    if "mean_token_norm" in info:
        rows.append(("Mean token norm", f"{info['mean_token_norm']:.4f}"))
    if "images" in info:
        rows.append(("Images", f"{info['images']} inspected" + (f", {info['skipped']} skipped (below)"
                                                                  if info.get("skipped") else "")))
    return "<dl class=settings id=settings>" + "".join(
        f"<dt>{html.escape(k)}</dt><dd>{html.escape(str(v))}</dd>" for k, v in rows) + "</dl>"


def _pairs(pairs: Sequence[tuple[str, float]], n: int = 6) -> str:
    return "<br>".join(f"{html.escape(str(w))} <span class=num>{s:.3f}</span>" for w, s in pairs[:n])


def render_html(records: Sequence[ImageRecord], info: dict[str, Any], extras: Extras | None = None) -> str:
    """The report page."""
    extras = extras or Extras()
    methods = list(dict.fromkeys(m for r in records for m in r.views))
    summary = summarise(records)
    plots = [histogram_svg({m: [r.views[m].relative_norm for r in records if m in r.views] for m in methods},
                           "norm of S*", "‖S*‖ / mean token norm")]
    cosines = [r.cosine for r in records if r.cosine is not None]
    if cosines:
        plots.append(histogram_svg({"cosine": cosines}, "phi against OTI", "cosine(S*_phi, S*_OTI)"))
    retrieves = bool(extras.retrieved)
    head = "".join(f"<th>{m}: norm</th><th>{m}: nearest tokens</th><th>{m}: nearest concepts</th>"
                   + (f"<th>{m}: “a photo of S*” retrieves</th>" if retrieves else "") for m in methods)
    head += "<th>phi·OTI cosine</th>" if cosines else ""
    rows = []
    for n, r in enumerate(records):
        cells = [f"<td><img class=thumb alt='' src='{_data_uri(r.thumbnail)}'><br>"
                 f"<span class=muted>{html.escape(r.path)}</span></td>"]
        for m in methods:
            v = r.views.get(m)
            cells += [f"<td class=num>{v.norm:.3f}<br><span class=muted>{v.relative_norm:.2f}×</span></td>",
                      f"<td class=list>{_pairs(v.tokens)}</td>", f"<td class=list>{_pairs(v.concepts)}</td>"] if v \
                else ["<td></td>"] * 3
            if retrieves:
                hits = extras.retrieved[n].get(m, []) if n < len(extras.retrieved) else []
                cells.append(f"<td class=retrieved>{_hits(hits, extras.thumbnails)}</td>")
        if cosines:
            cells.append(f"<td class=num>{'' if r.cosine is None else f'{r.cosine:.3f}'}</td>")
        rows.append(f"<tr class=image-row>{''.join(cells)}</tr>")
    stats = "".join(f"<li>{m}: ‖S*‖ mean {s['mean']:.3f} (std {s['std']:.3f}, {s['min']:.3f}–{s['max']:.3f})</li>"
                    for m, s in summary["norm"].items() if s)
    if cosines:
        c = summary["phi_oti_cosine"]
        stats += f"<li>phi·OTI cosine: mean {c['mean']:.3f} (std {c['std']:.3f}, {c['min']:.3f}–{c['max']:.3f})</li>"
    skipped = ""
    if extras.skipped:
        items = "".join(f"<li><code>{html.escape(p)}</code>: {html.escape(why)}</li>" for p, why in extras.skipped)
        skipped = f"<h2>Skipped</h2><p class=muted>not readable as images</p><ul id=skipped>{items}</ul>"
    return (f"<!doctype html><html><head><meta charset=utf-8><title>isearle inspect: {len(records)} images</title>"
            f"<style>{CSS}</style></head><body><h1>Pseudo-words of {len(records)} images</h1>"
            f"{_settings(info)}{skipped}<h2>Over the folder</h2><ul id=summary>{stats}</ul>"
            f"<div class=plots id=plots>{''.join(plots)}</div><h2>Per image</h2>"
            f"<table id=images><tr><th>image</th>{head}</tr>{''.join(rows)}</table></body></html>")


def write_report(records: Sequence[ImageRecord], out: str | Path, info: dict[str, Any], json_twin: bool = True,
                 extras: Extras | None = None) -> dict[str, Path]:
    """out/index.html (and out/report.json: the same numbers for notebooks), written as every output is."""
    extras = extras or Extras()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"html": out / "index.html"}
    write_text(paths["html"], render_html(records, info, extras))
    if json_twin:
        paths["json"] = out / "report.json"
        images = [{**r.as_dict(), **({"retrieved": {m: [[p, round(s, 6)] for p, s in hits] for m, hits in
                                                      extras.retrieved[n].items()}} if n < len(extras.retrieved) else {})}
                  for n, r in enumerate(records)]
        data = {"info": info, "summary": summarise(records), "images": images,
                "skipped": [{"path": p, "reason": why} for p, why in extras.skipped]}
        write_json(paths["json"], data, indent=1)
    return paths


def open_inspector(model: str, pretrained: str | None, phi: str | None = None, device: str | None = None,
                   vocabulary: str | None = None, trained_only: bool = True, progress: bool = True) -> Session:
    """A session without a gallery (batch inspection): backbone, phi (given or default), concepts.

    The concept vocabulary defaults to the shapes world's for its models and ImageNet's otherwise
    (both offline); `trained_only` limits a small model's nearest tokens to those it was trained on.
    """
    from isearle.backbone import WeightsUnavailable, load_backbone
    from isearle.runtime import hub_offline
    from isearle.service import open_session

    try:
        backbone = load_backbone(model, pretrained, device)
    except WeightsUnavailable as err:
        if not hub_offline() or model == "isearle-shapes":
            raise
        raise WeightsUnavailable(f"{err}; offline, the bundled model works: --model isearle-shapes "
                                 f"--pretrained isearle-shapes") from None
    session = open_session(backbone, None, phi, vocabulary=vocabulary, trained_only=trained_only)
    session.concepts(progress=progress)  # built now, with a progress bar
    return session


def inspect_folder(images: str | Path, out: str | Path, model: str, pretrained: str | None,
                   methods: Sequence[str] = ("phi",), steps: int | None = None, phi: str | None = None,
                   device: str | None = None, vocabulary: str | None = None, top_k: int = 10,
                   json_twin: bool = False, warm: bool = True, progress: bool = True) -> dict[str, Path]:
    """`isearle inspect`: every image of a folder inverted by `methods`, described, and reported.

    Unreadable files are skipped with a warning and listed in the report; each S* also ranks the
    folder's other images by "a photo of S*" (the folder is the gallery)."""
    from tqdm.auto import tqdm

    from isearle.explain import check_methods, cosine, describe, pseudo_tokens
    from isearle.images import BadImage, list_images
    from isearle.oti import token_norm
    from isearle.paths import public_name

    paths = list_images(images)
    if not paths:
        raise NotFound(f"no images in {images}: give a folder of PNG / JPEG / WebP files")
    insp = open_inspector(model, pretrained, phi, device, vocabulary, progress=progress)
    oti = insp.oti_config(steps)
    methods = check_methods(insp, methods)
    records: list[ImageRecord] = []
    extras = Extras()
    features: list[torch.Tensor] = []
    token_rows: list[dict[str, torch.Tensor]] = []
    for path in tqdm(paths, desc="inspect", disable=not progress):
        name = str(Path(path).relative_to(images))  # relative: the report does not depend on where it ran
        try:
            ref = insp.reference(path)
        except BadImage as err:
            log.warning("skipped %s: %s", name, err)
            extras.skipped.append((name, str(err)))
            continue
        tokens = pseudo_tokens(insp, ref, methods, oti, warm)
        thumb = ref.image.copy()
        thumb.thumbnail((96, 96))
        cos = cosine(tokens["phi"], tokens["oti"]) if len(tokens) == 2 else None
        records.append(ImageRecord(name, ref.key, {m: describe(insp, t, top_k) for m, t in tokens.items()},
                                   cos, thumb))
        token_rows.append(tokens)
        features.append(F.normalize(insp.backbone.encode_pil([ref.image]), dim=-1)[0].cpu())
        small = ref.image.copy()
        small.thumbnail((64, 64))
        extras.thumbnails[name] = _data_uri(small)
    if not records:
        raise NotFound(f"no readable images in {images}: all {len(paths)} files were skipped")
    extras.retrieved = retrieved_in_folder(insp, token_rows, torch.stack(features), [r.path for r in records])
    info = {"model": insp.backbone.name, "pretrained": public_name(insp.backbone.pretrained) or "None",
            "phi": public_name(insp.phi_name), "methods": list(methods),
            "oti": {"steps": oti.steps, "gamma": oti.gamma, "max_norm": oti.max_norm,
                    "warm_start": public_name(insp.phi_name) if warm else None} if "oti" in methods else None,
            "vocabulary": len(insp.bank.names), "mean_token_norm": round(token_norm(insp.backbone), 6),
            "images": len(records), "skipped": len(extras.skipped)}
    return write_report(records, out, info, json_twin, extras)


def retrieved_in_folder(insp: Session, tokens: Sequence[dict[str, torch.Tensor]], features: torch.Tensor,
                        names: Sequence[str], k: int = RETRIEVED) -> list[dict[str, list[tuple[str, float]]]]:
    """Per image and method: the folder's other images nearest to "a photo of S*" ([(name, cosine)])."""
    from isearle.explain import ALONE_TEMPLATE, token_features

    out = []
    for row, by_method in enumerate(tokens):
        hits: dict[str, list[tuple[str, float]]] = {}
        for method, token in by_method.items():
            query = token_features(insp.backbone, token, [ALONE_TEMPLATE])[0].float().cpu()
            scores = features.float() @ query
            scores[row] = float("-inf")  # the image itself
            top = torch.topk(scores, min(k, len(names) - 1)) if len(names) > 1 else None
            hits[method] = [] if top is None else [(names[int(i)], float(v)) for v, i in zip(top.values, top.indices,
                                                                                          strict=True)]
        out.append(hits)
    return out
