"""Gallery commands: `isearle index` (embed images into a FAISS index) and `isearle query`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from isearle.cli.common import add_backbone_arguments, backbone_from
from isearle.defaults import DEFAULTS
from isearle.errors import BadRequest


def add_index_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of `isearle index`."""
    from isearle.index import KINDS, IndexConfig

    d = IndexConfig()
    add_backbone_arguments(p)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--images", type=Path, help="folder of images (searched recursively; ids are relative paths)")
    g.add_argument("--hf-dataset", help="Hugging Face dataset name or local dataset script/folder")
    g.add_argument("--shapes", type=int, metavar="N", help="render N scenes of the offline shapes world")
    p.add_argument("--shapes-seed", type=int, default=1000, help="seed of the rendered shapes scenes")
    p.add_argument("--hf-split", default="train", help="dataset split")
    p.add_argument("--hf-image-column", default=None, help="image column (default: the first Image feature)")
    p.add_argument("--hf-id-column", default=None, help="id column (default: split/row)")
    p.add_argument("--limit", type=int, default=None, help="index only the first N images")
    p.add_argument("--out", type=Path, default=Path(DEFAULTS.gallery), help="index folder")
    p.add_argument("--append", action="store_true", help="add to the index in --out instead of replacing it")
    p.add_argument("--batch-size", type=int, default=64, help="images encoded together")
    p.add_argument("--num-workers", type=int, default=2, help="DataLoader worker processes (decode + preprocess)")
    p.add_argument("--kind", choices=KINDS, default=d.kind,
                   help="FAISS structure (auto, by size: flat, then --approximate, then ivfsq)")
    p.add_argument("--flat-threshold", type=int, default=d.flat_threshold, help="largest exact (flat) index for --kind auto")
    p.add_argument("--approximate", choices=["hnsw", "ivfpq", "ivfsq"], default=d.approximate,
                   help="index above the flat threshold")
    p.add_argument("--large-threshold", type=int, default=d.large_threshold,
                   help="largest --approximate index for --kind auto; above it: ivfsq (IVF-SQ8, ~0.5 KB/vector)")
    p.add_argument("--hnsw-m", type=int, default=d.hnsw_m, help="HNSW links per node")
    p.add_argument("--ef-search", type=int, default=d.hnsw_ef_search, help="HNSW efSearch")
    p.add_argument("--nprobe", type=int, default=d.ivf_nprobe, help="IVF lists probed per query")
    p.add_argument("--thumbnails", action="store_true",
                   help="store JPEG thumbnails of images without a file (always for --hf-dataset; shapes scenes keep their spec)")
    p.add_argument("--draft", action="store_true",
                   help="decode JPEG files at the reduced size the model needs (faster; features differ slightly)")
    from isearle.cli.common import add_decode_argument
    from isearle.precision import COMPUTE_PRECISION_HELP, add_compute_precision_argument

    add_compute_precision_argument(p, default="fp32", help="encoding: " + COMPUTE_PRECISION_HELP.replace(
        "default: fp16 on CUDA, fp32 on CPU", "default fp32; bf16 keeps bf16 weights, faster on CPUs with "
        "AVX512-BF16/AMX, its ShapesCIR accuracy: bench/precision_table.py"))
    add_decode_argument(p, default="robust")
    p.add_argument("--ray", action="store_true", help="embed on Ray Data (local Ray unless --ray-address)")
    p.add_argument("--ray-address", default=None, help="Ray cluster address (e.g. ray://head:10001 or auto)")
    p.add_argument("--ray-workers", type=int, default=None, help="Ray actors (default: one per GPU, else per CPU)")


def index_main(args: argparse.Namespace) -> int:
    """`isearle index`: embed a folder, a Hugging Face dataset or shapes scenes into a gallery index."""
    from isearle.artifacts import Progress
    from isearle.index import INFO_FILE, PROGRESS_DIR, GalleryIndex, IndexConfig
    from isearle.indexing import build_gallery_index, folder_items, hf_items
    from isearle.shapes.world import scene_items

    backbone = backbone_from(args)
    if args.images is not None:
        items: list = folder_items(args.images)
    elif args.hf_dataset is not None:
        items = hf_items(args.hf_dataset, args.hf_split, args.hf_image_column, args.hf_id_column, args.limit)
    else:
        items = scene_items(args.shapes, args.shapes_seed, backbone.image_size)
    items = items[: args.limit]
    if not items:
        raise BadRequest("no images found to index")
    config = IndexConfig(kind=args.kind, flat_threshold=args.flat_threshold, approximate=args.approximate,
                         large_threshold=args.large_threshold, hnsw_m=args.hnsw_m, hnsw_ef_search=args.ef_search,
                         ivf_nprobe=args.nprobe)
    index = None
    if args.append and (args.out / INFO_FILE).is_file():
        index = GalleryIndex.load(args.out, mmap=False, expect_backbone=backbone)  # ids it holds are skipped
    thumbs = args.out if (args.thumbnails or args.hf_dataset is not None) else None
    if args.ray:
        from isearle.scale import ray_build_gallery_index

        if args.precision != "fp32":
            raise ValueError("--ray encodes in fp32: drop --precision, or run without --ray")
        index = ray_build_gallery_index(backbone, items, batch_size=args.batch_size, config=config,
                                        index=index, address=args.ray_address, num_workers=args.ray_workers,
                                        thumbnails=thumbs, decode=args.decode)
    else:
        encoder = backbone.with_precision(args.precision)
        index = build_gallery_index(encoder, items, args.batch_size, args.num_workers, True, config,
                                    thumbs, index, checkpoint=args.out / PROGRESS_DIR, draft=args.draft,
                                    decode=args.decode)
    index.save(args.out)
    Progress.discard(args.out / PROGRESS_DIR)
    print(f"{len(index)} images ({index.kind}, {index.dim}-d, {backbone.name}) indexed in {args.out}")
    return 0


def add_query_arguments(p: argparse.ArgumentParser) -> None:
    add_backbone_arguments(p)
    p.set_defaults(model=None, pretrained=None)
    p.add_argument("--image", type=Path, help="reference image (not needed for --method text)")
    p.add_argument("--caption", required=True, help="relative caption, e.g. 'is blue instead'")
    p.add_argument("--top-k", type=int, default=10, help="number of results")
    p.add_argument("--method", choices=["phi", "oti", "image", "text", "image+text"], default="phi",
                   help="how the query is built")
    p.add_argument("--phi", default=None, help="phi: searle, searle-xl or a checkpoint (default: the gallery's)")
    p.add_argument("--steps", type=int, default=DEFAULTS.oti_steps, help=f"OTI steps for --method oti ({DEFAULTS.oti_steps})")
    p.add_argument("--gallery", type=Path, default=Path(DEFAULTS.gallery), help="gallery index folder from `isearle index`")
    p.add_argument("--json", action="store_true", help="print a JSON list of {id, path, score}")
    from isearle.precision import add_precision_argument

    # One query per process: auto's start-up measurement would cost more than it saves; it pays in
    # the long-running app (`defaults.Defaults.one_shot_precision`).
    add_precision_argument(p, default=DEFAULTS.one_shot_precision)


def query_main(args: argparse.Namespace) -> int:
    from isearle.service import load_service

    session = load_service(args.gallery, model=args.model, pretrained=args.pretrained, phi=args.phi,
                           device=args.device, precision=args.precision)
    ref = session.reference(args.image) if args.image else None
    hits = session.search(ref, args.caption, args.top_k, args.method, session.oti_config(args.steps))
    rows = [{"id": h.id, "path": h.metadata.get("path"), "score": round(h.score, 6)} for h in hits]
    if args.json:
        print(json.dumps(rows))
    else:
        for h, r in zip(hits, rows, strict=True):
            print(f"{h.rank:3d}  {r['score']:.4f}  {r['id']}  {r['path'] or ''}")
    return 0
