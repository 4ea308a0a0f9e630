"""What a visitor does, timed: headless chromium (Playwright) on the demo page, and the same
requests through `gradio_client`.

A browser time runs from the visitor's event (the click on Search, or the last keystroke of a
caption) to the first animation frame in which the results are in the page with every thumbnail
decoded (and, for the panel, the pseudo-word summary and its chart): what the visitor sees.
The page's own clock (performance.now) measures it, so the time Playwright takes to talk to the
browser is not counted.

The page's elements are found by the selectors in `SELECTORS` only: when the app's layout
changes, update them there.
"""

from __future__ import annotations

import json
import re
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: Every element the bench touches, by elem_id (app.py). One place to update.
SELECTORS = {
    "ready": "#search",  # the page has loaded
    "search": "#search",  # the Search button
    "upload": "#reference input[type=file]",  # the reference image's file input
    "reference_img": "#reference img",  # the reference preview
    "caption": "#caption textarea",  # the relative caption
    # the status line's text (prompt, time), changed by every search; not its progress overlay
    "status": "#status [data-testid=markdown]",
    "results": "#results .thumbnail-item img",  # the ranked thumbnails
    "panel": "#panel [data-testid=markdown]",  # the pseudo-word summary's text
    "panel_chart": "#tokens-chart img",  # the nearest-tokens chart of the panel
}
#: The search handler's own time in the status line ("... · phi (fast) · 129 ms").
HANDLER_MS = re.compile(r"· (\d+(?:\.\d+)?) ms")
#: elem_ids of the components that tell whether typing searches (app config, not the page).
CAPTION_ID, RESULTS_ID = "caption", "results"

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-sync",
                 # two pages, one per app: neither may be throttled while the other is in front
                 "--disable-renderer-backgrounding", "--disable-background-timer-throttling",
                 "--disable-backgrounding-occluded-windows"]

#: Installed before each timed action: the visitor's event time, and what the page showed before.
ARM_JS = """([sel, kind]) => {
  const text = s => { const e = document.querySelector(s); return e ? e.innerText : ""; };
  const srcs = s => Array.from(document.querySelectorAll(s)).map(i => i.currentSrc || i.src).join("|");
  const b = window.__bench = {t0: null, status: text(sel.status), panel: text(sel.panel),
                              chart: srcs(sel.panel_chart)};
  if (!window.__benchListening) {
    window.__benchListening = true;
    for (const type of ["click", "keydown"]) {
      document.addEventListener(type, () => {
        const w = window.__bench;
        if (w && w.kind === type && w.t0 === null) w.t0 = performance.now();
      }, true);
    }
  }
  b.kind = kind;
}"""

#: Resolves when the results (and, when asked, the panel) are in the page with their images
#: decoded: {results, panel} milliseconds after the event, measured in animation frames.
WAIT_JS = """([sel, k, expect, wantPanel, timeoutMs]) => new Promise((resolve) => {
  const b = window.__bench;
  const text = s => { const e = document.querySelector(s); return e ? e.innerText : ""; };
  const loaded = imgs => imgs.length > 0 && imgs.every(i => i.complete && i.naturalWidth > 0);
  const out = {text: null, results: null, panel: null, timedOut: false};
  const started = performance.now();
  const frame = () => {
    const now = performance.now();
    if (b.t0 !== null) {
      const status = text(sel.status);
      const mustShow = expect && b.status.includes(expect.slice(0, -1));  // the status echoes the caption
      if (out.results === null && status !== b.status && (!mustShow || status.includes(expect))) {
        if (out.text === null) out.text = now - b.t0;  // the answer's text is in, thumbnails may still load
        const imgs = Array.from(document.querySelectorAll(sel.results));
        if (imgs.length >= k && loaded(imgs.slice(0, k))) { out.results = now - b.t0; out.status = status; }
      }
      if (wantPanel && out.panel === null && text(sel.panel) !== b.panel) {
        const imgs = Array.from(document.querySelectorAll(sel.panel_chart));
        const srcs = imgs.map(i => i.currentSrc || i.src).join("|");
        if (srcs !== b.chart && loaded(imgs)) out.panel = now - b.t0;
      }
    }
    if (out.results !== null && (!wantPanel || out.panel !== null)) return resolve(out);
    if (now - started > timeoutMs) { out.timedOut = true; return resolve(out); }
    requestAnimationFrame(frame);
  };
  requestAnimationFrame(frame);
})"""


#: What the page shows of a query (status, results, panel): unchanged while nothing arrives.
SHOWN_JS = """(sel) => [sel.status, sel.results, sel.panel, sel.panel_chart].map(
  s => Array.from(document.querySelectorAll(s)).map(e => e.currentSrc || e.src || e.innerText).join("|")).join("\\n")"""


def types_to_search(url: str) -> bool:
    """Whether the app searches as the caption is typed: an event on the caption's input/change
    that writes the results (read from the app's config, not from the page)."""
    with urllib.request.urlopen(url + "config", timeout=30) as r:
        config = json.load(r)
    ids = {c.get("props", {}).get("elem_id"): c["id"] for c in config.get("components", [])}
    caption, results = ids.get(CAPTION_ID), ids.get(RESULTS_ID)
    for dep in config.get("dependencies", []):
        targets = [tuple(t) for t in dep.get("targets", [])]
        if any(t[0] == caption and t[1] in ("input", "change") for t in targets) and results in dep.get("outputs", []):
            return True
    return False


@dataclass
class BrowserSide:
    """One app's page in the shared chromium: uploads, types and clicks as a visitor, timed."""

    page: Any
    url: str
    k: int = 10
    live: bool = False  # the app searches while the caption is typed
    timeout_ms: float = 120_000
    inflight: set = field(default_factory=set)
    open_streams: int = 0  # settles that let a stream left open count as done

    @classmethod
    def open(cls, browser: Any, url: str, k: int) -> BrowserSide:
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        side = cls(page, url, k, types_to_search(url))
        page.on("request", lambda r: side._track(r, True))
        for event in ("requestfinished", "requestfailed"):
            page.on(event, lambda r: side._track(r, False))
        page.goto(url, wait_until="domcontentloaded")
        page.locator(SELECTORS["ready"]).wait_for(timeout=120_000)
        return side

    def _track(self, request: Any, started: bool) -> None:
        # the app's requests, less file downloads and the page's standing heartbeat stream
        if "/gradio_api/" in request.url and not any(s in request.url for s in ("/file=", "/heartbeat")):
            (self.inflight.add if started else self.inflight.discard)(request)

    def settle(self, quiet_ms: float = 400, timeout_s: float = 120, stream_grace_s: float = 5) -> None:
        """Wait until no request to the app is in flight for `quiet_ms` (a search and its panel are done).

        A result stream (queue/data) left open while nothing on the page has changed for
        `stream_grace_s` counts as done: Gradio sometimes keeps a page's result stream open after its
        last event.
        """
        deadline, quiet_since = time.monotonic() + timeout_s, None
        shown, shown_since = None, time.monotonic()
        while time.monotonic() < deadline:
            self.page.wait_for_timeout(50)
            now = time.monotonic()
            seen = self.page.evaluate(SHOWN_JS, SELECTORS)
            if seen != shown:
                shown, shown_since = seen, now
            busy = [r for r in self.inflight if "/queue/data" not in r.url or now - shown_since < stream_grace_s]
            if busy:
                quiet_since = None
            elif quiet_since is None:
                quiet_since = now
            elif (now - quiet_since) * 1000 >= quiet_ms:
                self.open_streams += bool(self.inflight)
                return
        raise TimeoutError(f"{self.url}: requests still in flight after {timeout_s} s: "
                           f"{sorted(r.url for r in self.inflight)}")

    def upload(self, path: Path, caption: str) -> float:
        """Type the caption, then upload `path` and wait for its preview: ms to the preview."""
        self.page.bring_to_front()
        self.page.locator(SELECTORS["caption"]).fill(caption)
        self.settle()
        t = time.perf_counter()
        self.page.locator(SELECTORS["upload"]).set_input_files(str(path))
        self.page.wait_for_function("([s, name]) => Array.from(document.querySelectorAll(s)).some("
                                    "i => (i.currentSrc || i.src).endsWith('/' + name) && i.complete && i.naturalWidth > 0)",
                                    arg=[SELECTORS["reference_img"], path.name], timeout=self.timeout_ms)
        shown = (time.perf_counter() - t) * 1000
        self.settle()
        return shown

    def click_search(self, panel: bool = True) -> dict:
        """Click Search: ms from the click to the results painted (and to the panel painted)."""
        self.page.bring_to_front()
        self.page.evaluate(ARM_JS, [SELECTORS, "click"])
        self.page.locator(SELECTORS["search"]).click()
        return self._wait(None, panel)

    def type_caption(self, caption: str, panel: bool = False) -> dict:
        """Type `caption` into the caption box: all but its last character first (whatever that
        triggers is let finish), then the last key, timed to the results of the whole caption
        painted. An app that does not search while typing gets the Search click right after the
        key (the time still runs from the keystroke)."""
        self.page.bring_to_front()
        box = self.page.locator(SELECTORS["caption"])
        box.fill(caption[:-1])
        self.settle()
        self.page.evaluate(ARM_JS, [SELECTORS, "keydown"])
        box.press(caption[-1])
        if not self.live:
            self.page.locator(SELECTORS["search"]).click()
        return self._wait(caption, panel)

    def _wait(self, expect: str | None, panel: bool) -> dict:
        got = self.page.evaluate(WAIT_JS, [SELECTORS, self.k, expect or "", panel, self.timeout_ms])
        if got.get("timedOut"):
            raise TimeoutError(f"{self.url}: results not painted within {self.timeout_ms / 1000:.0f} s ({got})")
        self.settle()
        m = HANDLER_MS.search(got.get("status") or "")
        got["handler"] = float(m.group(1)) if m else None
        return got


class ClientSide:
    """One app through `gradio_client`: /search, then /explain as the page chains it."""

    SEARCH, EXPLAIN = "/search", "/explain"

    def __init__(self, url: str, k: int, method: str | None = None, steps: int = 150) -> None:
        from gradio_client import Client

        self.client = Client(url, verbose=False, download_files=False, analytics_enabled=False)
        api = self.client.view_api(print_info=False, return_format="dict")["named_endpoints"]
        self.params = {name: [p["parameter_name"] for p in spec["parameters"]] for name, spec in api.items()}
        info = self.client.predict(api_name="/info") if "/info" in self.params else {}
        self.method = method or (info.get("methods") or ["phi"])[0]
        self.k, self.steps = k, steps

    def _call(self, endpoint: str, image: Path, caption: str) -> float:
        from gradio_client import handle_file

        values = {"reference": handle_file(str(image)), "image": handle_file(str(image)), "caption": caption,
                  "k": self.k, "top_k": self.k, "method": self.method, "steps": self.steps}
        kwargs = {p: values[p] for p in self.params[endpoint] if p in values}
        t = time.perf_counter()
        self.client.predict(**kwargs, api_name=endpoint)
        return (time.perf_counter() - t) * 1000

    def search(self, image: Path, caption: str, panel: bool = True) -> dict:
        """ms of the search round trip, and of search + explanation (the two requests in a row)."""
        results = self._call(self.SEARCH, image, caption)
        out = {"results": results, "panel": None}
        if panel and self.EXPLAIN in self.params:
            out["panel"] = results + self._call(self.EXPLAIN, image, caption)
        elif panel:
            out["panel"] = results  # the search answers with the panel
        return out
