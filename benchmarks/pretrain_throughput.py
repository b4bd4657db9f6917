"""Pre-training throughput (images/s per process) with the data pipeline's own rate beside it.

For each configuration: the loop `bigtransfer pretrain` runs (upstream augmentation, SGD with
weight decay, channels_last, the precision `--precision auto` picks) on an in-memory dataset,
timed per step after the first; then the loader alone over the same data. On a GPU it also
reports model FLOPs utilisation: achieved training FLOP/s (3x the forward FLOPs per image) over
the device's bf16 peak, and the same loop in plain fp32 eager for comparison.

    python benchmarks/pretrain_throughput.py                        # CPU: the demo model and R50x1 at 224
    python benchmarks/pretrain_throughput.py --device cuda --configs R50x1:224:256 --peak-tflops 989
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from train_throughput import loader_only  # benchmarks/ is on sys.path when a script runs

from bigtransfer import create_model
from bigtransfer.data.dataset import TransformedImages
from bigtransfer.data.sources import ImageSet
from bigtransfer.data.transforms import upstream_transform
from bigtransfer.train.distributed import DistContext
from bigtransfer.train.execution import ExecutionOptions
from bigtransfer.train.logbook import read_metrics
from bigtransfer.train.loop import resolve_precision, train
from bigtransfer.train.memory import forward_flops_per_image
from bigtransfer.train.recipe import TrainingRecipe
from bigtransfer.train.schedule import LRSchedule

RESULTS = Path(__file__).parent / "results"


def images(n: int, side: int, classes: int) -> ImageSet:
    """Random uint8 images at the source size a real dataset would have (upscaled crops follow)."""
    rng = np.random.default_rng(0)
    return ImageSet([str(c) for c in range(classes)], np.arange(n) % classes,
                    pixels=rng.integers(0, 255, (n, side, side, 3), dtype=np.uint8))


def loop_rate(arch: str, resolution: int, batch: int, steps: int, data, device, precision: str, workers: int,
              classes: int) -> float:
    torch.manual_seed(0)
    model = create_model(arch, num_classes=classes, zero_head=False)
    cfg = TrainingRecipe(schedule=LRSchedule(0.1, 0, (), steps), batch=batch, weight_decay=1e-4)
    execution = ExecutionOptions(workers=workers, log_every=1, checkpoint_every=10**9, progress=False,
                                 precision=precision)
    with tempfile.TemporaryDirectory() as run_dir:
        train(model, data, None, cfg, execution, Path(run_dir), DistContext(0, 1, 0, device), fingerprint="bench")
        rates = [r["images_per_s"] for r in read_metrics(Path(run_dir)) if r["kind"] == "train"][1:-1]
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--configs", nargs="+", default=["R14x0.5:32:128:32", "R50x1:224:32:256"],
                        help="ARCH:RESOLUTION:BATCH[:SOURCE_SIDE] (source images are SOURCE_SIDE px squares)")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's dense bf16 peak, for MFU")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    rows = []
    for spec in args.configs:
        arch, res, batch, *side = spec.split(":")
        res, batch, side = int(res), int(batch), int(side[0]) if side else int(res)
        data = TransformedImages(images(batch * (args.steps + 1), side, args.classes),
                                 upstream_transform(res))
        flops = forward_flops_per_image(create_model(arch, num_classes=args.classes).config, res)
        precision = resolve_precision("auto", device, flops)
        row = {"arch": arch, "resolution": res, "batch": batch, "source_side": side, "precision": precision,
               "forward_gflops_per_image": flops / 1e9,
               "images_per_s": loop_rate(arch, res, batch, args.steps, data, device, precision, args.workers,
                                         args.classes),
               "loader_images_per_s": loader_only(data, batch, args.steps, args.workers)}
        if device.type == "cuda":
            row["fp32_eager_images_per_s"] = loop_rate(arch, res, batch, args.steps, data, device, "fp32",
                                                       args.workers, args.classes)
            if args.peak_tflops:
                row["mfu"] = 3 * flops * row["images_per_s"] / (args.peak_tflops * 1e12)
        rows.append(row)
        print(json.dumps(row), flush=True)
    report = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "torch": torch.__version__,
              "device": args.device if device.type == "cpu" else torch.cuda.get_device_name(device),
              "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
              "workers": args.workers, "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    stem = args.out or f"pretrain_{device.type}"
    (RESULTS / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [(f"Pre-training step per process on {report['device']} ({report['threads']} threads), "
              f"torch {torch.__version__}, {args.workers} loader worker(s)"), "", f"`{report['command']}`", "",
             "| model | resolution | batch | precision | GFLOP/img (fwd) | train img/s | loader img/s |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['arch']} | {r['resolution']} | {r['batch']} | {r['precision']} | "
                     f"{r['forward_gflops_per_image']:.2f} | {r['images_per_s']:.1f} | {r['loader_images_per_s']:.1f} |")
    (RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
