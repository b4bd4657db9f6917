"""Training throughput of `bigtransfer finetune`'s loop vs a plain fp32 eager loop, same model and data.

The baseline is written the way the authors' reference PyTorch code trains: torchvision
ImageFolder + DataLoader(shuffle) + Resize/RandomCrop/Flip/ToTensor/Normalize, fp32, NCHW,
loss.backward(), optimizer.step(). Ours is bigtransfer's own loop (train/loop.py) as
`finetune --precision auto` runs it: channels_last at this size (train/layout.py), and bf16 autocast where the
device does bf16 natively and it pays (GPUs; AMX/AVX512-BF16 CPUs for >= 1 GFLOP per image). Both see the same generated JPEG
folder (decoding is part of the cost) and the same R50x1 weights. The loader-only rate shows
whether data loading could be the bottleneck. Rounds alternate (ours, baseline, ...) so drift
hits both.

    python benchmarks/train_throughput.py                               # CPU, R50x1, 128 px, batch 32
    python benchmarks/train_throughput.py --device cuda --batch 256 --workers 12 --steps 30
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torchvision as tv
from PIL import Image

from bigtransfer import create_model
from bigtransfer.data.dataset import TransformedImages
from bigtransfer.data.sources import image_folder
from bigtransfer.data.transforms import train_transform
from bigtransfer.train.distributed import DistContext
from bigtransfer.train.execution import ExecutionOptions
from bigtransfer.train.logbook import read_metrics
from bigtransfer.train.loop import resolve_precision, train
from bigtransfer.train.memory import forward_flops_per_image
from bigtransfer.train.recipe import TrainingRecipe
from bigtransfer.train.schedule import LRSchedule

RESULTS = Path(__file__).parent / "results"


def make_folder(root: Path, images: int, classes: int, size: int) -> Path:
    rng = np.random.default_rng(0)
    for i in range(images):
        folder = root / "train" / f"class{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / f"{i}.jpg", quality=90)
    return root


def fresh_model(num_classes: int):
    torch.manual_seed(0)
    return create_model("R50x1", num_classes=num_classes, zero_head=False)


def run_ours(data, args, ctx, steps: int, work: Path) -> list[float]:
    """Per-step images/s of our loop (first step and the final checkpointing step dropped)."""
    run_dir = Path(tempfile.mkdtemp(dir=work))
    model = fresh_model(args.classes)
    precision = resolve_precision("auto", ctx.device, forward_flops_per_image(model.config, args.crop))
    cfg = TrainingRecipe(schedule=LRSchedule(0.003, 0, (), steps), batch=args.batch)
    execution = ExecutionOptions(workers=args.workers, log_every=1, checkpoint_every=10**9, progress=False,
                                 precision=precision)
    train(model, data, None, cfg, execution, run_dir, ctx, fingerprint="bench")
    return [r["images_per_s"] for r in read_metrics(run_dir) if r["kind"] == "train"][1:-1]


def run_baseline(folder: Path, args, device: torch.device, steps: int) -> list[float]:
    """The reference style: torchvision ImageFolder/DataLoader, fp32 NCHW, a plain loop."""
    transform = tv.transforms.Compose([
        tv.transforms.Resize((args.resize, args.resize)), tv.transforms.RandomCrop(args.crop),
        tv.transforms.RandomHorizontalFlip(), tv.transforms.ToTensor(),
        tv.transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    ])
    dataset = tv.datasets.ImageFolder(str(folder / "train"), transform=transform)
    sampler = torch.utils.data.RandomSampler(dataset, replacement=True, num_samples=args.batch * steps)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch, sampler=sampler, num_workers=args.workers,
                                         pin_memory=device.type == "cuda", drop_last=True)
    model = fresh_model(args.classes).to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.003, momentum=0.9)
    rates, last = [], time.perf_counter()
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        now = time.perf_counter()
        rates.append(args.batch / (now - last))
        last = now
    return rates[1:-1]


def loader_only(data, batch: int, steps: int, workers: int) -> float:
    """Images per second of the data pipeline alone (the same sampler the loop uses), after one batch."""
    from torch.utils.data import DataLoader

    from bigtransfer.data.sampler import ChunkSampler, StepBatches

    loader = DataLoader(data, batch_sampler=ChunkSampler(StepBatches(len(data), batch, seed=0), 0, steps, [0]),
                        num_workers=workers)
    it = iter(loader)
    next(it)
    start = time.perf_counter()
    n = sum(len(y) for _, y in it)
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=8, help="steps per round (first and last are not counted)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--source-size", type=int, default=200, help="side of the generated JPEGs")
    parser.add_argument("--resize", type=int, default=160)
    parser.add_argument("--crop", type=int, default=128)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    ctx = DistContext(0, 1, 0, device)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        folder = make_folder(work / "data", args.images, args.classes, args.source_size)
        splits = image_folder(folder, progress=False)
        data = TransformedImages(splits.train, train_transform(args.resize, args.crop))
        loader_rate = loader_only(data, args.batch, max(args.steps, 8), args.workers)
        print(f"loader only: {loader_rate:.1f} img/s with {args.workers} worker(s)", flush=True)
        ours, base, ratios = [], [], []
        for r in range(args.rounds):
            o = run_ours(data, args, ctx, args.steps, work)
            b = run_baseline(folder, args, device, args.steps)
            ours += o
            base += b
            ratios.append(statistics.median(o) / statistics.median(b))
            print(f"round {r + 1}: ours {statistics.median(o):.1f} img/s, baseline {statistics.median(b):.1f} img/s",
                  flush=True)
    report = {
        "benchmark": f"R50x1 training step, {args.crop} px (resize {args.resize}), batch {args.batch}",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "device": args.device if device.type == "cpu" else torch.cuda.get_device_name(device),
        "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "workers": args.workers,
        "ours_images_per_s": statistics.median(ours), "baseline_images_per_s": statistics.median(base),
        "speedup_per_round": ratios, "loader_only_images_per_s": loader_rate,
        "ours_precision": ("bf16 autocast" if resolve_precision(
            "auto", device, forward_flops_per_image(fresh_model(args.classes).config, args.crop)) == "bf16"
            else "fp32") + " + channels_last",
    }
    RESULTS.mkdir(exist_ok=True)
    stem = args.out or f"train_{device.type}"
    (RESULTS / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    table = (f"{report['benchmark']} on {report['device']} ({report['threads']} threads), torch {torch.__version__}\n\n"
             f"`{report['command']}`\n\n"
             "| loop | images/s (median) |\n|---|---|\n"
             f"| bigtransfer ({report['ours_precision']}) | {report['ours_images_per_s']:.1f} |\n"
             f"| plain fp32 eager loop (reference style) | {report['baseline_images_per_s']:.1f} |\n"
             f"| data loader alone ({args.workers} worker(s)) | {loader_rate:.1f} |\n\n"
             f"ours / baseline per round: {', '.join(f'{r:.3f}' for r in ratios)}\n")
    (RESULTS / f"{stem}.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
