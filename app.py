"""isearle demo: zero-shot composed image retrieval in the browser (Gradio 6).

Thin by design: widgets wired to `isearle.demo.DemoEngine`, which does all the work. Run
`python app.py` (offline: the bundled shapes world) or see `python app.py --help` and the README
for the settings (flags or ISEARLE_* environment variables) and for deploying it as a Space.
"""

# OpenMP keeps its default wait policy (threads spin briefly between parallel regions, then sleep):
# on an idle 2-core machine it made the ViT-B/32 text pass 1.5x faster than OMP_WAIT_POLICY=PASSIVE
# (README: Threads). On a machine shared with other busy work, set OMP_WAIT_POLICY=PASSIVE.

try:  # Hugging Face ZeroGPU: `spaces` must be imported before torch
    import spaces
except ImportError:
    spaces = None

import argparse
import contextlib
import functools
import inspect
import logging
import sys
import time

import gradio as gr

from app_inspector import add_inspector
from isearle import demo as D
from isearle.demo import IsearleError, set_threads
from isearle.demo.inspector import InspectorViews

log = logging.getLogger("isearle.app")
EXPECTED = (IsearleError,)  # every one-line user error (isearle.errors)
CSS = ".isearle-results .caption-label {font-variant-numeric: tabular-nums}"


def gpu(duration: int):
    """spaces.GPU on ZeroGPU, nothing elsewhere."""
    return spaces.GPU(duration=duration) if spaces is not None else (lambda fn: fn)


@contextlib.contextmanager
def one_line_errors():
    """Expected failures become one-line gr.Error messages; anything else a generic one (logged)."""
    try:
        yield
    except gr.Error:
        raise
    except EXPECTED as err:
        raise gr.Error(str(err), print_exception=False) from None
    except Exception as err:
        log.exception("request failed")
        raise gr.Error(f"internal error ({type(err).__name__}): please try again or use another input",
                       print_exception=False) from None


def guarded(fn):
    """`fn` (a function or a generator of streamed updates) with `one_line_errors`."""
    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def stream(*args, **kwargs):
            with one_line_errors():
                yield from fn(*args, **kwargs)

        return stream

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with one_line_errors():
            return fn(*args, **kwargs)

    return wrapper


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


def build(engine: D.DemoEngine, args: argparse.Namespace) -> gr.Blocks:
    """The Blocks layout and its events."""
    default = engine.load()
    has_phi = default.service.phi is not None
    methods = [(D.METHOD_LABELS["phi"], "phi"), (D.METHOD_LABELS["oti"], "oti")] if has_phi else \
        [(D.METHOD_LABELS["oti"], "oti")]
    choices = [(engine.label(key), key) for key in engine.entries]
    examples = engine.example_paths()  # (image, caption, label): benchmark references, else gallery items

    def gallery(items):
        return [(it.image, it.caption) for it in items]

    @gpu(60)
    @guarded
    def search(reference, caption, k, method, steps, backbone, progress=gr.Progress(track_tqdm=True)):  # noqa: B008 (Gradio idiom)
        result = engine.search(backbone, reference, caption, k, method, steps, progress=method == "oti")
        for note in result.notes:
            gr.Warning(note)
        return gallery(result.items), result.summary(), result.as_json(), [it.id for it in result.items]

    @gpu(30)
    @guarded
    def explain(reference, caption, method, steps, backbone, trained_only):
        ex = engine.explain(backbone, reference, caption, method, steps, k=6, trained_only=trained_only)
        return (ex.tokens_chart, ex.concepts_chart, gallery(ex.image_only), gallery(ex.text_only), ex.summary,
                [it.id for it in ex.image_only], [it.id for it in ex.text_only])

    def refresh_panel(reference, caption, method, steps, backbone, trained_only):
        if not reference or not D.clean_caption(caption):
            return [gr.skip()] * 7
        return explain(reference, caption, method, steps, backbone, trained_only)

    @guarded
    def use_as_reference(backbone, ids, evt: gr.SelectData):
        if not ids or evt.index is None or evt.index >= len(ids):
            raise gr.Error("that result is no longer shown: search again")
        path, _ = engine.reference_image(backbone, ids[evt.index])
        gr.Info(f"gallery item {ids[evt.index]} is the new reference: type a caption and search")
        return path

    def pick_example(index):
        path, text, _ = examples[index]
        return path, text

    @guarded
    def choose_backbone(backbone, progress=gr.Progress()):  # noqa: B008 (Gradio idiom)
        if not engine.is_loaded(backbone):
            progress(0.1, desc="loading the backbone and its gallery")
        loaded = engine.load(backbone)
        phi = loaded.service.phi is not None
        opts = [(D.METHOD_LABELS["phi"], "phi"), (D.METHOD_LABELS["oti"], "oti")] if phi else \
            [(D.METHOD_LABELS["oti"], "oti")]
        return (gr.Radio(choices=opts, value="phi" if phi else "oti"),
                gr.Checkbox(visible=loaded.trained is not None),
                f"Backbone: **{engine.label(backbone)}** · phi: {loaded.service.phi_name or 'none (use OTI)'}")

    with gr.Blocks(title="isearle: composed image retrieval") as demo:
        gr.Markdown(
            "# isearle — zero-shot composed image retrieval\n"
            "Give a **reference image** and a **relative caption**. The image is inverted into a pseudo-word "
            "**S\\*** (by the network *phi*, or by optimisation *OTI*), and “a photo of S\\* that ⟨caption⟩” "
            "is searched with CLIP's text encoder (iSEARLE / SEARLE). Click any result to use it as the "
            "next reference and chain edits.")
        ids_results, ids_image, ids_text = gr.State([]), gr.State([]), gr.State([])
        example_set = gr.Dataset(components=["image"], samples=[[path] for path, _, _ in examples], type="index",
                                 layout="gallery", samples_per_page=12, visible=bool(examples), elem_id="examples",
                                 label="Examples · click a reference: its caption comes with it "
                                       "(ShapesCIR val: ground truths get ✓)")
        with gr.Row():
            with gr.Column(scale=2, min_width=300):
                reference = pass_file_through(gr.Image(
                    label="Reference image", type="filepath", format="png", height=260,
                    sources=["upload", "clipboard"], elem_id="reference"))
                caption = gr.Textbox(label="Relative caption", placeholder="e.g. is blue instead", lines=1,
                                     max_length=D.MAX_CAPTION_CHARS, elem_id="caption")
                run = gr.Button("Search", variant="primary", elem_id="search")
                gr.Examples([[c] for c in engine.captions()], inputs=[caption], label="Example captions")
                with gr.Accordion("Settings", open=True):
                    backbone = gr.Dropdown(choices=choices, value=engine.default_key, label="Backbone",
                                           interactive=len(choices) > 1)
                    method = gr.Radio(methods, value="phi" if has_phi else "oti", label="Method")
                    steps = gr.Slider(10, 600, value=args.oti_steps, step=10, label="OTI steps", elem_id="oti-steps")
                    top_k = gr.Slider(1, 50, value=10, step=1, label="Top K")
            with gr.Column(scale=5):
                status = gr.Markdown(" · ".join([*engine.notices, "Pick an example above or upload a reference image."]),
                                     label="status", elem_id="status")
                results = gr.Gallery(label="Results · click one to use it as the reference", columns=5,
                                     height="auto", allow_preview=False, object_fit="contain",
                                     elem_id="results", elem_classes=["isearle-results"])
                with gr.Accordion("Raw results (JSON)", open=False):
                    raw = gr.JSON(label="hits")
        gr.Markdown("## Inside the query: the pseudo-word S\\*")
        with gr.Row():
            tokens_chart = gr.Image(label="Nearest vocabulary tokens of S*", show_label=False, type="pil",
                                    format="png", interactive=False, elem_id="tokens-chart")
            concepts_chart = gr.Image(label="Nearest concepts", show_label=False, type="pil", format="png",
                                      interactive=False, elem_id="concepts-chart")
        with gr.Row():
            trained_only = gr.Checkbox(value=True, label="only tokens the model was trained on",
                                       info="a small model's untouched embedding rows crowd the list otherwise",
                                       visible=default.trained is not None)
            panel = gr.Markdown(label="summary", elem_id="panel")
        gr.Markdown("### Why composition matters: one modality alone")
        with gr.Row():
            image_only = gr.Gallery(label="Image only (the reference's nearest images)", columns=3, height="auto", object_fit="contain",
                                    allow_preview=False, elem_id="image-only")
            text_only = gr.Gallery(label="Text only (the caption alone)", columns=3, height="auto", object_fit="contain",
                                   allow_preview=False, elem_id="text-only")

        add_inspector(InspectorViews(engine), {"reference": reference, "caption": caption, "method": method,
                                               "steps": steps, "top_k": top_k, "backbone": backbone,
                                               "trained_only": trained_only}, examples, guarded, gallery, gpu)

        query_inputs = [reference, caption, top_k, method, steps, backbone]
        panel_inputs = [reference, caption, method, steps, backbone, trained_only]
        panel_outputs = [tokens_chart, concepts_chart, image_only, text_only, panel, ids_image, ids_text]
        gr.on([run.click, caption.submit], search, query_inputs, [results, status, raw, ids_results],
              api_name="search").success(explain, panel_inputs, panel_outputs, api_name="explain")
        trained_only.change(refresh_panel, panel_inputs, panel_outputs, api_name=False)
        for shown, ids in ((results, ids_results), (image_only, ids_image), (text_only, ids_text)):
            shown.select(use_as_reference, [backbone, ids], [reference], api_name=False)
        example_set.click(pick_example, [example_set], [reference, caption], api_name=False)
        backbone.change(choose_backbone, [backbone], [method, trained_only, status], api_name=False)

        @gr.api(api_name="info")
        def info(backbone: str | None = None) -> dict:
            """Backbone choices, and the methods and gallery of one (default: the first)."""
            return guarded(engine.info)(backbone)
    return demo


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="isearle demo (Gradio). Every flag also reads its ISEARLE_* variable.")
    D.add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("isearle").setLevel(logging.INFO)  # the library's progress notes (gallery builds)
    threads = set_threads()
    start = time.perf_counter()
    try:
        engine = D.DemoEngine.start(args, warm=not args.no_warmup)
    except IsearleError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    log.info("loaded and warmed up %s in %.1f s (torch threads %d)", engine.default_key,
             time.perf_counter() - start, threads)
    demo = build(engine, args)
    demo.queue(max_size=args.queue_size, default_concurrency_limit=args.concurrency)
    demo.launch(server_name=args.host, server_port=args.port, allowed_paths=engine.served_paths(),
                max_file_size=args.max_file_size, theme=gr.themes.Soft(), css=CSS, show_error=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
