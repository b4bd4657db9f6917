"""Verbs about weights files: the released models, downloading, converting, inspecting."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import BigTransferError
from .common import (
    verb,
)


def _add_models(sub) -> None:
    p = verb(sub, "models", "List the known BiT models, which source has each (the authors' bucket, the Hugging "
                            "Face hub) and whether it is in the local cache.",
              "  bigtransfer models\n  bigtransfer models --all --json > zoo.json\n")
    p.add_argument("--all", action="store_true", help="also list the 285 VTAB-1k fine-tuned files")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(run=_run_models)


def _run_models(args) -> int:
    from ..models import hub, zoo
    from ..models.resnetv2 import parameter_count

    rows = []
    for entry in zoo.known_models(include_vtab=args.all):
        found = zoo.cached_file(entry)
        copy = hub.hub_copy(entry.name)
        rows.append({
            "name": entry.name,
            "architecture": entry.arch_name,
            "parameters": parameter_count(entry.arch, entry.num_classes),
            "head": entry.num_classes,
            "sources": ["bucket", "hub"] if copy else ["bucket"],
            "hub_repo": copy.repo_id if copy else None,
            "cached": found is not None,
            "cached_from": found[1] if found else None,
            "description": entry.description,
        })
    if args.json:
        print(json.dumps({"cache": str(zoo.cache_dir()), "models": rows}, indent=2))
        return 0
    print(f"cache: {zoo.cache_dir()}  (set BIGTRANSFER_HOME to move it)")
    header = f"{'name':<34} {'arch':<7} {'params':>9} {'head':>6}  {'cached':<6}  {'sources':<10}  description"
    print(header)
    print("-" * len(header))
    for row in rows:
        print(f"{row['name']:<34} {row['architecture']:<7} {row['parameters'] / 1e6:>8.1f}M "
              f"{row['head']:>6}  {row['cached_from'] or 'no':<6}  {'+'.join(row['sources']):<10}  "
              f"{row['description']}")
    if not args.all:
        print(f"\n(+ {len(zoo.known_models(True)) - len(rows)} VTAB-1k fine-tuned files: bigtransfer models --all)")
    print("hub copies are timm's: `bigtransfer models --json` names each repository")
    return 0


def _add_download(sub) -> None:
    p = verb(sub, "download", "Fetch released BiT weights into the cache (resumable, SHA-256 recorded), from the "
                              "authors' bucket or the Hugging Face hub.",
              "  bigtransfer download BiT-M-R50x1\n"
              "  bigtransfer download BiT-S-R101x3 BiT-M-R50x1-run0-caltech101\n"
              "  bigtransfer download BiT-M-R50x1 --source hub      # timm/resnetv2_50x1_bit.goog_in21k\n"
              "  bigtransfer download BiT-M-R50x1 --source auto     # the bucket, else the hub\n"
              "  BIGTRANSFER_BASE_URL=http://mirror.local/bit_models bigtransfer download BiT-M-R50x1\n"
              "  HF_ENDPOINT=https://hf-mirror.example bigtransfer download BiT-M-R50x1 --source hub\n"
              "  bigtransfer download BiT-M-R152x4 --deadline 21600   # a slow line: six hours for the largest file\n"
              "the hub's files go to huggingface_hub's cache (HF_HOME); HF_HUB_OFFLINE=1 uses only that cache.\n"
              "a file is kept only if it is the released model (format, architecture, head); a transfer is cut\n"
              "off past the largest size that model can take, after --stall-timeout without a byte, or at\n"
              "--deadline (from the bucket, what arrived is kept and the next run resumes)\n")
    p.add_argument("names", nargs="+", metavar="NAME", help="released model names (see `bigtransfer models`)")
    p.add_argument("--source", choices=("bucket", "hub", "auto"), default="bucket",
                   help="bucket: the authors' (default); hub: the Hugging Face hub's copy (timm's, needs "
                        "huggingface_hub); auto: the bucket, and the hub if that fails")
    p.add_argument("--force", action="store_true", help="download again even if the file is cached")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--stall-timeout", default=None, metavar="SECONDS",
                   help="give up on a server that sends nothing for this long (default 60, or "
                        "$BIGTRANSFER_DOWNLOAD_STALL_TIMEOUT)")
    p.add_argument("--deadline", default=None, metavar="SECONDS",
                   help="give up on a file not finished in this long (default 7200, or "
                        "$BIGTRANSFER_DOWNLOAD_DEADLINE)")
    p.set_defaults(run=_run_download)


def _run_download(args) -> int:
    from ..models import hub, zoo
    from ..models.transfer import Limits

    args.limits = Limits.resolve(_seconds("--stall-timeout", args.stall_timeout), _seconds("--deadline", args.deadline))
    entries = []
    for name in args.names:
        entry = zoo.lookup(name)
        if entry is None:
            raise BigTransferError(f"unknown model {name!r}; `bigtransfer models --all` lists the known names")
        if args.source == "hub" and hub.hub_copy(entry.name) is None:
            raise BigTransferError(f"{entry.name} has no copy on the Hugging Face hub (only the authors' bucket "
                                   f"has it): bigtransfer download {entry.name} --source bucket")
        entries.append(entry)
    for entry in entries:
        if not args.force and _already_present(entry, args.source):
            continue
        if args.source == "bucket" or (args.source == "auto" and hub.hub_copy(entry.name) is None):
            _from_bucket(entry, args)
        elif args.source == "hub":
            _from_hub(entry, args)
        else:
            try:
                _from_bucket(entry, args)
            except BigTransferError as err:
                print(f"{entry.name}: authors' bucket: {err}; trying the Hugging Face hub "
                      f"({hub.hub_copy(entry.name).repo_id})", flush=True)
                _from_hub(entry, args)
    return 0


def _seconds(flag: str, text: str | None) -> float | None:
    from ..models.transfer import parse_seconds

    try:
        return None if text is None else parse_seconds(text)
    except ValueError as err:
        raise BigTransferError(f"{flag}: {err}") from None


def _already_present(entry, source: str) -> bool:
    """Report a cached copy (checking its recorded SHA-256 and that it is the model); False if there is none."""
    from ..models import hub, zoo

    bucket_file = zoo.cached_path(entry)
    hub_file = hub.cached_file(entry.name)
    if source != "hub" and bucket_file.is_file():
        recorded = zoo.recorded_sha256(entry)
        if recorded is not None and not zoo.verify(entry):
            raise BigTransferError(f"{bucket_file}: SHA-256 differs from the one recorded at download; "
                                   f"re-fetch with: bigtransfer download --force {entry.name}")
        try:
            zoo.check_cached(entry)
        except BigTransferError as err:
            raise BigTransferError(f"{err}; re-fetch with: bigtransfer download --force {entry.name}") from None
        print(f"{entry.name}: already present at {bucket_file} "
              f"({'SHA-256 verified' if recorded else 'no recorded SHA-256'})")
        return True
    if source != "bucket" and hub_file is not None:
        if not hub.verify(entry.name):
            raise BigTransferError(f"{hub_file}: SHA-256 differs from the one recorded at download; re-fetch "
                                   f"with: bigtransfer download --force --source hub {entry.name}")
        try:
            hub.verify_contents(entry)
        except BigTransferError as err:
            raise BigTransferError(f"{err}; re-fetch with: bigtransfer download --force --source hub "
                                   f"{entry.name}") from None
        print(f"{entry.name}: already present at {hub_file} (from the hub, SHA-256 verified)")
        return True
    return False


def _from_bucket(entry, args) -> None:
    from ..models import zoo

    path = zoo.download(entry, force=args.force, progress=not args.quiet, limits=args.limits)
    print(f"{entry.name}: saved {path} (sha256 {zoo.recorded_sha256(entry)})")


def _from_hub(entry, args) -> None:
    from ..models import hub

    path = hub.download(entry, force=args.force, progress=not args.quiet, limits=args.limits)
    record = hub.read_record(entry.name)
    print(f"{entry.name}: saved {path} (from the hub, {record['repo_id']} at {record['revision'][:12]}; "
          f"sha256 {record['sha256']})")


def _add_convert(sub) -> None:
    p = verb(sub, "convert", "Convert any weights bigtransfer reads (authors' .npz, timm, transformers) to our "
                             ".safetensors.",
              "  bigtransfer convert BiT-M-R50x1 bit_m_r50x1.safetensors\n"
              "  bigtransfer convert ~/Downloads/BiT-S-R101x1.npz r101.safetensors\n"
              "  bigtransfer convert ~/hf/bit-50 bit50.safetensors          # a transformers folder\n")
    p.add_argument("source", help="a released name (must be cached), a .npz/.safetensors file, or a "
                                  "transformers checkpoint folder")
    p.add_argument("dest", type=Path, help="output .safetensors path")
    p.add_argument("--overwrite", action="store_true", help="replace DEST if it exists")
    p.set_defaults(run=_run_convert)


def _run_convert(args) -> int:
    from ..models import checkpoint, create_model, zoo
    from ..rundir import check_new_file

    entry = zoo.lookup(args.source)
    source = zoo.require_cached(entry) if entry else Path(args.source)
    if args.dest.suffix != ".safetensors":
        raise BigTransferError(f"{args.dest}: the output must end in .safetensors")
    check_new_file(args.dest, "convert DEST", overwrite=args.overwrite)
    summary = checkpoint.summarize(source)
    if summary.num_classes is None:
        raise BigTransferError(f"{source}: the file has no head; nothing to convert it to a classifier with")
    model = create_model(summary.arch.name, weights=source)
    meta = checkpoint.read_metadata(source)
    provenance = {"source": str(entry.relpath if entry else source.name), "format": meta["format"],
                  "sha256": zoo.sha256_of(checkpoint.weights_file(source))}
    checkpoint.save_checkpoint(model, args.dest, class_names=meta.get("class_names"),
                               resolution=meta.get("resolution"), provenance=provenance)
    print(f"wrote {args.dest} ({summary.describe()})")
    return 0


def _add_info(sub) -> None:
    p = verb(sub, "info", "Show what a weights file holds: format, architecture, head, metadata.",
              "  bigtransfer info BiT-M-R50x1.npz\n  bigtransfer info runs/pets/final.safetensors\n"
              "  bigtransfer info resnetv2_50x1_bit.safetensors     # a timm state dict\n"
              "  bigtransfer info ~/hf/bit-50                       # a transformers folder (config.json + "
              "model.safetensors)\n")
    p.add_argument("path", type=Path, help="a weights file, or a transformers / timm checkpoint folder")
    p.set_defaults(run=_run_info)


def _run_info(args) -> int:
    from ..models import checkpoint

    print(json.dumps(checkpoint.read_metadata(args.path), indent=2))
    return 0


VERBS = (_add_models, _add_download, _add_convert, _add_info,)
