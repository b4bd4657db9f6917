"""A short detection run on generated COCO-format data: COCO AP and the time it took.

160 training and 40 validation images (96 px) with 1-3 coloured rectangles each on noise
(bigtransfer.detection.coco.write_rectangles), RetinaNet on a small randomly initialised BiT
body (R[1,1,1,1]x0.5, GN+WS) with a 64-channel FPN, the paper's plan shortened: 30 epochs at
batch 8, lr /10 at epochs 16 and 22, flips and scale jitter, focal loss; plus a short warm-up and
gradient clipping (not in the paper) because the body starts from random weights here.

    python benchmarks/detection_rectangles.py        # ~3 minutes on 2 CPU cores
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from bigtransfer.detection.coco import write_rectangles
from bigtransfer.detection.train import DetectOptions, run_detect_train

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        train = write_rectangles(root / "train", 160, size=96, seed=0)
        val = write_rectangles(root / "val", 40, size=96, seed=1)
        start = time.perf_counter()
        summary = run_detect_train(DetectOptions(
            data=str(train), val_data=str(val), model="R[1,1,1,1]x0.5", out=root / "run", resolution=96, batch=8,
            base_lr=0.02, epochs=30, decay_epochs=(16, 22), warmup_steps=30, grad_clip=1.0, fpn_channels=64,
            progress=False))
        seconds = time.perf_counter() - start
    report = {"command": " ".join(["python", *sys.argv]), "torch": torch.__version__,
              "threads": torch.get_num_threads(), "steps": summary["steps"], "seconds": round(seconds, 1),
              **summary["final"]}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "detection_rectangles.json").write_text(json.dumps(report, indent=2) + "\n")
    m = summary["final"]
    title = (f"RetinaNet + BiT R[1,1,1,1]x0.5 on generated rectangles (160 train / 40 val images, 96 px), "
             f"{summary['steps']} steps of 8, {torch.get_num_threads()} CPU threads")
    row = (f"| {m['AP']:.3f} | {m['AP50']:.3f} | {m['AP75']:.3f} | {m['AP_small']:.3f} | {m['AP_medium']:.3f} "
           f"| {seconds:.0f} |")
    lines = [title, "", f"`{report['command']}`", "",
             "| AP | AP50 | AP75 | AP small | AP medium | wall time (s) |", "|---|---|---|---|---|---|", row]
    (RESULTS / "detection_rectangles.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
