"""Detection with a BiT backbone (paper section 3.7, Supp. E): the plan, training, COCO evaluation.

The paper's protocol is the default plan: RetinaNet, 1024 px inputs, SGD with lr 0.08 at batch
256 (scaled linearly with the batch), momentum 0.9, weight decay 1e-4, 30 epochs with the lr
divided by 10 at epochs 16 and 22, random flips and scale jitter, focal loss (alpha 0.25,
gamma 2). Every value can be overridden. A run directory holds config.json, metrics.jsonl,
checkpoints/latest.safetensors (atomic; re-running the command resumes), final.safetensors and
summary.json with the COCO metrics of the validation set (pycocotools).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from .. import rundir
from ..atomic import write_json, write_safetensors, write_text
from ..data.sampler import ChunkSampler, StepBatches
from ..errors import BigTransferError
from ..inference.predictor import resolve_device
from ..safe_text import load_json
from ..train.checkpointing import (
    gather_train_state,
    read_train_state,
    restore_train_state,
    save_train_state,
)
from ..train.distributed import DistContext
from ..train.logbook import Logbook
from ..train.run import TrainingRun
from ..train.schedule import LRSchedule
from .coco import CocoSet, CocoTraining, collate, read_coco
from .model import build_retinanet

PAPER_BATCH, PAPER_LR = 256, 0.08
COCO_STATS = ("AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large")


@dataclass
class DetectOptions:
    data: str  # COCO json of the training images
    val_data: str | None = None  # COCO json of the validation images
    images: str | None = None  # folder of the training images (default: the json's folder)
    val_images: str | None = None
    model: str = "BiT-M-R101x3"  # the paper's backbone
    out: Path = Path("runs/detect")
    resolution: int = 1024
    batch: int = PAPER_BATCH
    base_lr: float | None = None  # default 0.08 x batch / 256
    epochs: float = 30
    decay_epochs: tuple[float, ...] = (16, 22)
    warmup_steps: int = 0
    momentum: float = 0.9
    weight_decay: float = 1e-4
    jitter: tuple[float, float] = (0.8, 1.25)
    fpn_channels: int = 256
    grad_clip: float | None = None  # max gradient norm (not in the paper; steadies small-batch runs)
    seed: int = 0
    workers: int = 0
    device: str = "auto"
    checkpoint_every: int = 200
    log_every: int = 10
    progress: bool = True


def plan(opts: DetectOptions, train_images: int) -> dict:
    """The resolved schedule: steps, lr, decays (what config.json records)."""
    if opts.batch < 1 or opts.epochs <= 0 or train_images < 1:
        raise BigTransferError("--batch and --epochs must be positive and the training set non-empty")
    steps_per_epoch = math.ceil(train_images / opts.batch)
    total = max(1, round(opts.epochs * steps_per_epoch))
    lr = opts.base_lr if opts.base_lr is not None else PAPER_LR * opts.batch / PAPER_BATCH
    decays = tuple(min(total, round(e * steps_per_epoch)) for e in opts.decay_epochs)
    return {"steps": total, "steps_per_epoch": steps_per_epoch, "lr": lr, "decay_steps": decays,
            "warmup_steps": opts.warmup_steps, "batch": opts.batch, "resolution": opts.resolution}


def run_detect_train(opts: DetectOptions) -> dict:
    """Train (or resume) a BiT RetinaNet; returns the summary with the validation COCO metrics."""
    ctx = DistContext(0, 1, 0, resolve_device(opts.device))  # one process
    # The finished model carries no fingerprint: the training checkpoint stays beside it.
    with TrainingRun.claim(Path(opts.out), "detect-train", ctx, final_stands_in=False) as run:
        return _detect_train(opts, run)


def _detect_train(opts: DetectOptions, run: TrainingRun) -> dict:
    from tqdm.auto import tqdm

    train_set = read_coco(opts.data, opts.images)
    val_set = read_coco(opts.val_data, opts.val_images) if opts.val_data else None
    if val_set is not None and val_set.category_ids != train_set.category_ids:
        raise BigTransferError(f"--val-data {opts.val_data}: its categories differ from --data's")
    p = plan(opts, len(train_set.images))
    out, device = run.dir, run.ctx.device
    settings = {"plan": p, "model": opts.model, "data": str(opts.data), "num_classes": train_set.num_classes,
                "categories": dict(zip(train_set.category_ids, train_set.category_names)), "seed": opts.seed,
                "jitter": list(opts.jitter), "momentum": opts.momentum, "weight_decay": opts.weight_decay,
                "fpn_channels": opts.fpn_channels, "grad_clip": opts.grad_clip}
    # No reuse of a finished run: --val-data is not in the fingerprint, and a re-run re-evaluates.
    run.identify(settings)
    fingerprint = run.fingerprint
    torch.manual_seed(opts.seed)  # the new heads' initialisation is part of the run
    model = build_retinanet(opts.model, train_set.num_classes, min_size=opts.resolution, max_size=opts.resolution,
                            fpn_channels=opts.fpn_channels).to(device)
    run.write_config(body=model.backbone.body_config, options={k: str(v) for k, v in asdict(opts).items()})
    params = [q for q in model.parameters() if q.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.0, momentum=opts.momentum, weight_decay=opts.weight_decay)
    schedule = LRSchedule(p["lr"], p["warmup_steps"], p["decay_steps"], p["steps"])
    checkpoint, start = run.checkpoint, 0
    if checkpoint.is_file():
        state, momentum, start, _ = read_train_state(checkpoint, fingerprint)
        restore_train_state(model, optimizer, state, momentum, False)
    dataset = CocoTraining(train_set, train=True, jitter=opts.jitter)
    batches = StepBatches(len(dataset), opts.batch, opts.seed)
    loader = iter(DataLoader(dataset, batch_sampler=ChunkSampler(batches, start, p["steps"], [0]),
                             num_workers=opts.workers, collate_fn=collate))
    logbook = Logbook(out, resume_step=start)
    model.train()
    bar = tqdm(total=p["steps"], initial=start, desc="detection training", unit="step", disable=not opts.progress)
    window_start = time.perf_counter()
    for step in range(start, p["steps"]):
        for group in optimizer.param_groups:
            group["lr"] = schedule.at(step)
        images, targets = next(loader)
        losses = model([im.to(device) for im in images],
                       [{"boxes": t["boxes"].to(device), "labels": t["labels"].to(device)} for t in targets])
        loss = sum(losses.values())
        if not torch.isfinite(loss.detach()):
            raise BigTransferError(f"the loss became {float(loss.detach())} at step {step + 1}; lower --base-lr "
                                   "or set --grad-clip")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if opts.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, opts.grad_clip)
        optimizer.step()
        done = step + 1
        bar.update()
        if done % opts.log_every == 0 or done == p["steps"]:
            rate = opts.log_every * opts.batch / max(time.perf_counter() - window_start, 1e-9)
            values = {k: float(v.detach()) for k, v in losses.items()}
            logbook.log(done, "train", loss=sum(values.values()), lr=schedule.at(step), images_per_s=rate, **values)
            bar.set_postfix(loss=f"{sum(values.values()):.3f}")
            window_start = time.perf_counter()
        if done % opts.checkpoint_every == 0 or done == p["steps"]:
            state, momentum = gather_train_state(model, optimizer, False)
            save_train_state(checkpoint, state, momentum, done, fingerprint)
    bar.close()
    write_safetensors(run.final_path, model.state_dict(),
                      {"format": "bigtransfer-retinanet", "config": json.dumps(settings)}, what="detection model")
    metrics = evaluate_detector(model, val_set, device, batch=max(1, opts.batch), out=out,
                                progress=opts.progress) if val_set else {}
    if metrics:
        logbook.log(p["steps"], "eval", **metrics)
    logbook.close()
    return run.finish({"final": metrics, "steps": p["steps"], "model": str(run.final_path)})


@torch.no_grad()
def evaluate_detector(model, coco: CocoSet, device: torch.device, *, batch: int = 8, out: Path | None = None,
                      progress: bool = True) -> dict:
    """COCO AP metrics (pycocotools) of `model` on `coco`; writes detections.json (COCO results) to `out`."""
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError:
        raise BigTransferError("COCO evaluation needs pycocotools: pip install 'bigtransfer[detect]'") from None
    from tqdm.auto import tqdm

    model.eval()
    loader = DataLoader(CocoTraining(coco, train=False), batch_size=batch, collate_fn=collate)
    detections = []
    for images, targets in tqdm(loader, desc="detecting", unit="batch", disable=not progress):
        for output, target in zip(model([im.to(device) for im in images]), targets):
            for box, score, label in zip(output["boxes"].tolist(), output["scores"].tolist(),
                                         output["labels"].tolist()):
                if 1 <= label <= len(coco.category_ids):
                    x0, y0, x1, y1 = box
                    detections.append({"image_id": target["image_id"], "category_id": coco.category_ids[label - 1],
                                       "bbox": [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)],
                                       "score": round(score, 5)})
    if out is not None:
        write_text(Path(out) / "detections.json", json.dumps(detections), what="detections")  # COCO results: a list
    if not detections:
        return {name: 0.0 for name in COCO_STATS}
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        truth = COCO(str(coco.path))
        evaluation = COCOeval(truth, truth.loadRes(detections), "bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return {name: float(evaluation.stats[i]) for i, name in enumerate(COCO_STATS)}


def run_detect_eval(run: str | Path, data: str, images: str | None = None, *, device: str = "auto",
                    batch: int = 8, out: Path | None = None, progress: bool = True) -> dict:
    """COCO metrics of a trained detection run (its final.safetensors) on a COCO json."""
    with rundir.maybe_owned(out, "detect-eval"):
        return _detect_eval(run, data, images, device=device, batch=batch, out=out, progress=progress)


def _detect_eval(run, data, images, *, device, batch, out, progress) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    run = Path(run)
    try:
        config = load_json((run / "config.json").read_text())
        state = load_file(str(run / "final.safetensors"))
    except (OSError, ValueError, SafetensorError) as err:
        raise BigTransferError(f"--model {run}: not a finished detection run ({err})") from None
    coco = read_coco(data, images)
    if coco.num_classes != config["num_classes"]:
        raise BigTransferError(f"--data {data}: {coco.num_classes - 1} categories, the model has "
                               f"{config['num_classes'] - 1}")
    dev = resolve_device(device)
    res, body = config["plan"]["resolution"], config["body"]
    # The architecture alone (random weights, replaced below): the pre-trained file need not be here.
    model = build_retinanet(body["arch"], config["num_classes"], min_size=res, max_size=res, norm=body["norm"],
                            groups=body["groups"], fpn_channels=config["fpn_channels"])
    model.load_state_dict(state)
    metrics = evaluate_detector(model.to(dev), coco, dev, batch=batch, out=out, progress=progress)
    if out is not None:
        write_json(Path(out) / "metrics.json", metrics)
    return metrics
