"""Query latency of the demo, end to end through gradio_client, warm and cold (p50 / p95).

Starts `python app.py` (the offline shapes world unless other app flags follow `--`) on a free
localhost port and times sequential /search calls:
  cold  a reference the server has never seen: image features, S* (phi or OTI), text encoder,
        FAISS search, thumbnails of results not shown before;
  warm  the same reference with a new caption: S* comes from the cache (text encoder + search);
  repeat  a query asked before: the query feature comes from the cache (search only);
  explain  the pseudo-word panel (/explain) after a query.
Client-side times include HTTP, the queue and file handling; "server" is the handler's own time
(reported in the status line). References are ShapesCIR test references, rendered as the app
shows them, so that captions and references match.

    python bench/demo_latency.py --n 40                       # offline world, method phi
    python bench/demo_latency.py --method oti --n 10 --steps 150
    python bench/demo_latency.py -- --gallery my_index        # any app.py flags after --

What a visitor sees (click or keystroke to results painted in chromium) and two checkouts or two
runtime settings compared request by request: bench/visitor_latency.py.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from isearle import demo as D  # noqa: E402
from isearle.testing import AppProcess, latency_stats, split_app_args  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    argv, app_args = split_app_args(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=40, help="references (cold queries; as many warm ones)")
    p.add_argument("--k", type=int, default=10, help="top-K of each query")
    p.add_argument("--method", default=None, help="phi or oti (default: phi when available)")
    p.add_argument("--steps", type=int, default=150, help="OTI steps")
    p.add_argument("--out", type=Path, default=None, help="also write the numbers as JSON here")
    p.add_argument("--quick", action="store_true", help="two references: checks the bench runs; not results")
    args = p.parse_args(argv)
    if args.quick:  # the tiny sizes replace the defaults; flags given win
        p.set_defaults(n=2, steps=20)
        args = p.parse_args(argv)

    from gradio_client import Client, handle_file

    from isearle.shapes.benchmark import load_benchmark

    tmp = Path(tempfile.mkdtemp(prefix="isearle-latency-"))
    env = {"ISEARLE_CACHE": os.environ.get("ISEARLE_CACHE", str(Path.home() / ".cache" / "isearle")),
           "TMPDIR": str(tmp), "GRADIO_TEMP_DIR": str(tmp / "gradio")}
    queries, gallery = load_benchmark(split="test")
    refs = []
    for q in queries[: args.n]:
        path = tmp / f"ref-{q['id']}.png"
        D.render_spec(gallery[q["reference_img_id"]].to_dict(), D.REFERENCE_SIZE).save(path)
        refs.append((path, q["relative_caption"]))
    other_captions = list(D.SHAPES_CAPTIONS)

    start = time.perf_counter()
    with AppProcess(app_args, env, log=tmp / "app.log") as app:
        startup = time.perf_counter() - start
        client = Client(app.url, verbose=False, download_files=False, analytics_enabled=False)
        info = client.predict(api_name="/info")
        method = args.method or info["methods"][0]
        timings: dict[str, list[float]] = {"cold": [], "warm": [], "repeat": [], "explain": []}
        server: dict[str, list[float]] = {"cold": [], "warm": [], "repeat": []}

        def search(path: Path, caption: str, kind: str) -> None:
            t = time.perf_counter()
            _, status, hits, *_ = client.predict(handle_file(str(path)), caption, args.k, method, args.steps,
                                                 api_name="/search")
            timings[kind].append(1000 * (time.perf_counter() - t))
            assert len(hits) == args.k
            m = re.search(r"· (\d+) ms", status)  # the handler's own time
            if m:
                server[kind].append(float(m.group(1)))

        first_t = time.perf_counter()
        search(refs[0][0], refs[0][1], "cold")
        first = 1000 * (time.perf_counter() - first_t)
        for path, caption in refs[1:]:
            search(path, caption, "cold")
        for i, (path, _) in enumerate(refs):
            search(path, other_captions[i % len(other_captions)], "warm")
        for path, caption in refs:
            search(path, caption, "repeat")
        for path, caption in refs[: max(5, args.n // 4)]:
            t = time.perf_counter()
            client.predict(handle_file(str(path)), caption, method, args.steps, api_name="/explain")
            timings["explain"].append(1000 * (time.perf_counter() - t))

    result = {
        "backbone": info["label"], "method": method, "k": args.k, "steps": args.steps if method == "oti" else None,
        "startup_s": round(startup, 1), "first_query_ms": round(first, 1),
        "client_ms": {k: {s: round(v, 1) for s, v in latency_stats(v).items()} for k, v in timings.items()},
        "server_ms": {k: {s: round(v, 1) for s, v in latency_stats(v).items()} for k, v in server.items()},
        "cpu_threads": os.cpu_count(),
    }
    print(f"{info['label']} · method {method} · top-{args.k} · start-up {startup:.1f} s · first query {first:.0f} ms")
    print(f"{'':10}{'n':>4}{'p50 ms':>10}{'p95 ms':>10}   (server-side p50 / p95)")
    for kind in ("cold", "warm", "repeat", "explain"):
        c = result["client_ms"][kind]
        s = result["server_ms"].get(kind)
        extra = f"   ({s['p50']:.0f} / {s['p95']:.0f})" if s and s["n"] else ""
        print(f"{kind:10}{c['n']:>4}{c['p50']:>10.1f}{c['p95']:>10.1f}{extra}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    shutil.rmtree(tmp, ignore_errors=True)  # kept when a run fails: the server log is in it
    return 0


if __name__ == "__main__":
    sys.exit(main())
