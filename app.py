"""isearle demo: zero-shot composed image retrieval in the browser (Gradio 6).

Thin by design: widgets wired to `isearle.demo.DemoEngine`, which does all the work. Run
`python app.py` (offline: the bundled shapes world) or see `python app.py --help` and the README
for the settings (flags or ISEARLE_* environment variables) and for deploying it as a Space.
"""

# OpenMP keeps its default wait policy (threads spin briefly between parallel regions, then sleep):
# on idle cores each small parallel region starts faster than under OMP_WAIT_POLICY=PASSIVE
# (bench/bench_openmp.py measures it; docs/performance.md, Threads). On a machine shared with other
# busy work, set OMP_WAIT_POLICY=PASSIVE.

try:  # Hugging Face ZeroGPU: `spaces` must be imported before torch
    import spaces
except ImportError:
    spaces = None

import argparse
import collections
import contextlib
import functools
import inspect
import logging
import sys
import threading
import time
from pathlib import Path

import gradio as gr

from app_inspector import add_inspector, heading, pass_file_through, result_gallery
from isearle import demo as D
from isearle.demo import IsearleError, set_threads
from isearle.demo.inspector import InspectorViews

log = logging.getLogger("isearle.app")
EXPECTED = (IsearleError,)  # every one-line user error (isearle.errors)
CSS_PATH = D.ASSETS_DIR / "app.css"  # nothing covers a thumbnail; presentation mode
#: presentation mode on the body (CSS `body.isearle-present`), from the toggle or the page's URL
PRESENT_JS = "(on) => { document.body.classList.toggle('isearle-present', !!on); }"
PRESENT_FROM_URL_JS = ("() => { if (/[?&]present=(1|true|yes|on)\\b/.test(location.search)) "
                       "document.body.classList.add('isearle-present'); }")


#: the panel while the results follow the typing: S* and the picture-only row do not depend on the
#: caption; the words-only row does, and is brought up to date by Enter or Search
STALE_PANEL = ("*The made-up word S\\* and the picture-only row are the reference's; the words-only row is for "
               "the last searched caption: press Enter or Search to update it.*")


def gpu(duration: int):
    """spaces.GPU on ZeroGPU, nothing elsewhere."""
    return spaces.GPU(duration=duration) if spaces is not None else (lambda fn: fn)


class LastErrors:
    """The last one-line error of each open page (keyed by Gradio's hash of it): the page's message line
    shows it after a failed request (a toast fades; in presentation mode toasts are hidden)."""

    def __init__(self, size: int = 1024) -> None:
        self.size, self._by_page = size, collections.OrderedDict()
        self._lock = threading.Lock()

    def put(self, request: gr.Request | None, message: str) -> None:
        key = getattr(request, "session_hash", None)
        if key:
            with self._lock:
                self._by_page[key] = message
                while len(self._by_page) > self.size:
                    self._by_page.popitem(last=False)

    def pop(self, request: gr.Request | None) -> str:
        with self._lock:
            return self._by_page.pop(getattr(request, "session_hash", None), "") or "the request failed"


ERRORS = LastErrors()


def one_line_message(err: BaseException) -> str:
    """What the visitor reads of a failure: an expected error's own line, else a generic one (logged)."""
    if isinstance(err, gr.Error):
        return str(err.message)
    if isinstance(err, EXPECTED):
        return str(err)
    log.error("request failed", exc_info=err)
    return f"internal error ({type(err).__name__}): please try again or use another input"


@contextlib.contextmanager
def one_line_errors(request: gr.Request | None = None):
    """Expected failures become one-line gr.Error messages; anything else a generic one (logged).
    The message is also kept for the page's message line (`LastErrors`)."""
    try:
        yield
    except gr.Error as err:
        ERRORS.put(request, one_line_message(err))
        raise
    except Exception as err:
        message = one_line_message(err)
        ERRORS.put(request, message)
        raise gr.Error(message, print_exception=False) from None


def _request(args: tuple, kwargs: dict) -> gr.Request | None:
    return next((a for a in (*args, *kwargs.values()) if isinstance(a, gr.Request)), None)


def guarded(fn):
    """`fn` (a function or a generator of streamed updates) with `one_line_errors`."""
    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def stream(*args, **kwargs):
            with one_line_errors(_request(args, kwargs)):
                yield from fn(*args, **kwargs)

        return stream

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with one_line_errors(_request(args, kwargs)):
            return fn(*args, **kwargs)

    return wrapper


def build(engine: D.DemoEngine, args: argparse.Namespace) -> gr.Blocks:
    """The Blocks layout and its events."""
    default = engine.load()
    info = engine.info()
    has_phi = default.phi is not None
    methods = [(D.METHOD_LABELS["phi"], "phi"), (D.METHOD_LABELS["oti"], "oti")] if has_phi else \
        [(D.METHOD_LABELS["oti"], "oti")]
    choices = [(engine.label(key), key) for key in engine.entries]
    examples = engine.example_paths()  # (image, caption, label): benchmark references, else gallery items
    start_line = " · ".join([*engine.notices, "Pick an example above, or upload a picture, then write a change."])

    def gallery(items):
        return [(it.image, it.caption) for it in items]

    def run_search(reference, caption, k, method, steps, backbone, present):
        result = engine.search(backbone, reference, caption, k, method, steps, progress=method == "oti")
        shared = D.SharedQuery(result.reference_id, D.clean_caption(caption), method, int(k), int(steps), backbone,
                               bool(present))
        link = (f"[Link to this query]({D.share_link(shared)}) · reopens this reference, caption and settings"
                if result.reference_id else "An uploaded picture cannot travel in a link: pick an example or a "
                "result to share a query.")
        truth = result.truth_gallery()
        truth_title = ("**The benchmark's answers** (ground truth) and where the search ranks them"
                       if result.gt_ids else "")
        return (gallery(result.items), result.summary(), result.as_json(), gr.Gallery(truth, visible=bool(truth)),
                truth_title, result.truth_json(), link, [it.id for it in result.items],
                [reference, method, int(steps), backbone], shared.__dict__), result.notes

    @gpu(60)
    @guarded
    def search(reference, caption, k, method, steps, backbone, present=False, request: gr.Request = None,
               progress=gr.Progress(track_tqdm=True)):  # noqa: B008 (Gradio idiom)
        out, notes = run_search(reference, caption, k, method, steps, backbone, present)
        for note in notes:  # also in the status line, which stays
            gr.Warning(note)
        return out

    def live_search(reference, caption, k, method, steps, backbone, present, searched, panel_text):
        """While typing: the results follow the caption when the reference (and its S*) is cached; the
        panel is marked as the last searched caption's only when the results did change (a skipped
        keystroke leaves the panel alone, so it cannot overwrite an explanation that is on its way)."""
        skipped = [gr.skip()] * (len(query_outputs) + 1)  # + the panel
        if not reference or searched != [reference, method, int(steps), backbone] or not D.clean_caption(caption):
            return skipped
        try:
            return [*run_search(reference, caption, k, method, steps, backbone, present)[0], mark_stale(panel_text)]
        except IsearleError:
            return skipped  # a half-typed caption: the Search button gives the message

    def run_explain(reference, caption, method, steps, backbone, trained_only):
        ex = engine.explain(backbone, reference, caption, method, steps, k=6, trained_only=trained_only)
        return (gr.Image(ex.tokens_chart, visible=True), gr.Image(ex.concepts_chart, visible=ex.concepts_chart is not None),
                gallery(ex.image_only), gallery(ex.text_only), ex.summary,
                [it.id for it in ex.image_only], [it.id for it in ex.text_only])

    @gpu(30)
    @guarded
    def explain(reference, caption, method, steps, backbone, trained_only, request: gr.Request = None):
        return run_explain(reference, caption, method, steps, backbone, trained_only)

    @gpu(90)
    @guarded
    def search_and_explain(reference, caption, k, method, steps, backbone, present, trained_only,
                           request: gr.Request = None, progress=gr.Progress(track_tqdm=True)):  # noqa: B008
        """The page's Search: the results, then the panel, streamed on one request (a second request
        would add a Gradio round trip before the panel paints). A failed panel leaves the results."""
        out, notes = run_search(reference, caption, k, method, steps, backbone, present)
        for note in notes:  # also in the status line, which stays
            gr.Warning(note)
        yield (*out, *[gr.skip()] * len(panel_outputs))
        time.sleep(max(0, args.panel_delay_ms) / 1000)  # the page fetches the thumbnails from this process
        try:
            panel = run_explain(reference, caption, method, steps, backbone, trained_only)
        except Exception as err:
            panel = panel_failed(one_line_message(err))
        yield (*[gr.skip()] * len(out), *panel)

    def mark_stale(text):
        text = (text or "").split(STALE_PANEL)[-1].strip()
        return f"{STALE_PANEL}  \n{text}"

    def refresh_panel(reference, caption, method, steps, backbone, trained_only):
        if not reference or not D.clean_caption(caption):
            return [gr.skip()] * len(panel_outputs)
        return explain(reference, caption, method, steps, backbone, trained_only)

    def search_failed(request: gr.Request):
        """After a failed search nothing of the previous query stays on screen."""
        message = ERRORS.pop(request)
        return (f"**Error:** {message}  \nNothing is shown below until a search succeeds.", [], None,
                gr.Gallery([], visible=False), "", None, "", [], None, {},
                gr.Image(None, visible=False), gr.Image(None, visible=False), [], [], "", [], [])

    def panel_failed(message):
        return (gr.Image(None, visible=False), gr.Image(None, visible=False), [], [],
                f"**The explanation failed:** {message}", [], [])

    def explain_failed(request: gr.Request):
        return panel_failed(ERRORS.pop(request))

    @guarded
    def use_as_reference(backbone, ids, evt: gr.SelectData):
        if not ids or evt.index is None or evt.index >= len(ids):
            raise gr.Error("that result is no longer shown: search again")
        path, _ = engine.reference_image(backbone, ids[evt.index])
        return path, f"Gallery item `{ids[evt.index]}` is the new reference: write a change and search."

    def pick_example(index):
        path, text, _ = examples[index]
        return path, text

    @guarded
    def choose_backbone(backbone, progress=gr.Progress()):  # noqa: B008 (Gradio idiom)
        if not engine.is_loaded(backbone):
            progress(0.1, desc="loading the backbone and its gallery")
        session = engine.load(backbone)
        phi = session.phi is not None
        opts = [(D.METHOD_LABELS["phi"], "phi"), (D.METHOD_LABELS["oti"], "oti")] if phi else \
            [(D.METHOD_LABELS["oti"], "oti")]
        return (gr.Radio(choices=opts, value="phi" if phi else "oti"), gr.Checkbox(visible=session.trained is not None),
                backbone_line(backbone))

    def backbone_line(key):
        session = engine.load(key) if engine.is_loaded(key) else None
        phi = getattr(session, "phi_name", None)
        return f"**Model:** {engine.label(key)}" + (f" · phi: {Path(str(phi)).stem}" if phi else "")

    @guarded
    def restore(request: gr.Request):
        """A shared link's query, restored: reference (a gallery item), caption, method and settings."""
        q = D.read_query(dict(request.query_params) if request is not None else {})
        key = q.backbone if q.backbone in engine.entries else engine.default_key
        path = engine.reference_image(key, q.ref)[0] if q.ref else gr.skip()
        return (path, q.caption or gr.skip(), q.method or gr.skip(), q.k or gr.skip(), q.steps or gr.skip(),
                key if q.backbone in engine.entries else gr.skip(), q.present or gr.skip(), bool(q.ref and q.caption))

    def search_if_linked(linked, reference, caption, k, method, steps, backbone, present):
        if not linked:
            return [gr.skip()] * len(query_outputs)
        return search(reference, caption, k, method, steps, backbone, present)

    def reshare(shared, present):
        if not shared or not shared.get("ref"):
            return gr.skip()
        q = D.SharedQuery(**{**shared, "present": bool(present)})
        return f"[Link to this query]({D.share_link(q)}) · reopens this reference, caption and settings"

    with gr.Blocks(title="isearle: find pictures from an example and a change in words") as demo:
        with gr.Row(equal_height=False):
            with gr.Column(scale=6):
                gr.Markdown(D.intro(info["gallery_size"], info["benchmark"], info["label"]), elem_id="intro")
            with gr.Column(scale=1, min_width=200):
                present = gr.Checkbox(False, label="Presentation mode", elem_id="present",
                                      info="large pictures, messages stay on screen")
        with gr.Accordion("How it works", open=False, elem_id="how"):
            gr.Markdown(D.GLOSSARY)
        ids_results, ids_image, ids_text = gr.State([]), gr.State([]), gr.State([])
        searched, shared, linked = gr.State(None), gr.State({}), gr.State(False)
        heading("**Examples** · click a reference picture: its change comes with it", visible=bool(examples))
        example_set = gr.Dataset(components=["image"], samples=[[path] for path, _, _ in examples], type="index",
                                 layout="gallery", samples_per_page=12, visible=bool(examples), elem_id="examples",
                                 show_label=False)
        with gr.Row():
            with gr.Column(scale=2, min_width=300):
                heading("**Reference picture**")
                reference = pass_file_through(gr.Image(
                    label="Reference picture", show_label=False, type="filepath", format="png", height=260,
                    sources=["upload", "clipboard"], elem_id="reference"))
                caption = gr.Textbox(label="The change, in words", placeholder="e.g. is blue instead", lines=1,
                                     max_length=D.MAX_CAPTION_CHARS, elem_id="caption",
                                     info="results follow as you type, once a picture was searched")
                run = gr.Button("Search", variant="primary", elem_id="search")
                with gr.Column(elem_classes=["isearle-detail"]):
                    gr.Examples([[c] for c in engine.captions()], inputs=[caption], label="Example changes")
                with gr.Accordion("Settings", open=True, elem_id="settings"):
                    backbone_md = gr.Markdown(backbone_line(engine.default_key), elem_id="backbone-label")
                    backbone = gr.Dropdown(choices=choices, value=engine.default_key, label="Model and gallery",
                                           interactive=len(choices) > 1, visible=len(choices) > 1)
                    method = gr.Radio(methods, value="phi" if has_phi else "oti", label="How S* is made")
                    steps = gr.Slider(*D.STEPS_RANGE, value=args.oti_steps, step=10, label="OTI steps",
                                      elem_id="oti-steps")
                    top_k = gr.Slider(*D.TOP_K_RANGE, value=10, step=1, label="How many results", elem_id="top-k")
            with gr.Column(scale=5):
                status = gr.Markdown(start_line, elem_id="status")
                share = gr.Markdown("", elem_id="share")
                heading("**Results**, best first · click one to use it as the next reference")
                results = result_gallery("results")
                truth_title = heading("", elem_id="truth-title")
                truth = result_gallery("truth", visible=False)
                with gr.Accordion("Raw results (JSON)", open=False, elem_classes=["isearle-detail"]):
                    raw = gr.JSON(label="hits")
                    raw_truth = gr.JSON(label="ground truth ranks")
        gr.Markdown("## Inside the query: the made-up word S\\*")
        with gr.Row():
            tokens_chart = gr.Image(show_label=False, type="pil", format="png", interactive=False, visible=False,
                                    buttons=[], elem_id="tokens-chart")
            concepts_chart = gr.Image(show_label=False, type="pil", format="png", interactive=False, visible=False,
                                      buttons=[], elem_id="concepts-chart")
        with gr.Row():
            trained_only = gr.Checkbox(value=True, label="only words the model was trained on",
                                       info="a small model's unused vocabulary crowds the list otherwise",
                                       visible=default.trained is not None)
            panel = gr.Markdown("The charts appear after a search.", elem_id="panel")
        gr.Markdown("### Why both the picture and the words matter")
        with gr.Row():
            with gr.Column():
                heading("**Picture only**: the reference's nearest pictures")
                image_only = result_gallery("image-only", columns=3)
            with gr.Column():
                heading("**Words only**: the change alone")
                text_only = result_gallery("text-only", columns=3)

        with gr.Column(elem_classes=["isearle-detail"]):
            add_inspector(InspectorViews(engine), {"reference": reference, "caption": caption, "method": method,
                                                   "steps": steps, "top_k": top_k, "backbone": backbone,
                                                   "trained_only": trained_only}, examples, guarded, gallery, gpu)

        query_inputs = [reference, caption, top_k, method, steps, backbone, present]
        query_outputs = [results, status, raw, truth, truth_title, raw_truth, share, ids_results, searched, shared]
        panel_inputs = [reference, caption, method, steps, backbone, trained_only]
        panel_outputs = [tokens_chart, concepts_chart, image_only, text_only, panel, ids_image, ids_text]
        cleared = [status, results, raw, truth, truth_title, raw_truth, share, ids_results, searched, shared,
                   *panel_outputs]
        query = gr.on([run.click, caption.submit], search_and_explain, [*query_inputs, trained_only],
                      [*query_outputs, *panel_outputs], api_name=False)
        query.failure(search_failed, None, cleared, api_name=False)
        scripts = gr.Button(visible=False)  # never shown: the page's Search as two endpoints for gradio_client
        scripts.click(search, query_inputs, query_outputs, api_name="search").success(
            explain, panel_inputs, panel_outputs, api_name="explain").failure(explain_failed, None, panel_outputs,
                                                                              api_name=False)
        caption.input(live_search, [*query_inputs, searched, panel], [*query_outputs, panel], api_name=False,
                      show_progress="hidden", trigger_mode="always_last")
        trained_only.change(refresh_panel, panel_inputs, panel_outputs, api_name=False)
        for shown, ids in ((results, ids_results), (image_only, ids_image), (text_only, ids_text)):
            shown.select(use_as_reference, [backbone, ids], [reference, status], api_name=False)
        example_set.click(pick_example, [example_set], [reference, caption], api_name=False)
        backbone.change(choose_backbone, [backbone], [method, trained_only, backbone_md], api_name=False)
        present.change(None, [present], None, js=PRESENT_JS).then(reshare, [shared, present], [share], api_name=False)
        demo.load(None, None, None, js=PRESENT_FROM_URL_JS)
        demo.load(restore, None, [reference, caption, method, top_k, steps, backbone, present, linked],
                  api_name=False).success(search_if_linked, [linked, *query_inputs], query_outputs,
                                          api_name=False).success(refresh_panel, panel_inputs, panel_outputs,
                                                                  api_name=False)

        @gr.api(api_name="info")
        def info_api(backbone: str | None = None) -> dict:
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
                blocked_paths=engine.private_paths(),
                max_file_size=args.max_file_size, theme=gr.themes.Soft(), css_paths=[CSS_PATH],
                show_error=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
