"""Latency of the demo's pseudo-word inspector, end to end through gradio_client (p50 / p95).

Starts `python app.py` (the offline shapes world unless other app flags follow `--`) and times:
  watch   the streamed OTI view (/watch_oti): the interval between two updates as the client
          receives them (every `--every` steps; both curves, the phi-started run and one from noise)
          and the whole run;
  blend   one slider position (/blend): tokens of both references cached, one text-encoder pass,
          one search, thumbnails; the first call (both S* computed) is reported apart, and the
          handler's own time too (the client uploads both images with every call, the browser not);
  words   word importance for a 10-word caption (/words): round trip, and the handler's own time
          for the 10 variants (one batched text-encoder pass, one batched search).
References are ShapesCIR test references rendered as the app shows them.

    python bench/inspector_latency.py --n 10 --steps 150 --every 10
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from isearle import demo as D  # noqa: E402
from isearle.testing import AppProcess, latency_stats, split_app_args  # noqa: E402

CAPTION_10 = "make the small cross orange and put it at top"  # 10 words


def main(argv: list[str] | None = None) -> int:
    argv, app_args = split_app_args(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=10, help="references (each: one watched OTI run, blends, word runs)")
    p.add_argument("--steps", type=int, default=150, help="OTI steps of the watched run")
    p.add_argument("--every", type=int, default=10, help="an update every N steps")
    p.add_argument("--out", type=Path, default=None, help="also write the numbers as JSON here")
    p.add_argument("--quick", action="store_true", help="one reference, 30 steps: checks the bench runs; not results")
    args = p.parse_args(argv)
    if args.quick:  # the tiny sizes replace the defaults; flags given win
        p.set_defaults(n=1, steps=30, every=10)
        args = p.parse_args(argv)
    assert len(CAPTION_10.split()) == 10

    from gradio_client import Client, handle_file

    from isearle.shapes.benchmark import load_benchmark

    tmp = Path(tempfile.mkdtemp(prefix="isearle-inspector-latency-"))
    env = {"ISEARLE_CACHE": os.environ.get("ISEARLE_CACHE", str(Path.home() / ".cache" / "isearle")),
           "TMPDIR": str(tmp), "GRADIO_TEMP_DIR": str(tmp / "gradio")}
    queries, gallery = load_benchmark(split="test")
    refs = []
    for q in queries[: args.n + 1]:
        path = tmp / f"ref-{q['id']}.png"
        D.render_spec(gallery[q["reference_img_id"]].to_dict(), D.REFERENCE_SIZE).save(path)
        refs.append((path, q["relative_caption"]))
    times: dict[str, list[float]] = {"watch_interval": [], "watch_first": [], "watch_total": [], "blend_first": [],
                                     "blend": [], "blend_handler": [], "words": [], "words_handler": []}
    try:
        with AppProcess(app_args, env, log=tmp / "app.log") as app:
            client = Client(app.url, verbose=False, download_files=False)
            for i, (path, caption) in enumerate(refs[: args.n]):
                start = time.perf_counter()
                job = client.submit(handle_file(str(path)), caption, args.steps, args.every, True, None, True,
                                    api_name="/watch_oti")
                arrivals = [time.perf_counter() for _ in job]
                job.result()
                times["watch_first"].append(1000 * (arrivals[0] - start))
                times["watch_total"].append(1000 * (time.perf_counter() - start))
                times["watch_interval"] += [1000 * (b - a) for a, b in zip(arrivals[1:], arrivals[2:], strict=False)]
                second = refs[i + 1][0]
                for j, alpha in enumerate((0.5, 0.0, 0.25, 0.75, 1.0, 0.6)):
                    t0 = time.perf_counter()
                    data = client.predict(handle_file(str(path)), handle_file(str(second)), alpha, caption, "phi",
                                          args.steps, 10, None, True, api_name="/blend")[2]
                    times["blend_first" if j == 0 else "blend"].append(1000 * (time.perf_counter() - t0))
                    if j:
                        times["blend_handler"].append(data["elapsed_ms"])
                for _ in range(2):
                    t0 = time.perf_counter()
                    data = client.predict(handle_file(str(path)), CAPTION_10, "phi", args.steps, 10, "", None, True,
                                          api_name="/words")[3]
                    times["words"].append(1000 * (time.perf_counter() - t0))
                    times["words_handler"].append(data["elapsed_ms"])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    stats = {name: latency_stats(v) for name, v in times.items()}
    load = os.getloadavg()
    out = {"steps": args.steps, "every": args.every, "n": args.n, "load_average": [round(x, 2) for x in load],
           "ms": stats}
    for name, s in stats.items():
        print(f"{name:15s} n={s['n']:4d}  p50 {s['p50']:8.1f} ms  p95 {s['p95']:8.1f} ms  max {s['max']:8.1f} ms")
    print(f"load average (1, 5, 15 min) at the end: {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")
    if args.out:
        args.out.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
