"""The demo in a real browser: Debian's chromium driven by Playwright (no browser download).

Loads the page, picks an example reference, types a caption, searches, waits for the results and
the pseudo-word panel, and saves a full-page screenshot (to ISEARLE_SCREENSHOT when set, e.g.
assets/screenshot.png, else into the test's temporary folder). Then the inspector: OTI watched
step by step, S* alone, the blend of two references (screenshots of each to ISEARLE_SCREENSHOT_DIR
when set, e.g. docs/img/); and the static report of `isearle inspect`, opened from file://.
"""

import contextlib
import os
import shutil
from pathlib import Path

import pytest

from isearle import demo as D
from isearle.testing import AppProcess

CHROMIUM = os.environ.get("ISEARLE_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
        "--disable-component-update", "--no-first-run", "--disable-sync"]

EXAMPLE = 4  # which example reference the test picks (the README screenshot shows it: 3 of 5 answers found)

pytestmark = pytest.mark.browser

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed: pip install playwright")
if not Path(CHROMIUM).is_file():
    pytest.skip(f"no chromium at {CHROMIUM}: apt-get install -y chromium", allow_module_level=True)


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    from test_app import app_arguments, app_environment

    tmp = tmp_path_factory.mktemp("browser-app")
    with AppProcess(app_arguments(tmp), app_environment(tmp), log=tmp / "app.log") as proc:
        yield proc


@contextlib.contextmanager
def demo_page(app):
    """A chromium page on the demo, loaded (the search button is there)."""
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(app.url, wait_until="domcontentloaded")
            page.locator("#search").wait_for(timeout=60_000)
            yield page
        finally:
            browser.close()


def test_pick_example_type_caption_see_results_and_panel(app, tmp_path):
    shot = Path(os.environ.get("ISEARLE_SCREENSHOT") or tmp_path / "screenshot.png")
    with demo_page(app) as page:
        examples = page.locator("#examples button.gallery-item")
        assert examples.count() >= 8
        examples.nth(EXAMPLE).click()
        page.locator("#reference img").first.wait_for(timeout=20_000)
        caption = page.locator("#caption textarea")
        text = caption.input_value()
        assert text  # the example's caption came with it; type it again, as a user would
        caption.fill("")
        caption.press_sequentially(text)
        joins: list[dict] = []  # the requests the page queues: the Search is one, its panel comes on it
        page.on("request", lambda r: joins.append(r.post_data_json or {}) if r.method == "POST"
                and "/queue/join" in r.url else None)
        page.locator("#search").click()
        results = page.locator("#results .thumbnail-item")
        results.nth(9).wait_for(timeout=60_000)
        assert results.count() == 10
        assert "#1 · " in results.first.inner_text()
        page.locator("#tokens-chart img").wait_for(timeout=60_000)
        page.locator("#concepts-chart img").wait_for(timeout=60_000)
        page.locator("#text-only .thumbnail-item").first.wait_for(timeout=60_000)
        status = page.locator("#status").inner_text()
        assert "10 results" in status and text in status
        assert "S* reads as" in page.locator("#panel").inner_text()
        config = page.evaluate("window.gradio_config")
        button = next(c["id"] for c in config["components"] if c.get("props", {}).get("elem_id") == "search")
        explain = next(d["id"] for d in config["dependencies"] if d.get("api_name") == "explain")
        assert [j["trigger_id"] for j in joins].count(button) == 1  # one request brought results and panel
        assert explain not in [j["fn_index"] for j in joins]
        page.wait_for_timeout(300)  # let images finish painting
        shot.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(shot), full_page=True)
        # chain an edit: the first result becomes the reference, and is left out of the next ranking
        page.locator("#results .thumbnail-item").first.click()
        caption.fill("is a star instead")
        page.wait_for_timeout(500)  # the reference image is swapped in
        page.locator("#search").click()
        page.locator("#status", has_text="is a star instead").wait_for(timeout=60_000)
        assert "Reference: gallery item" in page.locator("#status").inner_text()
    assert shot.stat().st_size > 20_000
    assert app.alive()


def shots_dir(tmp_path: Path) -> Path:
    d = Path(os.environ.get("ISEARLE_SCREENSHOT_DIR") or tmp_path)
    d.mkdir(parents=True, exist_ok=True)
    return d


def test_inspector_watch_alone_and_blend(app, tmp_path):
    shots = shots_dir(tmp_path)
    with demo_page(app) as page:
        page.locator("#examples button.gallery-item").nth(EXAMPLE).click()
        page.locator("#reference img").first.wait_for(timeout=20_000)
        steps = page.locator("#oti-steps input[type=number]")
        steps.fill("60")
        steps.press("Enter")
        inspector = page.locator("#inspector")
        # 1. watch OTI: the status and the plots follow the steps to the last one
        page.locator("#watch-run").click()
        page.locator("#watch-status", has_text="step 60 / 60").wait_for(timeout=120_000)
        assert page.locator("#watch-results .thumbnail-item").count() == 5
        lines = page.locator("#watch-loss .mark-line path")  # vega draws SVG: one path per curve
        assert lines.count() == 2
        assert all(len(lines.nth(i).get_attribute("d") or "") > 200 for i in range(2))  # 60 points each
        # in their colours (a streamed native plot once drew its lines without a stroke: invisible)
        assert {lines.nth(i).get_attribute("stroke") for i in range(2)} == {"#4f46e5", "#f59e0b"}
        assert "reads as" in page.locator("#watch-status").inner_text()
        page.wait_for_timeout(500)  # let the plots finish drawing
        inspector.screenshot(path=str(shots / "inspector-watch.png"))
        # 2. S* alone: "a photo of S*" without the caption, ground truths marked
        page.locator("#tab-alone-button").click()
        page.locator("#alone-run").click()
        page.locator("#alone-results .thumbnail-item").nth(9).wait_for(timeout=60_000)
        assert "“a photo of S*”, no caption" in page.locator("#alone-status").inner_text()
        page.wait_for_timeout(300)
        inspector.screenshot(path=str(shots / "inspector-alone.png"))
        # 4. blend: pick B among the examples, then move the slider; the results follow
        page.locator("#tab-blend-button").click()
        page.locator("#blend-examples button.gallery-item").nth(EXAMPLE + 3).click()
        page.locator("#blend-status", has_text="0.50 · B").wait_for(timeout=60_000)
        first = page.locator("#blend-results .thumbnail-item").first.inner_text()
        alpha = page.locator("#blend-alpha input[type=number]")
        alpha.fill("0.9")
        alpha.press("Enter")
        page.locator("#blend-status", has_text="0.90 · B").wait_for(timeout=60_000)
        assert page.locator("#blend-results .thumbnail-item").count() == 10
        assert first  # a ranked result was shown before the slider moved
        page.wait_for_timeout(300)
        inspector.screenshot(path=str(shots / "inspector-blend.png"))
    for name in ("watch", "alone", "blend"):
        assert (shots / f"inspector-{name}.png").stat().st_size > 10_000
    assert app.alive()


def test_inspect_report_opens_from_file(tmp_path):
    """`isearle inspect`'s report is a static page: chromium opens it from file://, no server."""
    from isearle.cli import main

    images = tmp_path / "images"
    images.mkdir()
    for ex in D.load_examples().references[:3]:
        D.render_spec(ex.spec, 64).save(images / f"{ex.reference_id}.png")
    from test_app import REAL_WORLD

    model = ["--model", "isearle-shapes", "--pretrained", "isearle-shapes"] if REAL_WORLD else \
        ["--model", "isearle-tiny-test", "--pretrained", "none"]
    method = ["phi", "oti"] if REAL_WORLD else ["oti"]
    out = tmp_path / "report"
    assert main(["inspect", "--images", str(images), *model, "--method", *method, "--steps", "5",
                 "--out", str(out)]) == 0
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.goto((out / "index.html").as_uri())
            assert page.locator("tr.image-row").count() == 3
            assert page.locator("#plots svg").count() == (2 if REAL_WORLD else 1)
            assert page.locator("#plots svg").first.is_visible()
            thumbs = page.locator("img.thumb")
            assert thumbs.count() == 3 and thumbs.first.evaluate("img => img.naturalWidth") > 0
            assert "‖S*‖ mean" in page.locator("#summary").inner_text()
            assert page.locator("#settings dt").count() >= 4  # a readable header, not a JSON dump
            assert page.locator("td.retrieved img").count() == 3 * len(method) * 2  # what each S* retrieves
        finally:
            browser.close()
