"""Near-duplicate removal on a generated set with planted duplicates: precision, recall, time.

The set (bigtransfer.dedup.write_planted_set): procedural upstream images (100 classes x 100 =
10,000 by default) and 300 test images; 100 test images are copied into the upstream folder
resized (60-90%), re-encoded as JPEG (quality 40-80) and cropped by 2-8% per side. Same-class
images really are alike here (renders of one glyph), so false alarms are a real risk.

Embeddings come from the demo's pre-trained model (`make demo` writes runs/demo/pretrain), the
stand-in for a BiT checkpoint that nothing can download here. `--tune` scores a grid of
thresholds on a separate small set (seed 0) instead: that is how the defaults were chosen.

    python benchmarks/dedup_planted.py            # the 10k set, seed 1, default thresholds
    python benchmarks/dedup_planted.py --tune     # threshold grid on a small set, seed 0
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from bigtransfer.dedup import (
    DedupOptions,
    duplicate_rule,
    embedding_model,
    embeddings,
    image_files,
    perceptual_hashes,
    planted_precision_recall,
    run_dedup,
    scored_candidates,
    write_planted_set,
)

RESULTS = Path(__file__).parent / "results"


def tune(model: str) -> None:
    """Score every threshold combination on a tuning set (seed 0, 30 classes x 100, 30 planted)."""
    from dataclasses import replace

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        truth = write_planted_set(root, upstream_per_class=100, classes=30, test_per_class=3, planted=30, seed=0)
        opts = DedupOptions(upstream="", downstream=(), model=model, resolution=64, neighbours=10, hash_bits=16,
                            progress=False)
        up, _ = image_files(str(root / "upstream"), test_only=False)
        down, _ = image_files(str(root / "test"), test_only=True)
        device = torch.device("cpu")
        net = embedding_model(model, device)
        candidates = list(scored_candidates(embeddings(net, up, opts, device), perceptual_hashes(up, False),
                                            embeddings(net, down, opts, device), perceptual_hashes(down, False), opts))
    rows = []
    for cos in (0.9, 0.92, 0.94):
        for margin in (0.01, 0.02, 0.03):
            for identical in (0.97, 0.98, 1.01):
                for bits, hash_cos in ((4, 0.95), (6, 0.95), (8, 0.9)):
                    rule = replace(opts, cosine=cos, margin=margin, identical=identical, hash_bits=bits,
                                   hash_cosine=hash_cos)
                    found = {(down.paths[i], up.paths[j]) for i, j, c, rank, m, h in candidates
                             if duplicate_rule(c, rank, m, h, rule)}
                    hits = len(found & truth)
                    f1 = 2 * hits / (len(found) + len(truth))
                    rows.append((f1, cos, margin, identical, bits, hash_cos, hits / max(1, len(found)), hits / len(truth)))
    print("F1 cosine margin identical hash_bits hash_cosine precision recall")
    for row in sorted(rows, reverse=True)[:10]:
        print(" ".join(f"{v:.3g}" for v in row))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="runs/demo/pretrain")
    parser.add_argument("--upstream-per-class", type=int, default=100)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--planted", type=int, default=100)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--tune", action="store_true")
    args = parser.parse_args()
    if not Path(args.model).exists() and "/" in args.model:
        sys.exit(f"{args.model}: not found; run `make demo` first (or pass --model)")
    if args.tune:
        tune(args.model)
        return
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        truth = write_planted_set(root, upstream_per_class=args.upstream_per_class, classes=args.classes,
                                  test_per_class=3, planted=args.planted, seed=args.seed)
        generated = time.perf_counter() - start
        summary = run_dedup(DedupOptions(upstream=str(root / "upstream"), downstream=(str(root / "test"),),
                                         out=root / "out", model=args.model, resolution=64, progress=False))
        scores = planted_precision_recall(root / "out" / "pairs.csv", truth)
    report = {"command": " ".join(["python", *sys.argv]), "torch": torch.__version__,
              "threads": torch.get_num_threads(), "upstream_images": summary["upstream_images"],
              "test_images": args.classes * 3, "generate_seconds": round(generated, 1),
              "dedup_seconds": summary["seconds"], **scores, "settings": summary["settings"]}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "dedup_planted.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    title = (f"Planted near-duplicates: {summary['upstream_images']} upstream images (incl. {args.planted} planted "
             f"copies), {args.classes * 3} test images; embeddings from {args.model} at 64 px; "
             f"{torch.get_num_threads()} CPU threads")
    row = (f"| {scores['planted']} | {scores['found']} | {scores['true_positives']} | {scores['precision']:.3f} | "
           f"{scores['recall']:.3f} | {summary['seconds']:.1f} |")
    lines = [title, "", f"`{report['command']}`", "",
             "| planted | found | true positives | precision | recall | dedup wall time (s) |", "|---|---|---|---|---|---|",
             row]
    (RESULTS / "dedup_planted.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
