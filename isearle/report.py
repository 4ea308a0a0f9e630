"""The static report of `isearle inspect`: one self-contained HTML page (no server) and its JSON twin.

Per image: a thumbnail, S*'s norm per method, its nearest tokens and concepts, and the phi-vs-OTI
cosine when both were asked; over the folder, the distributions of norms and cosines as inline SVG
plots. Everything is embedded (images as data URIs, plots as SVG): the page opens from file://.
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from isearle.artifacts import write_json, write_text
from isearle.errors import NotFound
from isearle.explain import ImageRecord, summarise
from isearle.service import Session

COLORS = {"phi": "#4f46e5", "oti": "#db2777", "cosine": "#059669"}
CSS = """
body{font-family:system-ui,sans-serif;margin:24px;color:#111}
table{border-collapse:collapse;width:100%}td,th{border-top:1px solid #ddd;padding:6px;vertical-align:top;text-align:left}
th{background:#f4f4f5}img.thumb{width:96px;height:auto;image-rendering:pixelated}
.num{font-variant-numeric:tabular-nums;white-space:nowrap}.plots{display:flex;flex-wrap:wrap;gap:16px}
.list{font-size:13px;line-height:1.4}.muted{color:#666;font-size:13px}
"""


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


def _data_uri(record: ImageRecord) -> str:
    if record.thumbnail is None:
        return ""
    buf = io.BytesIO()
    record.thumbnail.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _pairs(pairs: Sequence[tuple[str, float]], n: int = 6) -> str:
    return "<br>".join(f"{html.escape(str(w))} <span class=num>{s:.3f}</span>" for w, s in pairs[:n])


def render_html(records: Sequence[ImageRecord], info: dict[str, Any]) -> str:
    """The report page."""
    methods = list(dict.fromkeys(m for r in records for m in r.views))
    summary = summarise(records)
    plots = [histogram_svg({m: [r.views[m].relative_norm for r in records if m in r.views] for m in methods},
                           "norm of S*", "‖S*‖ / mean token norm")]
    cosines = [r.cosine for r in records if r.cosine is not None]
    if cosines:
        plots.append(histogram_svg({"cosine": cosines}, "phi against OTI", "cosine(S*_phi, S*_OTI)"))
    head = "".join(f"<th>{m}: norm</th><th>{m}: nearest tokens</th><th>{m}: nearest concepts</th>" for m in methods)
    head += "<th>phi·OTI cosine</th>" if cosines else ""
    rows = []
    for r in records:
        cells = [f"<td><img class=thumb alt='' src='{_data_uri(r)}'><br><span class=muted>{html.escape(r.path)}</span></td>"]
        for m in methods:
            v = r.views.get(m)
            cells += [f"<td class=num>{v.norm:.3f}<br><span class=muted>{v.relative_norm:.2f}×</span></td>",
                      f"<td class=list>{_pairs(v.tokens)}</td>", f"<td class=list>{_pairs(v.concepts)}</td>"] if v \
                else ["<td></td>"] * 3
        if cosines:
            cells.append(f"<td class=num>{'' if r.cosine is None else f'{r.cosine:.3f}'}</td>")
        rows.append(f"<tr class=image-row>{''.join(cells)}</tr>")
    stats = "".join(f"<li>{m}: ‖S*‖ mean {s['mean']:.3f} (std {s['std']:.3f}, {s['min']:.3f}–{s['max']:.3f})</li>"
                    for m, s in summary["norm"].items() if s)
    if cosines:
        c = summary["phi_oti_cosine"]
        stats += f"<li>phi·OTI cosine: mean {c['mean']:.3f} (std {c['std']:.3f}, {c['min']:.3f}–{c['max']:.3f})</li>"
    settings = html.escape(json.dumps(info, ensure_ascii=False))
    return (f"<!doctype html><html><head><meta charset=utf-8><title>isearle inspect: {len(records)} images</title>"
            f"<style>{CSS}</style></head><body><h1>Pseudo-words of {len(records)} images</h1>"
            f"<p class=muted>{settings}</p><h2>Over the folder</h2><ul id=summary>{stats}</ul>"
            f"<div class=plots id=plots>{''.join(plots)}</div><h2>Per image</h2>"
            f"<table id=images><tr><th>image</th>{head}</tr>{''.join(rows)}</table></body></html>")


def write_report(records: Sequence[ImageRecord], out: str | Path, info: dict[str, Any], json_twin: bool = True
                 ) -> dict[str, Path]:
    """out/index.html (and out/report.json: the same numbers for notebooks)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"html": out / "index.html"}
    write_text(paths["html"], render_html(records, info))
    if json_twin:
        paths["json"] = out / "report.json"
        data = {"info": info, "summary": summarise(records), "images": [r.as_dict() for r in records]}
        write_json(paths["json"], data, indent=1)
    return paths


def open_inspector(model: str, pretrained: str | None, phi: str | None = None, device: str | None = None,
                   vocabulary: str | None = None, trained_only: bool = True, progress: bool = True) -> Session:
    """A session without a gallery (batch inspection): backbone, phi (given or default), concepts.

    The concept vocabulary defaults to the shapes world's for its models and ImageNet's otherwise
    (both offline); `trained_only` limits a small model's nearest tokens to those it was trained on.
    """
    from isearle.backbone import load_backbone
    from isearle.service import open_session

    session = open_session(load_backbone(model, pretrained, device), None, phi, vocabulary=vocabulary,
                           trained_only=trained_only)
    session.concepts(progress=progress)  # built now, with a progress bar
    return session


def inspect_folder(images: str | Path, out: str | Path, model: str, pretrained: str | None,
                   methods: Sequence[str] = ("phi",), steps: int | None = None, phi: str | None = None,
                   device: str | None = None, vocabulary: str | None = None, top_k: int = 10,
                   json_twin: bool = False, warm: bool = True, progress: bool = True) -> dict[str, Path]:
    """`isearle inspect`: every image of a folder inverted by `methods`, described, and reported."""
    from isearle.explain import inspect_images
    from isearle.images import list_images
    from isearle.oti import token_norm

    paths = list_images(images)
    if not paths:
        raise NotFound(f"no images in {images}: give a folder of PNG / JPEG / WebP files")
    insp = open_inspector(model, pretrained, phi, device, vocabulary, progress=progress)
    oti = insp.oti_config(steps)
    records = inspect_images(insp, paths, methods, oti, top_k, warm, progress=progress)
    for r in records:  # paths relative to the folder: the report does not depend on where it ran
        r.path = str(Path(r.path).relative_to(images))
    info = {"model": insp.backbone.name, "pretrained": str(insp.backbone.pretrained), "phi": insp.phi_name,
            "methods": list(methods), "oti": {"steps": oti.steps, "gamma": oti.gamma, "max_norm": oti.max_norm,
                                              "warm_start": insp.phi_name if warm else None}
            if "oti" in methods else None,
            "vocabulary": len(insp.bank.names), "mean_token_norm": round(token_norm(insp.backbone), 6)}
    return write_report(records, out, info, json_twin)
