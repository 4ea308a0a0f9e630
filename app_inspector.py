"""The demo's pseudo-word inspector: six tabs under the results, each a named API endpoint (Gradio 6).

Thin, like app.py: widgets wired to `isearle.demo.inspector.InspectorViews`, which calls
`isearle.explain` (the numbers) and the demo engine (references, thumbnails, ground truths).
Endpoints: /watch_oti (streamed), /alone, /compare, /blend, /words, /download_token, /search_token.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import gradio as gr
import pandas as pd

from isearle.demo import WORDS_NOTE
from isearle.demo.inspector import InspectorViews

BARS = 8  # nearest tokens / concepts shown as bars
LOSS_COLORS = {"from phi (warm start)": "#4f46e5", "from noise N(0, 0.02)": "#f59e0b"}


def _losses(rows: Sequence[dict]) -> pd.DataFrame:
    """Loss rows with a blank (NaN) row per run at step 0: a streamed native plot draws its lines without
    a stroke (invisible) unless every colour it will show was in its data from the first update
    (Gradio 6.31; the browser test checks the strokes)."""
    seed = [{"step": 0, "loss": float("nan"), "run": run} for run in LOSS_COLORS]
    return pd.DataFrame([*seed, *rows], columns=["step", "loss", "run"]).astype({"step": int, "loss": float})


def _bars(pairs: Sequence[Sequence], label: str, value: str = "cosine") -> pd.DataFrame:
    return pd.DataFrame({label: [str(p[0]) for p in pairs[:BARS]], value: [float(p[1]) for p in pairs[:BARS]]})


def _upper(values: Sequence[float]) -> float:
    """The top of a bar chart's value axis, which starts at 0."""
    return max([0.0, *values]) * 1.1 or 1.0


def bar_plot(frame: pd.DataFrame, value: str) -> gr.BarPlot:
    """A bar-plot update: shown (hidden while empty), its value axis from 0."""
    return gr.BarPlot(frame, y_lim=[0, _upper(frame[value].tolist())], visible=True)


#: the words table's columns as shown (the JSON output keeps the short names)
WORD_COLUMNS = {"word": "word dropped", "change": "query change (1 − cos)",
                "top1_rank": "new rank of the #1 result", "overlap": "results kept (overlap)"}


def heading(text: str, **kw) -> gr.Markdown:
    """A gallery's title above it (a gallery's own label floats over its first thumbnails)."""
    return gr.Markdown(text, elem_classes=["isearle-heading", *kw.pop("elem_classes", [])], **kw)


def result_gallery(elem_id: str, columns: int = 5, **kw) -> gr.Gallery:
    """A gallery whose pictures nothing covers: no floating label, no corner buttons, captions below (CSS)."""
    return gr.Gallery(show_label=False, columns=columns, height="auto", allow_preview=False, object_fit="contain",
                      buttons=[], elem_id=elem_id, elem_classes=["isearle-gallery"], **kw)


def pass_file_through(image: gr.Image) -> gr.Image:
    """Hand uploads to the handler unopened: `isearle.images` checks them and says what is wrong.

    gr.Image would open the file with PIL first and fail with a generic error. (An instance override,
    not a subclass: Gradio writes a .pyi stub next to any module that subclasses a component.)
    """
    original = image.preprocess

    def preprocess(payload):
        if payload is not None and payload.path:
            return str(payload.path)
        return original(payload)

    image.preprocess = preprocess
    return image


def add_inspector(views: InspectorViews, main: dict[str, gr.components.Component], examples: Sequence[tuple],
                  guarded: Callable, gallery: Callable, gpu: Callable) -> None:
    """The inspector's tabs and events; `main` holds the app's reference, caption, method, steps, top_k,
    backbone and trained_only widgets, which every view reads."""
    ref, cap, method, steps, top_k, backbone, trained = (main[n] for n in (
        "reference", "caption", "method", "steps", "top_k", "backbone", "trained_only"))

    @gpu(120)
    @guarded
    def watch(reference, caption, n_steps, every, warm, backbone_key, trained_only):
        for f in views.watch(backbone_key, reference, caption, n_steps, every, warm, 5, trained_only):
            yield (gr.LinePlot(_losses(f.losses), x_lim=[0, f.steps], visible=True), f.summary,
                   bar_plot(_bars(f.tokens, "token"), "cosine"), bar_plot(_bars(f.concepts, "concept"), "cosine"),
                   gallery(f.items), f.as_json())

    @gpu(60)
    @guarded
    def alone(reference, caption, m, n_steps, k, backbone_key, trained_only,
              progress=gr.Progress(track_tqdm=True)):  # noqa: B008 (Gradio idiom)
        items, summary, data = views.alone(backbone_key, reference, caption, m, n_steps, k, trained_only)
        return gallery(items), summary, data

    @gpu(60)
    @guarded
    def compare(reference, caption, n_steps, k, backbone_key, trained_only,
                progress=gr.Progress(track_tqdm=True)):  # noqa: B008 (Gradio idiom)
        phi_items, oti_items, table, summary, data = views.compare(backbone_key, reference, caption, n_steps, k,
                                                                   trained_only)
        return gallery(phi_items), gallery(oti_items), table, summary, data

    @gpu(60)
    @guarded
    def blend(reference, second, alpha, caption, m, n_steps, k, backbone_key, trained_only,
              progress=gr.Progress(track_tqdm=True)):  # noqa: B008 (Gradio idiom)
        items, summary, data = views.blend(backbone_key, reference, second, alpha, caption, m, n_steps, k,
                                           trained_only)
        return gallery(items), summary, data

    @gpu(60)
    @guarded
    def words(reference, caption, m, n_steps, k, chosen, backbone_key, trained_only,
              progress=gr.Progress(track_tqdm=True)):  # noqa: B008 (Gradio idiom)
        rows, summary, data = views.words(backbone_key, reference, caption, m, n_steps, k, chosen, trained_only)
        frame = pd.DataFrame(rows, columns=list(WORD_COLUMNS))
        table = frame.assign(change=frame["change"].round(3), overlap=frame["overlap"].round(2),
                             top1_rank=frame["top1_rank"].map(lambda r: "beyond 100" if pd.isna(r) else f"#{int(r)}"))
        return (bar_plot(frame[["word", "change"]], "change"), table.rename(columns=WORD_COLUMNS),
                f"{summary}  \n{WORDS_NOTE}" if summary else summary, data)

    @gpu(60)
    @guarded
    def download(reference, m, n_steps, backbone_key, progress=gr.Progress(track_tqdm=True)):  # noqa: B008
        path, meta = views.export(backbone_key, reference, m, n_steps)
        return str(path), meta

    @gpu(30)
    @guarded
    def search_token(file, caption, k, backbone_key):
        items, summary, data = views.search_token(backbone_key, file, caption, k)
        return gallery(items), summary, data

    gr.Markdown("## The pseudo-word inspector\nWhat did the inversion capture, how did OTI get there, and which "
                "part of the query mattered? Every tab uses the reference, caption and settings above.")
    with gr.Tabs(elem_id="inspector"):
        with gr.Tab("Watch OTI work", id="watch", elem_id="tab-watch"):
            with gr.Row():
                every = gr.Slider(1, 50, value=10, step=1, label="update every N steps")
                warm = gr.Checkbox(value=True, label="warm start from phi (and a run from noise to compare)")
                watch_run = gr.Button("Watch OTI", variant="primary", elem_id="watch-run")
            watch_status = gr.Markdown(elem_id="watch-status")
            loss_plot = gr.LinePlot(_losses([]), x="step", y="loss", color="run", color_map=LOSS_COLORS, height=240,
                                    title="OTI loss per step", elem_id="watch-loss", visible=False)
            with gr.Row():
                watch_tokens = gr.BarPlot(x="token", y="cosine", height=240, sort="-y", x_label_angle=-35,
                                          title="nearest tokens of S*", elem_id="watch-tokens", visible=False)
                watch_concepts = gr.BarPlot(x="concept", y="cosine", height=240, sort="-y", x_label_angle=-35,
                                            title="nearest concepts of “a photo of S*”", elem_id="watch-concepts",
                                            visible=False)
            heading("**Current top results**")
            watch_results = result_gallery("watch-results")
            watch_json = gr.JSON(visible=False)
        with gr.Tab("S* alone", id="alone", elem_id="tab-alone"):
            alone_run = gr.Button("Search “a photo of S*”, no caption", elem_id="alone-run")
            alone_status = gr.Markdown(elem_id="alone-status")
            heading("**What the inversion captured of the reference**")
            alone_results = result_gallery("alone-results")
            alone_json = gr.JSON(visible=False)
        with gr.Tab("phi vs OTI", id="compare", elem_id="tab-compare"):
            compare_run = gr.Button("Compare phi and OTI", elem_id="compare-run")
            compare_status = gr.Markdown(elem_id="compare-status")
            with gr.Row():
                with gr.Column():
                    heading("**phi** (one step)")
                    phi_results = result_gallery("compare-phi")
                with gr.Column():
                    heading("**OTI** (optimised)")
                    oti_results = result_gallery("compare-oti")
            compare_table = gr.Dataframe(headers=["#", "phi concept", "cos", "OTI concept", "cos", "phi token", "cos",
                                                  "OTI token", "cos"], interactive=False, elem_id="compare-table")
            compare_json = gr.JSON(visible=False)
        with gr.Tab("Blend two references", id="blend", elem_id="tab-blend"):
            with gr.Row():
                with gr.Column(scale=1, min_width=220):
                    heading("**Reference A** (the one above)")
                    first = gr.Image(label="Reference A", show_label=False, type="filepath", height=200,
                                     interactive=False, buttons=[], elem_id="blend-first")
                with gr.Column(scale=1, min_width=220):
                    heading("**Reference B**: upload one or pick one below")
                    second = pass_file_through(gr.Image(
                        label="Second reference (B)", show_label=False, type="filepath", format="png", height=200,
                        sources=["upload", "clipboard"], elem_id="blend-second"))
                    second_examples = gr.Dataset(components=["image"], samples=[[p] for p, _, _ in examples],
                                                 type="index", layout="gallery", samples_per_page=12,
                                                 label="pick B", elem_id="blend-examples", visible=bool(examples))
                with gr.Column(scale=3):
                    alpha = gr.Slider(0, 1, value=0.5, step=0.05, label="mix: 0 = only A, 1 = only B",
                                      info="the made-up word is (1 − mix) × A's plus mix × B's", elem_id="blend-alpha")
                    blend_status = gr.Markdown(elem_id="blend-status")
                    heading("**Results of the blend** (with the caption, when there is one)")
                    blend_results = result_gallery("blend-results")
            blend_json = gr.JSON(visible=False)
        with gr.Tab("Which words mattered", id="words", elem_id="tab-words"):
            with gr.Row():
                chosen = gr.Textbox(label="words to drop (empty: each caption word in turn)", scale=3)
                words_run = gr.Button("Drop each word", elem_id="words-run", scale=1)
            words_status = gr.Markdown(elem_id="words-status")
            words_plot = gr.BarPlot(x="word", y="change", height=260, x_label_angle=-35, visible=False,
                                    title="1 − cos(query, query without the word)", elem_id="words-plot")
            words_table = gr.Dataframe(interactive=False, elem_id="words-table")
            words_json = gr.JSON(visible=False)
        with gr.Tab("Take S* with you", id="file", elem_id="tab-file"):
            with gr.Row():
                export_run = gr.Button("Make S* of the reference a file", elem_id="export-run")
                exported = gr.File(label="S* (safetensors)", interactive=False, elem_id="export-file")
            export_json = gr.JSON(label="metadata")
            with gr.Row():
                upload = gr.File(label="a pseudo-word file as the reference", file_types=[".safetensors"],
                                 type="filepath", elem_id="token-file")
                token_run = gr.Button("Search with this S* and the caption", elem_id="token-run")
            token_status = gr.Markdown(elem_id="token-status")
            token_results = result_gallery("token-results")
            token_json = gr.JSON(visible=False)

    watch_run.click(watch, [ref, cap, steps, every, warm, backbone, trained],
                    [loss_plot, watch_status, watch_tokens, watch_concepts, watch_results, watch_json],
                    api_name="watch_oti", concurrency_limit=1)
    alone_run.click(alone, [ref, cap, method, steps, top_k, backbone, trained], [alone_results, alone_status, alone_json],
                    api_name="alone")
    compare_run.click(compare, [ref, cap, steps, top_k, backbone, trained],
                      [phi_results, oti_results, compare_table, compare_status, compare_json], api_name="compare")
    gr.on([alpha.change, second.change], blend, [ref, second, alpha, cap, method, steps, top_k, backbone, trained],
          [blend_results, blend_status, blend_json], api_name="blend", trigger_mode="always_last",
          show_progress="minimal")
    second_examples.click(lambda i: examples[i][0], [second_examples], [second], api_name=False)
    ref.change(lambda path: path, [ref], [first], api_name=False, show_progress="hidden")
    gr.on([words_run.click, chosen.submit], words, [ref, cap, method, steps, top_k, chosen, backbone, trained],
          [words_plot, words_table, words_status, words_json], api_name="words")
    export_run.click(download, [ref, method, steps, backbone], [exported, export_json], api_name="download_token")
    token_run.click(search_token, [upload, cap, top_k, backbone], [token_results, token_status, token_json],
                    api_name="search_token")
