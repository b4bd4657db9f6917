"""The one training loop (fine-tuning and pre-training differ only in what they pass in).

Per optimisation step: set the lr from the schedule, draw the step's MixUp ratio, run this
process's micro-batches (accumulating gradients; DDP syncs on the last one), take an SGD step.
The batch a step sees is a pure function of (seed, step) (see data/sampler.py), so a run killed
and restarted from its last checkpoint finishes with the same weights as one never interrupted,
and the global batch is the same for any number of processes.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from ..data.mixup import mix, mixed_cross_entropy, mixup_ratio
from ..data.sampler import ChunkSampler, StepBatches
from ..evaluate.metrics import ClassificationMeter
from .checkpointing import load_train_state, save_train_state
from .distributed import DistContext
from .logbook import Logbook
from .schedule import LRSchedule

LossFn = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None", float], torch.Tensor]


@dataclass(frozen=True)
class LoopConfig:
    schedule: LRSchedule
    batch: int
    momentum: float = 0.9
    weight_decay: float = 0.0
    mixup_alpha: float = 0.0
    seed: int = 0
    batch_split: int = 1
    eval_every: int = 0  # steps; 0: only at the end
    checkpoint_every: int = 0  # steps; 0: about ten times per run
    log_every: int = 10
    workers: int = 0
    eval_batch: int = 64
    precision: str = "auto"  # auto (bf16 where the hardware does it natively) | fp32 | bf16
    compile: bool = False
    progress: bool = True

    @property
    def steps(self) -> int:
        return self.schedule.total_steps

    def resolved_checkpoint_every(self) -> int:
        return self.checkpoint_every or max(1, math.ceil(self.steps / 10))


def native_bf16(device: torch.device) -> bool:
    """Does `device` compute in bf16 natively (CUDA Ampere+, or a CPU with AVX512-BF16/AMX)?"""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def uses_bf16(precision: str, device: torch.device) -> bool:
    """bf16 autocast if asked, or by default where it is native: 1.4x the fp32 step on an AMX CPU
    (benchmarks/results/train_cpu.md), and the standard choice on GPUs."""
    return precision == "bf16" or (precision == "auto" and native_bf16(device))


def _chunk_generator(seed: int, step: int, chunk: int) -> torch.Generator:
    value = int(np.random.SeedSequence([seed, step, chunk]).generate_state(1)[0])
    return torch.Generator().manual_seed(value)


def _loader(dataset, batch_sampler, workers: int, device: torch.device) -> DataLoader:
    return DataLoader(dataset, batch_sampler=batch_sampler, num_workers=workers,
                      pin_memory=device.type == "cuda", persistent_workers=False,
                      prefetch_factor=4 if workers else None)


def train(
    model: torch.nn.Module,
    train_data,
    eval_data,
    cfg: LoopConfig,
    run_dir: Path,
    ctx: DistContext,
    fingerprint: str,
    *,
    loss_fn: LossFn = mixed_cross_entropy,
    logbook: Logbook | None = None,
    frozen_modules: list[torch.nn.Module] | None = None,
    on_eval: Callable[[int, dict], None] | None = None,
) -> dict:
    """Train `model` in place for `cfg.steps` steps, resuming from `run_dir/checkpoints/latest.safetensors`.

    Returns the final evaluation metrics (empty if there is no eval data).
    """
    from tqdm.auto import tqdm

    device = ctx.device
    bf16 = uses_bf16(cfg.precision, device)
    # channels_last: what tensor cores want, and 1.1x the fp32 training step on CPU too.
    model.to(device=device, memory_format=torch.channels_last)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.0, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    checkpoint = run_dir / "checkpoints" / "latest.safetensors"
    start = load_train_state(checkpoint, model, optimizer, fingerprint) if checkpoint.is_file() else 0
    logbook = logbook or Logbook(run_dir, enabled=ctx.is_main, resume_step=start)

    net = model
    if ctx.distributed:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device] if device.type == "cuda" else None)
    if cfg.compile:
        net = torch.compile(net)

    batches = StepBatches(len(train_data), cfg.batch, cfg.seed, chunks=ctx.world_size * cfg.batch_split)
    my_chunks = list(range(ctx.rank * cfg.batch_split, (ctx.rank + 1) * cfg.batch_split))
    loader = iter(_loader(train_data, ChunkSampler(batches, start, cfg.steps, my_chunks), cfg.workers, device))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    every_ckpt = cfg.resolved_checkpoint_every()
    bar = tqdm(total=cfg.steps, initial=start, desc="training", unit="step",
               disable=not (cfg.progress and ctx.is_main), dynamic_ncols=True)
    window_loss, window_steps, window_start = 0.0, 0, time.perf_counter()
    final_metrics: dict = {}
    step = start
    try:
        model.train()
        for module in frozen_modules or []:
            module.eval()
        for step in range(start, cfg.steps):
            lr = cfg.schedule.at(step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            lam = mixup_ratio(cfg.mixup_alpha, cfg.seed, step)
            step_loss = 0.0
            for i, chunk in enumerate(my_chunks):
                images, labels = next(loader)
                images = images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
                labels = labels.to(device, non_blocking=True)
                perm = None
                if lam < 1.0:
                    images, perm = mix(images, lam, _chunk_generator(cfg.seed, step, chunk))
                sync = i == len(my_chunks) - 1
                with (contextlib.nullcontext() if sync or not ctx.distributed else net.no_sync()):
                    with autocast:
                        loss = loss_fn(net(images), labels, perm, lam) / len(my_chunks)
                    loss.backward()
                step_loss += float(loss.detach())
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            done = step + 1
            window_loss += step_loss
            window_steps += 1
            bar.update(1)
            if done % cfg.log_every == 0 or done == cfg.steps:
                elapsed = time.perf_counter() - window_start
                mean_loss = ctx.mean(window_loss / window_steps)
                rate = window_steps * cfg.batch / max(elapsed, 1e-9)
                logbook.log(done, "train", loss=mean_loss, lr=lr, images_per_s=rate)
                bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}", img_s=f"{rate:.1f}")
                window_loss, window_steps, window_start = 0.0, 0, time.perf_counter()
            if done % every_ckpt == 0 or done == cfg.steps:
                if ctx.is_main:
                    save_train_state(checkpoint, model, optimizer, done, fingerprint)
                ctx.barrier()
            is_last = done == cfg.steps
            if eval_data is not None and (is_last or (cfg.eval_every and done % cfg.eval_every == 0)):
                metrics = evaluate_model(model, eval_data, ctx, batch=cfg.eval_batch, workers=cfg.workers,
                                         bf16=bf16).result()
                logbook.log(done, "eval", **metrics)
                if on_eval is not None:
                    on_eval(done, metrics)
                if is_last:
                    final_metrics = metrics
                model.train()
                for module in frozen_modules or []:
                    module.eval()
    except KeyboardInterrupt:
        # Keep completed steps: one process can save safely (several might be mid-collective).
        if ctx.is_main and not ctx.distributed and step > start:
            save_train_state(checkpoint, model, optimizer, step, fingerprint)
        raise
    finally:
        bar.close()
        logbook.close()
    if cfg.steps == start and eval_data is not None:  # already finished: just report
        final_metrics = evaluate_model(model, eval_data, ctx, batch=cfg.eval_batch, workers=cfg.workers,
                                       bf16=bf16).result()
    return final_metrics


@torch.no_grad()
def evaluate_model(model: torch.nn.Module, data, ctx: DistContext | None = None, *, batch: int = 64,
                   workers: int = 0, bf16: bool = False, progress: bool = False) -> ClassificationMeter:
    """Top-1/top-5/loss/confusion over `data`, sharded over processes and summed."""
    from tqdm.auto import tqdm

    ctx = ctx or DistContext(0, 1, 0, next(model.parameters()).device)
    device = ctx.device
    model.eval()
    num_classes = model.config.num_classes if hasattr(model, "config") else None
    indices = list(range(ctx.rank, len(data), ctx.world_size))
    loader = DataLoader(torch.utils.data.Subset(data, indices), batch_size=batch, num_workers=workers,
                        pin_memory=device.type == "cuda")
    meter = None
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    for images, labels in tqdm(loader, desc="evaluating", unit="batch", disable=not (progress and ctx.is_main)):
        images = images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        with autocast:
            logits = model(images)
        if meter is None:
            meter = ClassificationMeter(num_classes or logits.shape[1])
        meter.update(logits, labels)
    meter = meter or ClassificationMeter(num_classes or 1)
    if ctx.distributed:
        meter.load_state(ctx.sum(meter.state().to(device)).cpu())
    return meter


def default_workers() -> int:
    """Loader processes: leave one core to the training process itself."""
    return max(0, min(8, (os.cpu_count() or 1) - 1))
