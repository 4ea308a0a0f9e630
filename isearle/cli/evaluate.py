"""`isearle eval`: the standard benchmarks (CIRR, CIRCO, FashionIQ, ImageNet-R, ShapesCIR)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from isearle.cli.common import add_backbone_arguments, add_decode_argument, add_oti_arguments, oti_config_from


def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    """Options of `isearle eval`."""
    from isearle.datasets import BENCHMARKS, DOMAINS, FASHIONIQ_CATEGORIES
    from isearle.retrieval import DEFAULT_TEMPLATE, METHODS

    add_backbone_arguments(p)
    p.set_defaults(model=None, pretrained=None)
    p.add_argument("--benchmark", required=True, choices=BENCHMARKS, help="which benchmark")
    p.add_argument("--split", default=None, help="cirr: val|test1; circo: val|test; fashioniq: val; shapes: val|test "
                                                 "(default val)")
    p.add_argument("--method", choices=METHODS, default="phi", help="how the query is built (default phi)")
    p.add_argument("--phi", default=None, help="searle, searle-xl, or a phi checkpoint (.safetensors or official .pt); "
                                               "default: the backbone's (official SEARLE for OpenAI B/32 and L/14)")
    p.add_argument("--data", "--dataset-path", dest="data", type=Path, default=None,
                   help="dataset folder in its official layout (shapes: default assets/shapescir)")
    p.add_argument("--template", default=DEFAULT_TEMPLATE, help='query prompt with "$" for S* and "{}" for the caption')
    p.add_argument("--preprocess", choices=["targetpad", "clip"], default="targetpad", help="image preprocessing")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N queries (per category)")
    p.add_argument("--categories", nargs="+", choices=FASHIONIQ_CATEGORIES, default=list(FASHIONIQ_CATEGORIES),
                   help="FashionIQ categories")
    p.add_argument("--domains", nargs="+", choices=DOMAINS, default=list(DOMAINS), help="ImageNet-R target domains")
    p.add_argument("--exclude-reference", choices=["auto", "yes", "no"], default="auto",
                   help="remove the reference image from the ranking (auto: yes for cirr and shapes)")
    add_oti_arguments(p, prefix="oti-")
    from isearle.precision import COMPUTE_PRECISION_HELP, add_compute_precision_argument

    add_compute_precision_argument(p, default="fp32", help="features and queries: " + COMPUTE_PRECISION_HELP.replace(
        "default: fp16 on CUDA, fp32 on CPU", "default fp32, SEARLE's validate.py, comparable with the papers"))
    add_decode_argument(p, default="searle")
    p.add_argument("--batch-size", type=int, default=64, help="images encoded together")
    p.add_argument("--num-workers", type=int, default=2, help="DataLoader worker processes (decode + preprocess)")
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="feature / OTI cache root (default $ISEARLE_CACHE or ~/.cache/isearle)")
    p.add_argument("--no-cache", action="store_true", help="keep nothing on disk")
    p.add_argument("--json", type=Path, default=None, help="write the results (metrics + meta) to this JSON file")
    p.add_argument("--submission", type=Path, default=None,
                   help="folder for test-server files (cirr, circo, shapes); default ./submissions on a test split")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def eval_main(args: argparse.Namespace) -> int:
    """`isearle eval`: evaluate, print the table, write JSON / submission files."""
    from isearle.backbone import load_backbone
    from isearle.evaluation import TITLES, default_backbone, evaluate, format_table, jsonable
    from isearle.runtime import set_threads

    if args.data is None and args.benchmark != "shapes":
        raise ValueError(f"--data (the {TITLES[args.benchmark]} folder, official layout) is required")
    set_threads(faiss_threads=None)  # torch threads = the CPU quota; faiss, unused here, keeps its setting
    model, pretrained = default_backbone(args.benchmark, args.phi, args.model, args.pretrained)
    backbone = load_backbone(model, pretrained, args.device, preprocess=args.preprocess)
    backbone.precision = args.precision
    oti = oti_config_from(args, prefix="oti_", device=backbone.device)
    exclude = {"auto": None, "yes": True, "no": False}[args.exclude_reference]
    cache = None if args.no_cache else (args.cache_dir if args.cache_dir is not None else "default")
    result = evaluate(
        backbone, args.benchmark, args.split, args.method, args.phi, data=args.data, template=args.template,
        limit=args.limit, exclude_reference=exclude, categories=args.categories, domains=args.domains, oti=oti,
        oti_phrases=args.oti_phrases, oti_vocabulary=args.oti_vocabulary, cache_dir=cache,
        batch_size=args.batch_size, num_workers=args.num_workers, submission_dir=args.submission,
        preprocess=args.preprocess, decode=args.decode, progress=not args.quiet,
    )
    print(format_table(result))
    if args.json is not None:
        from isearle.artifacts import write_text

        write_text(args.json, json.dumps(jsonable(result), indent=1))
        print(f"results: {args.json}")
    return 0
