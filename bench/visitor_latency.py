"""Bench g: what the visitor feels. Two app processes (a baseline checkout and a candidate),
requests alternating between them, timed in headless chromium and through gradio_client.

Headline: ms from the visitor's click (or keystroke) to the results painted in the page, for
  640x480 upload   a new 640x480 JPEG, caption typed, Search clicked: results, then the panel;
  12 MP upload     a new 4000x3000 phone JPEG (EXIF orientation 6), likewise;
  new caption      the reference just searched (cached), a new caption typed: from its last
                   keystroke to its results (an app that does not search while typing gets the
                   Search click right after that key: the output says which);
  search + panel   the explanation panel painted after a click (the uploads' second number);
and the gradio_client round trips of the same requests (/search, then /explain as the page
chains them). Each upload is a picture neither app has seen. Worlds: "offline" (each checkout's
default gallery_index, the shapes world), "vitb32" (ViT-B/32 with random-init weights saved as
a checkpoint, a random phi of SEARLE's shape, bench d's 100k clustered vectors, a concept bank of
random features: latency only; pretrained weights cannot be downloaded here) and "test" (the
tiny random test world; --quick).

Each side may get its own environment (`--baseline-env OMP_WAIT_POLICY=PASSIVE`), and both sides
may be the same checkout, to choose a runtime setting by the end-to-end number:

    python bench/visitor_latency.py --baseline ../base --candidate .            # both worlds
    python bench/visitor_latency.py --baseline . --baseline-env OMP_WAIT_POLICY=PASSIVE --worlds offline
    python bench/visitor_latency.py --quick                                     # smoke test (CI)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import REPO, Row, finish, goal_row, load_line, log, machine, median, percentile, ratio, row  # noqa: E402

BASELINE_ENV = "ISEARLE_BENCH_BASELINE"  # default --baseline (e.g. for run_all.py)
#: (key, label, browser measurement, has a panel time)
CASES = (("small", "640x480 upload", "click", True), ("typed", "cached reference, new caption", "keystroke", False),
         ("phone", "12 MP upload (EXIF-rotated)", "click", True))
#: Goals on two idle cores (offline world unless stated): the candidate's p50s.
KEYSTROKE_GOAL = {"offline": 100.0, "vitb32": 120.0}
SMALL_PANEL_GOAL, PHONE_RATIO_GOAL, PANEL_RATIO_GOAL = 400.0, 1.3, 1.3
POLICY_VARS = ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "ISEARLE_PRECISION", "ISEARLE_THREADS")


#: Loaded first (as sitecustomize) by an app the bench adjusts: with ISEARLE_BENCH_TORCH_THREADS,
#: every `isearle.runtime.set_threads` call asks for that many torch threads; with
#: ISEARLE_BENCH_RANDOM_CONCEPTS (the random-weights ViT-B/32 world), the concept bank is random
#: features of its shape instead of 1,000 names x 24 prompts through the text encoder, hours on two
#: busy cores and meaningless with random weights (the panel's cost per query is the same).
HOOK = """import os
if os.environ.get("ISEARLE_BENCH_TORCH_THREADS", "0") != "0":
    import isearle.runtime as _runtime
    _set_threads, _n = _runtime.set_threads, int(os.environ["ISEARLE_BENCH_TORCH_THREADS"])
    def set_threads(threads=0, faiss_threads=1):
        return _set_threads(_n, faiss_threads)
    _runtime.set_threads = set_threads
if os.environ.get("ISEARLE_BENCH_RANDOM_CONCEPTS"):
    import torch
    import torch.nn.functional as F
    from isearle import concepts as _concepts
    def build(cls, backbone, names, *args, **kwargs):
        g = torch.Generator().manual_seed(0)
        return cls(list(names), F.normalize(torch.randn(len(names), backbone.embed_dim, generator=g), dim=-1))
    _concepts.ConceptBank.build = classmethod(build)
"""


@dataclass
class Side:
    """One app: a checkout, its environment, and what it measured."""

    name: str
    directory: Path
    env: dict[str, str]
    threads: int = 0  # torch threads of the app (0: its own choice)
    times: dict[str, list[float]] = field(default_factory=dict)

    def record(self, key: str, value: float | None) -> None:
        if value is not None:
            self.times.setdefault(key, []).append(float(value))

    def describe(self) -> str:
        try:
            rev = subprocess.run(["git", "-C", str(self.directory), "describe", "--always", "--dirty"],
                                 capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            rev = "?"
        policy = {v: self.env.get(v, os.environ.get(v, "unset")) for v in POLICY_VARS}
        extra = " ".join(f"{k}={v}" for k, v in self.env.items() if k not in POLICY_VARS)
        policy["torch threads"] = str(self.threads) if self.threads else "the app's choice"
        return (f"{self.name}: {self.directory} @ {rev or '?'}; " + ", ".join(f"{k}={v}" for k, v in policy.items())
                + (f"; {extra}" if extra else ""))


def parse_env(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--*-env takes KEY=VALUE, not {pair!r}")
        out[key] = value
    return out


def world_arguments(world: str, cache: Path, tmp: Path) -> list[str]:
    if world == "offline":
        return []
    if world == "vitb32":
        from bench.visitor_inputs import vitb32_world

        return vitb32_world(cache)
    from isearle import demo as D

    built = D.build_test_world(tmp / "test-world")
    return ["--gallery", str(built["gallery"]), "--phi", str(built["phi"])]


def start_apps(sides: list[Side], args: list[str], tmp: Path, timeout: float, random_concepts: bool = False) -> list:
    """Every side's `app.py` started, each importing its own checkout."""
    from isearle.testing import AppProcess

    apps = []
    for side in sides:
        folder = tmp / side.name
        (folder / "gradio").mkdir(parents=True, exist_ok=True)
        (folder / "hook").mkdir(exist_ok=True)
        (folder / "hook" / "sitecustomize.py").write_text(HOOK)
        env = {"PYTHONPATH": os.pathsep.join([str(side.directory), str(folder / "hook")]), "TMPDIR": str(folder),
               "GRADIO_TEMP_DIR": str(folder / "gradio"), "ISEARLE_BENCH_TORCH_THREADS": str(side.threads),
               "ISEARLE_BENCH_RANDOM_CONCEPTS": "1" if random_concepts else "", **side.env}
        apps.append(AppProcess(args, env, timeout=timeout, app=side.directory / "app.py", log=folder / "app.log"))
    try:  # one after the other: the second finds what the first wrote to the shared disk caches
        for app in apps:
            app.start()
    except BaseException:
        for app in apps:
            app.stop()
        raise
    return apps


def logged_threads(app_log: str) -> str:
    """The torch thread count an app logged at start-up (app.py: "... (torch threads N)")."""
    m = re.search(r"torch threads \d+", app_log)
    return m.group(0) if m else "torch threads not logged"


def run_world(world: str, sides: list[Side], opts: argparse.Namespace, tmp: Path) -> dict:
    """Start both apps on `world`, then run the rounds, requests alternating between the sides."""
    from playwright.sync_api import sync_playwright

    from bench.visitor_inputs import make_uploads
    from bench.visitor_page import CHROMIUM_ARGS, BrowserSide, ClientSide

    args = world_arguments(world, opts.cache, tmp) + opts.app_args
    log(f"{world}: starting {len(sides)} app(s); load {load_line()}")
    t = time.perf_counter()
    apps = start_apps(sides, args, tmp / world, opts.start_timeout, random_concepts=world == "vitb32")
    log(f"{world}: apps up in {time.perf_counter() - t:.0f} s; "
        + "; ".join(f"{s.name}: {logged_threads(a.log(100_000))}" for s, a in zip(sides, apps, strict=True)))
    total = opts.warmup + opts.rounds
    uploads = {kind: make_uploads(tmp / world / "uploads", total * 2, kind) for kind in ("small", "phone")}
    for side in sides:
        side.times = {}
    loads = [load_line()]
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=opts.chromium, args=CHROMIUM_ARGS, headless=True)
            try:
                pages = [BrowserSide.open(browser, app.url, opts.k) for app in apps]
                clients = [ClientSide(app.url, opts.k, opts.method) for app in apps]
                for r in range(total):
                    order = list(range(len(sides))) if r % 2 == 0 else list(range(len(sides)))[::-1]
                    timed = r >= opts.warmup
                    one_round(r, order, sides, pages, clients, uploads, timed)
                    log(f"{world}: round {r + 1}/{total}{'' if timed else ' (warm-up)'} done; load {load_line()}")
                    loads.append(load_line())
            finally:
                browser.close()
    finally:
        for app in apps:
            app.stop()
    streams = [pg.open_streams for pg in pages]
    if any(streams):
        log(f"{world}: result streams left open (counted as done once the page stayed unchanged 5 s): "
            + ", ".join(f"{s.name} {n}" for s, n in zip(sides, streams, strict=True)))
    return {"live": [pg.live for pg in pages], "loads": loads}


def one_round(r: int, order: list[int], sides: list[Side], pages: list, clients: list, uploads: dict,
              timed: bool) -> None:
    """One round: each case on every side in turn (the order alternates between rounds)."""
    small_b, small_c = uploads["small"][2 * r], uploads["small"][2 * r + 1]
    phone_b, phone_c = uploads["phone"][2 * r], uploads["phone"][2 * r + 1]

    def keep(side: Side, key: str, value: float | None) -> None:
        if timed:
            side.record(key, value)

    def upload_and_click(name: str, bundle) -> None:
        for i in order:
            preview = pages[i].upload(bundle.path, bundle.caption)
            got = pages[i].click_search()
            for part in ("results", "panel"):
                keep(sides[i], f"browser {name} {part}", got[part])
            keep(sides[i], f"handler {name}", got["handler"])
            keep(sides[i], f"text {name}", got["text"])
            keep(sides[i], f"upload preview {name}", preview)

    upload_and_click("small", small_b)  # 640x480: upload, click
    for i in order:  # the same reference, a new caption typed
        got = pages[i].type_caption(small_b.typed)
        keep(sides[i], "browser typed results", got["results"])
        keep(sides[i], "handler typed", got["handler"])
        keep(sides[i], "text typed", got["text"])
    upload_and_click("phone", phone_b)  # 12 MP: upload, click
    for i in order:
        got = clients[i].search(small_c.path, small_c.caption)
        keep(sides[i], "client small results", got["results"])
        keep(sides[i], "client small panel", got["panel"])
    for i in order:
        got = clients[i].search(small_c.path, small_c.typed, panel=False)
        keep(sides[i], "client typed results", got["results"])
    for i in order:
        got = clients[i].search(phone_c.path, phone_c.caption)
        keep(sides[i], "client phone results", got["results"])
        keep(sides[i], "client phone panel", got["panel"])


def p50(side: Side, key: str) -> float:
    v = side.times.get(key, [])
    return median(v) if v else float("nan")


def stat_text(side: Side, key: str) -> str:
    v = side.times.get(key, [])
    return f"{median(v):.0f} ms (p95 {percentile(v, 95):.0f}, n {len(v)})" if v else "n/a"


def world_rows(world: str, sides: list[Side], live: list[bool]) -> tuple[list[Row], list[str]]:
    """Result rows, goal rows and printable lines of one world."""
    rows: list[Row] = []
    lines = [f"{'':62}" + "".join(f"{s.name:>28}" for s in sides) + (f"   {sides[-1].name}/{sides[0].name} (paired)" if len(sides) == 2 else "")]
    for how in ("browser", "client"):
        for key, label, event, panel in CASES:
            parts = [("results", "results")] + ([("panel", "results + panel")] if panel else [])
            for part, what in parts:
                name = f"{key} {part}"
                trigger = event if how == "browser" else "request"
                title = f"{how}: {label}: {trigger} -> {what}"
                line = f"{title:62}" + "".join(f"{stat_text(s, f'{how} {name}'):>28}" for s in sides)
                if len(sides) == 2:
                    a, b = sides[0].times.get(f"{how} {name}", []), sides[1].times.get(f"{how} {name}", [])
                    if a and b:
                        r = ratio(b, a)
                        line += f"   {r[0]:.2f}x (IQR {r[1]:.2f}-{r[2]:.2f})"
                lines.append(line)
                for s in sides:
                    v = s.times.get(f"{how} {name}", [])
                    if v:
                        rows.append(row("g visitor", f"{world}: {title}", f"{s.name} p50", median(v), "ms",
                                        note=f"p95 {percentile(v, 95):.0f} ms, n {len(v)}"))
    for key, label, _, _ in CASES:
        lines.append(f"{'browser, status text shown: ' + label:62}"
                     + "".join(f"{stat_text(s, f'text {key}'):>28}" for s in sides))
        lines.append(f"{'search handler (status line): ' + label:62}"
                     + "".join(f"{stat_text(s, f'handler {key}'):>28}" for s in sides))
    for kind in ("small", "phone"):
        lines.append(f"{'upload -> preview shown (' + kind + ')':62}"
                     + "".join(f"{stat_text(s, f'upload preview {kind}'):>28}" for s in sides))
    for s, is_live in zip(sides, live, strict=True):
        if not is_live:
            lines.append(f"{s.name}: no search while typing: its keystroke case is the last key + the Search click")
    rows += goals(world, sides)
    return rows, lines


def goals(world: str, sides: list[Side]) -> list[Row]:
    """The latency goals, judged on the last side (the candidate), the first side alongside."""
    base, cand = sides[0], sides[-1]

    def both(fn) -> tuple[float, float]:
        return fn(base), fn(cand)

    out = []
    checks = [("12 MP upload / 640x480 upload, click -> results + panel",
               lambda s: p50(s, "browser phone panel") / p50(s, "browser small panel"), PHONE_RATIO_GOAL, "x"),
              ("search + panel / search alone, 640x480 upload (browser)",
               lambda s: p50(s, "browser small panel") / p50(s, "browser small results"), PANEL_RATIO_GOAL, "x")]
    if world == "offline":
        checks.append(("640x480 upload: click -> results + panel painted",
                       lambda s: p50(s, "browser small panel"), SMALL_PANEL_GOAL, "ms"))
    if world in KEYSTROKE_GOAL:
        checks.append(("cached reference + new caption: keystroke -> results painted",
                       lambda s: p50(s, "browser typed results"), KEYSTROKE_GOAL[world], "ms"))
    for case, fn, goal, unit in checks:
        old, new = both(fn)
        fmt = (lambda v: f"{v:.2f}x") if unit == "x" else (lambda v: f"{v:.0f} ms")
        verdict = "n/a" if new != new else ("met" if new <= goal else "not met here")
        note = f"{cand.name} p50 vs {base.name} p50" if base is not cand else f"{cand.name} only"
        out.append(goal_row(f"{world}: {case}", fmt(old), fmt(new), f"<= {fmt(goal)}", verdict, note))
    return out


def main(argv: list[str] | None = None) -> list[Row]:
    from isearle.testing import split_app_args

    argv, app_args = split_app_args(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--baseline", type=Path, default=os.environ.get(BASELINE_ENV) or None,
                   help=f"checkout to compare against (default ${BASELINE_ENV}; none: the candidate alone)")
    p.add_argument("--candidate", type=Path, default=REPO, help="checkout of the new code (default: this one)")
    p.add_argument("--baseline-env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment of the baseline app (repeatable), e.g. OMP_WAIT_POLICY=PASSIVE")
    p.add_argument("--candidate-env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment of the candidate app (repeatable)")
    p.add_argument("--baseline-threads", type=int, default=0, help="torch threads of the baseline app (default: its own)")
    p.add_argument("--candidate-threads", type=int, default=0, help="torch threads of the candidate app")
    p.add_argument("--labels", nargs=2, default=["baseline", "candidate"], metavar=("BASELINE", "CANDIDATE"),
                   help="names of the two sides in the output, e.g. PASSIVE default")
    p.add_argument("--worlds", nargs="+", choices=["offline", "vitb32", "test"], default=["offline", "vitb32"])
    p.add_argument("--rounds", type=int, default=8, help="timed rounds (each: every case on every side)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    p.add_argument("--k", type=int, default=10, help="top-K")
    p.add_argument("--method", default=None, help="phi or oti (default: the app's first)")
    p.add_argument("--quick", action="store_true", help="smoke test: the tiny test world, 1 round, no warm-up")
    p.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "isearle" / "bench",
                   help="where the ViT-B/32 world is built once")
    p.add_argument("--start-timeout", type=float, default=1200, help="seconds an app may take to start")
    p.add_argument("--chromium", default=os.environ.get("ISEARLE_CHROMIUM") or "/usr/bin/chromium")
    p.add_argument("--json", type=Path, help="also write every measurement here")
    opts = p.parse_args(argv)
    opts.app_args = app_args
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the apps (finally blocks) when terminated
    if opts.quick:
        opts.worlds, opts.rounds, opts.warmup = ["test"], 1, 0
    if not Path(opts.chromium).is_file():
        raise SystemExit(f"no chromium at {opts.chromium}: apt-get install -y chromium, or pass --chromium PATH")
    sides = []
    if opts.baseline:
        sides.append(Side(opts.labels[0], opts.baseline.resolve(), parse_env(opts.baseline_env), opts.baseline_threads))
    sides.append(Side(opts.labels[1], opts.candidate.resolve(), parse_env(opts.candidate_env), opts.candidate_threads))
    for s in sides:
        if not (s.directory / "app.py").is_file():
            raise SystemExit(f"no app.py in {s.directory}: pass a checkout of the project")
    header = [f"Machine: {machine()}", *[f"Policy of {s.describe()}" for s in sides],
              "Numbers are taken under the load printed (a shared machine inflates absolute times; "
              "the paired ratios compare the sides under the same load)."]
    print("\n".join(header), flush=True)
    rows: list[Row] = []
    dump: dict = {"header": header, "worlds": {}}
    with tempfile.TemporaryDirectory(prefix="isearle-visitor-") as tmp:
        for world in opts.worlds:
            got = run_world(world, sides, opts, Path(tmp))
            world_rows_, lines = world_rows(world, sides, got["live"])
            rows += world_rows_
            print(f"\n## {world} world · load (1/5/15 min) per round: {'; '.join(got['loads'])}\n", flush=True)
            print("\n".join(lines), flush=True)
            dump["worlds"][world] = {"loads": got["loads"], "live": got["live"],
                                     "times": {s.name: s.times for s in sides}}
    if opts.json:
        opts.json.write_text(json.dumps(dump, indent=1) + "\n")
    return rows


if __name__ == "__main__":
    finish(main(), "g. what the visitor feels: click to results painted, apps interleaved")
