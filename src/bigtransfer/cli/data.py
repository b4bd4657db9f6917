"""Verbs that prepare data: webdataset shards, VTAB tasks from Hugging Face, de-duplication."""

from __future__ import annotations

from pathlib import Path

from ..errors import BigTransferError
from .common import (
    verb,
)


def _add_pack(sub) -> None:
    p = verb(sub, "pack", "Pack an image folder, manifest or built-in set into webdataset tar shards.",
              "  bigtransfer pack --data ~/data/imagenet --out shards/imagenet --shard-size 5000\n"
              "  bigtransfer pack --data tags.csv --out shards/tags\n"
              "Shards are read by `pretrain --data shards/imagenet`; upload them anywhere webdataset reads.\n")
    p.add_argument("--data", required=True, help="image folder, CSV manifest, CIFAR archive, digits or glyphs")
    p.add_argument("--val-fraction", type=float, default=None, help="hold out this fraction as the test split")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--shard-size", type=int, default=1000, help="images per shard (default 1000)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(run=_run_pack)


def _run_pack(args) -> int:
    from ..data.shards import pack
    from ..data.sources import load_source

    splits = load_source(args.data, val_fraction=args.val_fraction, progress=not args.quiet,
                         require_test=False)
    meta = pack(splits, args.out, shard_size=args.shard_size, progress=not args.quiet)
    for name, info in meta["splits"].items():
        print(f"{name}: {info['count']} images in {len(info['shards'])} shard(s)")
    print(f"wrote {args.out}/dataset.json")
    return 0


def _add_vtab_import(sub) -> None:
    p = verb(sub, "vtab-import", "Write a Hugging Face dataset saved to disk as a VTAB task folder (PNG files).",
              "  bigtransfer vtab-import --hf ~/hf/dtd --root ~/data/vtab --task dtd\n"
              "  bigtransfer vtab-import --hf ~/hf/eurosat --root ~/data/vtab --task eurosat --image-column img\n")
    p.add_argument("--hf", type=Path, required=True, help="a folder written by datasets' save_to_disk")
    p.add_argument("--root", type=Path, required=True, help="VTAB root; the task goes to ROOT/TASK/")
    p.add_argument("--task", required=True, help="the task's VTAB name (see `bigtransfer vtab --help`)")
    p.add_argument("--image-column", default="image")
    p.add_argument("--label-column", default="label")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(run=_run_vtab_import)


def _run_vtab_import(args) -> int:
    from ..data.hf_import import import_hf_dataset
    from ..data.vtab_tasks import GROUP_OF

    if args.task not in GROUP_OF:
        raise BigTransferError(f"--task: unknown VTAB task {args.task!r}")
    written = import_hf_dataset(args.hf, args.root / args.task, image_column=args.image_column,
                                label_column=args.label_column, progress=not args.quiet)
    print(", ".join(f"{n} {split} images" for split, n in written.items()) + f" in {args.root / args.task}")
    return 0


def _add_dedup(sub) -> None:
    p = verb(sub, "dedup", "Find near-duplicates of test images in an upstream collection (paper Supp. C).",
              "  bigtransfer dedup --upstream ~/data/imagenet21k.csv --downstream ~/data/cifar10,~/data/pets \\\n"
              "      --model BiT-M-R50x1 --out runs/dedup\n"
              "  bigtransfer dedup --upstream ~/data/web --downstream digits --model none --out runs/dd  # pixels only\n"
              "  bigtransfer pretrain --data runs/dedup/upstream_filtered.csv ...   # pre-train without them\n"
              "Candidates come from identical thumbnails, a pixel descriptor and the model's embedding (faiss);\n"
              "each is verified on aligned grey pixels at a canonical 32x32 size. A self-test copies --self-test\n"
              "test images with every web-copy edit, measures what dedup finds of them (per edit) and drops them.\n"
              "Writes pairs.csv, upstream_filtered.csv, contact_sheet.png/.html and summary.json.\n")
    p.add_argument("--upstream", required=True, help="upstream image folder or CSV manifest")
    p.add_argument("--downstream", required=True,
                   help="comma-separated downstream sources; each one's test split (all its images if it has none)")
    p.add_argument("--model", default="BiT-M-R50x1",
                   help="model whose embedding also proposes candidates (default %(default)s); 'none': pixels only")
    p.add_argument("--embedding-layer", default="stage3",
                   help="pre-logits or stage1..stage4: earlier stages tell images of one class apart (default stage3)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--resolution", type=int, default=128, help="embedding input size (default 128)")
    p.add_argument("--neighbours", type=int, default=10, help="nearest upstream images per query (default 10)")
    p.add_argument("--self-test", type=int, default=100, metavar="N",
                   help="test images copied with every edit to measure recall on your data (default 100; 0: off)")
    p.add_argument("--seed", type=int, default=0, help="which test images the self-test copies, and how")
    p.add_argument("--index", choices=("auto", "exact", "approximate"), default="auto",
                   help="faiss search: exact, HNSW, or auto (HNSW above 200,000 upstream images)")
    tol = p.add_argument_group("what a copy may differ by (grey levels on the canonical 32x32 thumbnail)")
    tol.add_argument("--relative-residual", type=float, default=None, metavar="R",
                     help="residual allowed per grey level of contrast (default 0.10)")
    tol.add_argument("--absolute-residual", type=float, default=None, metavar="A",
                     help="plus this many grey levels (default 0.5)")
    tol.add_argument("--residual-per-detail", type=float, default=None, metavar="K",
                     help="and at most K times the flatter image's fine detail (default 1.0)")
    tol.add_argument("--max-residual-structure", type=float, default=None, metavar="F",
                     help="a faint match using over half its allowed residual: at most this share of the "
                          "residual may survive a 1.5 px blur (edits leave noise, different images structure; "
                          "default 0.7, 1 turns the check off)")
    tol.add_argument("--min-detail-correlation", type=float, default=None, metavar="C",
                     help="at the best alignment, the two images' fine detail less a shared line profile (a "
                          "horizon) must correlate at least this much (a copy keeps its detail; default 0.5, "
                          "-1 turns the check off)")
    tol.add_argument("--min-contrast", type=float, default=None, metavar="S",
                     help="images flatter than this standard deviation are never verified (default 4)")
    tol.add_argument("--min-detail", type=float, default=None, metavar="D",
                     help="... nor images with less detail than this, e.g. smooth ramps (default 1)")
    tol.add_argument("--max-shift", type=int, default=None, metavar="PX", help="shift search, each way (default 2)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(run=_run_dedup)


def _run_dedup(args) -> int:
    from dataclasses import replace

    from ..dedup import DedupOptions, Tolerance, run_dedup
    from ..dedup.report import self_test_lines

    overrides = {name: value for name, value in (
        ("relative", args.relative_residual), ("absolute", args.absolute_residual),
        ("per_detail", args.residual_per_detail), ("max_structure", args.max_residual_structure),
        ("min_detail_correlation", args.min_detail_correlation),
        ("min_contrast", args.min_contrast), ("min_detail", args.min_detail), ("shift", args.max_shift))
        if value is not None}
    summary = run_dedup(DedupOptions(
        upstream=args.upstream, downstream=tuple(d for d in args.downstream.split(",") if d), out=args.out,
        model=args.model, embedding_layer=args.embedding_layer, resolution=args.resolution,
        neighbours=args.neighbours, tolerance=replace(Tolerance(), **overrides), self_test=args.self_test,
        seed=args.seed, index=args.index, batch=args.batch, workers=args.workers, device=args.device,
        progress=not args.quiet))
    stages = ", ".join(f"{n} {stage}" for stage, n in summary["pairs_by_stage"].items())
    print(f"{summary['pairs']} near-duplicate pairs ({stages}); {summary['upstream_duplicates']} of "
          f"{summary['upstream_images']} upstream images removed in {args.out / 'upstream_filtered.csv'} "
          f"({summary['seconds']['total']:.0f}s)")
    print("\n".join(self_test_lines(summary.get("self_test"))))
    return 0


VERBS = (_add_pack, _add_vtab_import, _add_dedup,)
