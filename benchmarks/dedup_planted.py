"""Near-duplicate removal on a generated set with planted duplicates: precision, recall, time.

The set (bigtransfer.dedup.write_planted_set): procedural upstream images (100 classes x 100 =
10,000 by default) and 300 test images; 100 test images are copied into the upstream folder
resized (60-90%), re-encoded as JPEG (quality 40-80) and cropped by 2-8% per side. Same-class
images really are alike here (renders of one glyph), so false alarms are a real risk.

Embeddings come from a small glyph-pre-trained model (`make demo` writes runs/demo/pretrain;
benchmarks/dedup_real.py writes runs/dedup-real/models/pretrained), the stand-in for a BiT
checkpoint that nothing can download here; they only propose candidates, pixels decide. The
tolerances are dedup's defaults, chosen on other data (benchmarks/dedup_real.py --tune).
These copies are cropped by up to 8% per side, more than the web-copy edits
benchmarks/dedup_real.py measures.

    python benchmarks/dedup_planted.py --model runs/dedup-real/models/pretrained
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from bigtransfer.dedup import DedupOptions, planted_precision_recall, run_dedup, write_planted_set

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="runs/demo/pretrain")
    parser.add_argument("--upstream-per-class", type=int, default=100)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--planted", type=int, default=100)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    if not Path(args.model).exists() and "/" in args.model:
        sys.exit(f"{args.model}: not found; run `make demo` first (or pass --model)")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        truth = write_planted_set(root, upstream_per_class=args.upstream_per_class, classes=args.classes,
                                  test_per_class=3, planted=args.planted, seed=args.seed)
        generated = time.perf_counter() - start
        summary = run_dedup(DedupOptions(upstream=str(root / "upstream"), downstream=(str(root / "test"),),
                                         out=root / "out", model=args.model, resolution=64, self_test=100,
                                         progress=False))
        scores = planted_precision_recall(root / "out" / "pairs.csv", truth)
    report = {"command": " ".join(["python", *sys.argv]), "torch": torch.__version__,
              "threads": torch.get_num_threads(), "upstream_images": summary["upstream_images"],
              "test_images": args.classes * 3, "generate_seconds": round(generated, 1),
              "dedup_seconds": summary["seconds"]["total"], **scores, "pairs_by_stage": summary["pairs_by_stage"],
              "self_test": summary["self_test"], "settings": summary["settings"]}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "dedup_planted.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    title = (f"Planted near-duplicates: {summary['upstream_images']} upstream images (incl. {args.planted} planted "
             f"copies), {args.classes * 3} test images; embeddings from {args.model} at 64 px; "
             f"{torch.get_num_threads()} CPU threads")
    row = (f"| {scores['planted']} | {scores['found']} | {scores['true_positives']} | {scores['precision']:.3f} | "
           f"{scores['recall']:.3f} | {summary['seconds']['total']:.1f} |")
    lines = [title, "", f"`{report['command']}`", "",
             "| planted | found | true positives | precision | recall | dedup wall time (s) |", "|---|---|---|---|---|---|",
             row]
    (RESULTS / "dedup_planted.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
