"""The demo in a real browser: Debian's chromium driven by Playwright (no browser download).

Loads the page, picks an example reference, types a caption, searches, waits for the results and
the pseudo-word panel, and saves a full-page screenshot (to ISEARLE_SCREENSHOT when set, e.g.
assets/screenshot.png, else into the test's temporary folder).
"""

import os
import shutil
from pathlib import Path

import pytest

from isearle import demo as D

CHROMIUM = os.environ.get("ISEARLE_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
        "--disable-component-update", "--no-first-run", "--disable-sync"]

EXAMPLE = 2  # which example reference the test picks (the README screenshot shows it)

pytestmark = pytest.mark.browser

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed: pip install playwright")
if not Path(CHROMIUM).is_file():
    pytest.skip(f"no chromium at {CHROMIUM}: apt-get install -y chromium", allow_module_level=True)


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    from test_app import app_arguments, app_environment

    tmp = tmp_path_factory.mktemp("browser-app")
    with D.AppProcess(app_arguments(tmp), app_environment(tmp), log=tmp / "app.log") as proc:
        yield proc


def test_pick_example_type_caption_see_results_and_panel(app, tmp_path):
    shot = Path(os.environ.get("ISEARLE_SCREENSHOT") or tmp_path / "screenshot.png")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(app.url, wait_until="domcontentloaded")
            page.locator("#search").wait_for(timeout=60_000)
            examples = page.locator("#examples button.gallery-item")
            assert examples.count() >= 8
            examples.nth(EXAMPLE).click()
            page.locator("#reference img").first.wait_for(timeout=20_000)
            caption = page.get_by_label("Relative caption")
            text = caption.input_value()
            assert text  # the example's caption came with it; type it again, as a user would
            caption.fill("")
            caption.press_sequentially(text)
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
        finally:
            browser.close()
    assert shot.stat().st_size > 20_000
    assert app.alive()
