"""Few-shot sweep wall time with images decoded once per resolution vs decoded in every run.

Writes a folder of JPEGs (scikit-learn's digits, upscaled to SIDE px with a little noise, so
decoding costs what a photo of that size costs), then runs the same sweep twice in fresh
output directories: `--no-cache` (every run decodes and resizes every image it reads) and the
default (the sweep decodes each needed image once, at the train resize and the test crop).
Both runs must give identical accuracies; the script checks that and reports the ratio.

    python benchmarks/fewshot_cache.py                 # ~4 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bigtransfer.data.sources import load_source
from bigtransfer.evaluate.fewshot_sweep import SweepOptions, parse_shots, run_sweep
from bigtransfer.recipes.finetune import FinetuneOptions

RESULTS = Path(__file__).parent / "results"


def write_jpeg_folder(root: Path, side: int, test_per_class: int) -> Path:
    digits = load_source("digits", progress=False)
    rng = np.random.default_rng(0)
    for split, images in (("train", digits.train), ("val", digits.test)):
        counts: dict[int, int] = {}
        for i in range(len(images)):
            label = int(images.labels[i])
            if split == "val" and counts.get(label, 0) >= test_per_class:
                continue
            counts[label] = counts.get(label, 0) + 1
            big = Image.fromarray(images.pixels[images.rows[i]]).resize((side, side), Image.BILINEAR)
            noisy = np.clip(np.asarray(big, dtype=np.int16) + rng.integers(-12, 12, (side, side, 3)), 0, 255)
            folder = root / split / images.classes[label]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(noisy.astype(np.uint8)).save(folder / f"{i:05d}.jpg", quality=90)
    return root


def timed_sweep(data: Path, out: Path, args, cache: bool) -> tuple[float, list[float]]:
    ft = FinetuneOptions(data=str(data), model=args.model, batch=args.batch, steps=args.steps,
                         resolution=(args.resize, args.crop), flip=False, workers=args.workers, precision="fp32",
                         progress=False)
    opts = SweepOptions(finetune=ft, out=out, shots=parse_shots(args.shots), repeats=args.repeats,
                        linear_probe=False, cache=cache)
    start = time.perf_counter()
    results = run_sweep(opts)
    seconds = time.perf_counter() - start
    return seconds, [r["top1"] for r in sorted(results["runs"], key=lambda r: (str(r["shots"]), r["seed"]))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--side", type=int, default=256, help="source JPEG side in px")
    parser.add_argument("--test-per-class", type=int, default=30)
    parser.add_argument("--model", default="R[1,1,1,1]x0.5")
    parser.add_argument("--shots", default="1,5,10")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--resize", type=int, default=80)
    parser.add_argument("--crop", type=int, default=64)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = write_jpeg_folder(Path(tmp) / "jpegs", args.side, args.test_per_class)
        before, acc_before = timed_sweep(data, Path(tmp) / "no-cache", args, cache=False)
        after, acc_after = timed_sweep(data, Path(tmp) / "cache", args, cache=True)
    if acc_before != acc_after:
        sys.exit(f"accuracies differ with the cache: {acc_before} vs {acc_after}")
    report = {"command": " ".join(["python", *sys.argv]), "torch": torch.__version__,
              "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
              "settings": vars(args), "runs": len(acc_after), "seconds_decode_every_run": before,
              "seconds_decode_once": after, "speedup": before / after, "identical_accuracies": True}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "fewshot_cache.json").write_text(json.dumps(report, indent=2) + "\n")
    title = (f"Few-shot sweep, {len(acc_after)} fine-tuning runs ({args.shots} per class x {args.repeats} draws, "
             f"{args.steps} steps of {args.batch} at {args.resize}/{args.crop} px, {args.model}) on "
             f"{args.side}px JPEGs; {torch.get_num_threads()} CPU threads, {args.workers} loader worker(s)")
    lines = [title, "",
             f"`{report['command']}`", "", "| images decoded | sweep wall time (s) |", "|---|---|",
             f"| in every run (`--no-cache`) | {before:.1f} |", f"| once per resolution (default) | {after:.1f} |", "",
             f"speed-up {before / after:.2f}x; identical accuracies in both sweeps"]
    (RESULTS / "fewshot_cache.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
