"""bench/visitor_latency.py (bench g): its inputs, what it counts as "painted", its goals, and a
quick run against the app in chromium."""

import hashlib
import shutil
import sys
from pathlib import Path

import pytest
from PIL import Image, ImageOps

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench import visitor_inputs, visitor_latency, visitor_page  # noqa: E402

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def test_uploads_are_new_pictures_and_the_phone_one_is_exif_rotated(tmp_path):
    small = visitor_inputs.make_uploads(tmp_path, 3, "small")
    phone = visitor_inputs.make_uploads(tmp_path, 1, "phone")
    digests = {hashlib.sha256(u.path.read_bytes()).hexdigest() for u in small}
    assert len(digests) == 3  # every upload is a picture the server has not seen
    assert all(u.caption and u.typed and u.caption != u.typed for u in small + phone)
    with Image.open(small[0].path) as im:
        assert im.size == (640, 480) and im.format == "JPEG"
    with Image.open(phone[0].path) as im:
        assert im.size == (4000, 3000) and im.format == "JPEG"
        assert im.getexif()[visitor_inputs.ORIENTATION] == 6
        upright = ImageOps.exif_transpose(im)
    assert upright.size == (3000, 4000)
    # the scene sits upright: the white bands are above and below it, not beside it
    top, middle = upright.getpixel((1500, 100)), upright.getpixel((1500, 2000))
    assert min(top) > 230 and top != middle


def live_config(events):
    return {"components": [{"id": 1, "props": {"elem_id": "caption"}}, {"id": 2, "props": {"elem_id": "results"}},
                           {"id": 3, "props": {"elem_id": "search"}}],
            "dependencies": [{"targets": [[3, "click"]], "outputs": [2]},
                             *[{"targets": [[1, e]], "outputs": [2]} for e in events]]}


@pytest.mark.parametrize(("events", "live"), [([], False), (["input"], True), (["change"], True), (["submit"], False)])
def test_type_to_search_is_read_from_the_app_config(monkeypatch, events, live):
    import io
    import json

    monkeypatch.setattr(visitor_page.urllib.request, "urlopen",
                        lambda url, timeout: io.BytesIO(json.dumps(live_config(events)).encode()))
    assert visitor_page.types_to_search("http://x/") is live


def side(name, **times):
    s = visitor_latency.Side(name, REPO, {})
    for key, values in times.items():
        s.times[key.replace("_", " ")] = list(values)
    return s


def test_goals_judge_the_candidate_and_show_the_baseline():
    base = side("baseline", browser_small_results=[500, 520], browser_small_panel=[1200, 1300],
                browser_phone_panel=[2400, 2500], browser_typed_results=[300, 310])
    cand = side("candidate", browser_small_results=[250, 260], browser_small_panel=[300, 320],
                browser_phone_panel=[350, 380], browser_typed_results=[90, 130])
    rows = {r["case"]: r for r in visitor_latency.goals("offline", [base, cand])}
    phone = rows["offline: 12 MP upload / 640x480 upload, click -> results + panel"]
    assert "1.96x" in phone.values() and phone["faster"] == "1.18x" and phone["verdict"] == "met"  # baseline, candidate
    panel = rows["offline: search + panel / search alone, 640x480 upload (browser)"]
    assert panel["faster"] == "1.22x" and panel["verdict"] == "met"
    assert rows["offline: 640x480 upload: click -> results + panel painted"]["verdict"] == "met"
    typed = rows["offline: cached reference + new caption: keystroke -> results painted"]
    assert typed["faster"] == "110 ms" and typed["verdict"] == "not met here"  # median of 90 and 130
    vit = {r["case"] for r in visitor_latency.goals("vitb32", [base, cand])}
    assert "vitb32: 640x480 upload: click -> results + panel painted" not in vit  # an offline-world goal


def test_paired_ratio_in_the_printed_table():
    base = side("baseline", browser_small_results=[400, 800, 600])
    cand = side("candidate", browser_small_results=[200, 400, 600])
    _, lines = visitor_latency.world_rows("offline", [base, cand], [False, True])
    line = next(x for x in lines if x.startswith("browser: 640x480 upload: click -> results "))
    assert "0.50x (IQR 0.50-0.75)" in line  # candidate/baseline per round: 0.5, 0.5, 1.0
    assert any("baseline: no search while typing" in x for x in lines)
    assert not any("candidate: no search" in x for x in lines)


# A page standing in for the demo: Search shows a progress text at once (as Gradio's overlay
# does), then after 300 ms the new status, results whose images load 200 ms later, and at 900 ms
# the panel. The second search is the telling one: the first one's results are still shown.
PAGE = """<html><body>
<div id="status"><div data-testid="status-tracker" id="tracker"></div><div data-testid="markdown">ready</div></div>
<div id="results"></div>
<div id="panel"><div data-testid="markdown">no panel</div></div><div id="tokens-chart"></div>
<input id="caption-box"><button id="search">Search</button>
<script>
const PX = "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg==";
let n = 0;
document.getElementById("search").addEventListener("click", () => {
  n += 1;
  document.getElementById("tracker").innerText = "processing | 0.0s";
  setTimeout(() => {
    document.getElementById("tracker").innerText = "";
    document.querySelector("#status [data-testid=markdown]").innerText = "10 results for query " + n + " · phi · 42 ms";
    const res = document.getElementById("results");
    res.innerHTML = "";
    for (let i = 0; i < 10; i++) {
      const b = document.createElement("button"); b.className = "thumbnail-item";
      const img = document.createElement("img"); b.appendChild(img); res.appendChild(b);
      setTimeout(() => { img.src = PX + "#" + n + "-" + i; }, 200);
    }
  }, 300);
  setTimeout(() => {
    document.querySelector("#panel [data-testid=markdown]").innerText = "S* reads as " + n;
    document.getElementById("tokens-chart").innerHTML = '<img src="' + PX + '#chart' + n + '">';
  }, 900);
});
</script></body></html>"""


@pytest.mark.browser
def test_painted_means_the_new_results_with_their_images_not_the_progress_text():
    sync_api = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"no chromium at {CHROMIUM}")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=visitor_page.CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page()
            page.set_content(PAGE)
            tab = visitor_page.BrowserSide(page, "about:blank", k=10)
            first = tab.click_search()
            got = tab.click_search()
        finally:
            browser.close()
    for measured in (first, got):
        assert 480 <= measured["results"] < 900  # 300 ms to the status, 200 more to the images
        assert 880 <= measured["panel"] < 1500
        assert 280 <= measured["text"] < 480  # the status, before the thumbnails loaded
        assert measured["handler"] == 42  # the handler's own time, read from the status line


@pytest.mark.browser
@pytest.mark.slow
def test_quick_run_against_the_app(tmp_path, monkeypatch):
    """`--quick`: the tiny test world, one app, every case measured in the browser and the client."""
    pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"no chromium at {CHROMIUM}")
    monkeypatch.delenv(visitor_latency.BASELINE_ENV, raising=False)
    monkeypatch.setenv("ISEARLE_CACHE", str(tmp_path / "cache"))
    rows = visitor_latency.main(["--quick", "--chromium", CHROMIUM, "--json", str(tmp_path / "out.json")])
    measured = {r["case"]: r["value"] for r in rows if r["bench"] == "g visitor"}
    for how, event in (("browser", "click"), ("client", "request")):
        for label in ("640x480 upload", "12 MP upload (EXIF-rotated)"):
            for what in ("results", "results + panel"):
                assert measured[f"test: {how}: {label}: {event} -> {what}"] > 0
    assert measured["test: browser: cached reference, new caption: keystroke -> results"] > 0
    assert measured["test: client: cached reference, new caption: request -> results"] > 0
    for how in ("browser", "client"):  # the panel comes after the results of the same click
        small = {w: measured[f"test: {how}: 640x480 upload: {'click' if how == 'browser' else 'request'} -> {w}"]
                 for w in ("results", "results + panel")}
        assert small["results + panel"] > small["results"]
    assert any(r["bench"] == "goal" for r in rows)


def test_app_hook_sets_torch_threads_and_a_random_concept_bank(tmp_path):
    """The sitecustomize an adjusted app loads: every set_threads call gets the bench's thread
    count, and a concept bank is random features of its shape, built without the text encoder."""
    import os
    import subprocess

    (tmp_path / "sitecustomize.py").write_text(visitor_latency.HOOK)
    probe = ("import torch, isearle.runtime as r, isearle.concepts as c\n"
             "from isearle.backbone import load_backbone\n"
             "b = load_backbone('isearle-tiny-test', None, 'cpu')\n"
             "b.encode_texts = None  # the bank must not need the text encoder\n"
             "bank = c.ConceptBank.build(b, ['a', 'b', 'c'])\n"
             "print(r.set_threads(), torch.get_num_threads(), tuple(bank.features.shape),"
             " round(float(bank.features.norm(dim=-1).mean()), 4))\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(tmp_path)]),
           "ISEARLE_BENCH_TORCH_THREADS": "1", "ISEARLE_BENCH_RANDOM_CONCEPTS": "1"}
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-5:] == ["1", "1", "(3,", "64)", "1.0"]
