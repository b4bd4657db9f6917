"""The one training loop (fine-tuning and pre-training differ only in what they pass in).

Per optimisation step: set the lr from the schedule, draw the step's MixUp ratio, run this
process's micro-batches (accumulating gradients; DDP syncs on the last one), take an SGD step.
The batch a step sees is a pure function of (seed, step) (see data/sampler.py), so a run killed
and restarted from its last checkpoint finishes with the same weights as one never interrupted,
and the global batch is the same for any number of processes.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from ..atomic import remove_file
from ..data.mixup import mix, mixup_ratio
from ..data.sampler import ChunkSampler, StepBatches
from ..errors import BigTransferError
from ..metrics import ClassificationMeter, MultiLabelMeter
from .checkpointing import (
    FinalWeights,
    finished_weights,
    gather_train_state,
    read_train_state,
    restore_train_state,
    save_train_state,
)
from .distributed import DistContext, gradient_sync, wrap_for_training
from .layout import training_layout
from .logbook import Logbook
from .losses import softmax_cross_entropy
from .schedule import LRSchedule

LossFn = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None", float], torch.Tensor]


@dataclass(frozen=True)
class LoopConfig:
    schedule: LRSchedule
    batch: int
    momentum: float = 0.9
    weight_decay: float = 0.0
    decayed: str = "all"  # which parameters weight decay applies to: "all", or "kernels" (see decay_groups)
    mixup_alpha: float = 0.0
    seed: int = 0
    batch_split: int = 1
    eval_every: int = 0  # steps; 0: only at the end
    checkpoint_every: int = 0  # steps; 0: every `checkpoint_minutes` of wall time (and at the end)
    checkpoint_minutes: float = 10.0
    log_every: int = 10
    workers: int = 0
    eval_batch: int = 64
    image_side: int = 0  # side of the training crops, for the memory layout (0: unknown, channels_last)
    precision: str = "fp32"  # fp32 | bf16 (autocast); see resolve_precision for "auto"
    compile: bool = False
    progress: bool = True
    multilabel: bool = False  # evaluation reports precision@1 instead of top-1/top-5
    fsdp: bool = False  # shard weights, gradients and momentum over processes (largest models)
    # Supp. A's two extra regularisers (both off in BiT-HyperRule):
    prelogit_dropout: float = 0.0  # dropout on the pre-logits during training
    l2_to_init: float = 0.0  # weight decay towards the initial (pre-trained) weights: grad += l2 * (w - w0)
    # The distillation recipe's optimiser (BiT's own recipes use SGD with momentum, no clipping):
    optimizer: str = "sgd"  # sgd | adam
    decoupled_decay: bool = False  # weight decay w -= schedule(t) * wd * w, outside the gradient (big_vision's)
    grad_clip: float | None = None  # clip the global gradient norm to this

    @property
    def steps(self) -> int:
        return self.schedule.total_steps


def native_bf16(device: torch.device) -> bool:
    """Does `device` compute in bf16 natively (CUDA Ampere+, or a CPU with AVX512-BF16/AMX)?"""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


CPU_BF16_MIN_FLOPS = 1e9  # per image, forward: below this, bf16's casts cost more than they save on CPU


def resolve_precision(precision: str, device: torch.device, flops_per_image: float) -> str:
    """'auto' -> 'bf16' or 'fp32' for this device and workload; other values pass through.

    GPUs with bf16: bf16 (the standard choice). CPUs with native bf16 (AMX/AVX512-BF16): bf16
    only for heavy enough images, measured on this project's AMX CPU: R50x1 at 128 px (2.7
    GFLOP) trains 1.2-1.4x faster in bf16, while at 0.2-0.4 GFLOP (small models, small images)
    bf16 is 0.76-0.95x fp32 (benchmarks/results/train_cpu.md).
    """
    if precision != "auto":
        return precision
    if not native_bf16(device):
        return "fp32"
    return "bf16" if device.type == "cuda" or flops_per_image >= CPU_BF16_MIN_FLOPS else "fp32"


class UpdateGuard:
    """Ctrl-C and SIGTERM (a scheduler preempting the job, or a worker whose parent died) stop a
    run the same way: the loop saves what it completed, then stops. A signal landing while an
    update is being applied (momentum, then weights, then the step count) waits until the update
    is whole: stopped halfway, the checkpoint would hold a half-applied step under either count,
    and the resumed run would differ from one never interrupted."""

    def __init__(self):
        self.updating = False
        self.pending: int | None = None

    def handle(self, signum, frame) -> None:
        if self.updating:
            self.pending = signum
            return
        raise KeyboardInterrupt(f"signal {signum}")

    @contextlib.contextmanager
    def update(self) -> Iterator[None]:
        self.updating = True
        try:
            yield
        finally:
            self.updating = False
        if self.pending is not None:
            raise KeyboardInterrupt(f"signal {self.pending}")


@contextlib.contextmanager
def _interrupts_between_updates() -> Iterator[UpdateGuard]:
    guard = UpdateGuard()
    if threading.current_thread() is not threading.main_thread():  # only the main thread gets signals
        yield guard
        return
    previous = {}
    for signum in (signal.SIGTERM, signal.SIGINT):
        # SIGINT only where Ctrl-C would raise anyway (a worker that ignores it keeps ignoring it)
        if signum == signal.SIGTERM or signal.getsignal(signum) is signal.default_int_handler:
            previous[signum] = signal.signal(signum, guard.handle)
    try:
        yield guard
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _chunk_generator(seed: int, step: int, chunk: int) -> torch.Generator:
    value = int(np.random.SeedSequence([seed, step, chunk]).generate_state(1)[0])
    return torch.Generator().manual_seed(value)


def _loader(dataset, batch_sampler, workers: int, device: torch.device) -> DataLoader:
    return DataLoader(dataset, batch_sampler=batch_sampler, num_workers=workers,
                      pin_memory=device.type == "cuda", persistent_workers=False,
                      prefetch_factor=4 if workers else None)


def is_kernel(name: str, param: torch.nn.Parameter) -> bool:
    """Convolution and head kernels: every weight of more than one dimension (GroupNorm scales and
    shifts and the biases are vectors)."""
    return param.ndim > 1


def decay_groups(model: torch.nn.Module, weight_decay: float, decayed: str = "all") -> list[dict]:
    """SGD parameter groups: weight decay on every trainable parameter, or on the kernels only."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if decayed == "all":
        return [{"params": [p for _, p in named], "weight_decay": weight_decay}]
    if decayed != "kernels":
        raise BigTransferError(f"weight decay applies to 'all' or 'kernels', got {decayed!r}")
    return [{"params": [p for n, p in named if is_kernel(n, p)], "weight_decay": weight_decay},
            {"params": [p for n, p in named if not is_kernel(n, p)], "weight_decay": 0.0}]


def make_optimizer(model: torch.nn.Module, cfg: LoopConfig) -> torch.optim.Optimizer:
    """SGD with momentum (BiT), or Adam; weight decay coupled (in the gradient) or decoupled."""
    groups = decay_groups(model, cfg.weight_decay, cfg.decayed)
    base_lr = max(cfg.schedule.base_lr, 1e-12)
    if cfg.decoupled_decay:
        # torch decays by lr * weight_decay; dividing by the peak lr makes it schedule(t) * wd.
        for group in groups:
            group["weight_decay"] = group["weight_decay"] / base_lr
    if cfg.optimizer == "adam":
        cls = torch.optim.AdamW if cfg.decoupled_decay else torch.optim.Adam
        return cls(groups, lr=0.0, betas=(0.9, 0.999), eps=1e-8)
    if cfg.optimizer != "sgd":
        raise BigTransferError(f"optimizer must be sgd or adam, got {cfg.optimizer!r}")
    if cfg.decoupled_decay:
        raise BigTransferError("decoupled weight decay is only implemented for adam")
    return torch.optim.SGD(groups, lr=0.0, momentum=cfg.momentum)


def _initial_weights(params: list[torch.nn.Parameter], cfg: LoopConfig) -> list[torch.Tensor]:
    """Copies of the starting weights when decaying towards them (else nothing)."""
    if cfg.l2_to_init < 0 or not 0 <= cfg.prelogit_dropout < 1:
        raise BigTransferError(f"l2_to_init must be >= 0 and dropout in [0, 1), got {cfg.l2_to_init}, "
                               f"{cfg.prelogit_dropout}")
    if not cfg.l2_to_init:
        return []
    if cfg.fsdp:
        raise BigTransferError("weight decay towards the initial weights is not supported with --fsdp")
    return [p.detach().clone() for p in params]


def train(
    model: torch.nn.Module,
    train_data,
    eval_data,
    cfg: LoopConfig,
    run_dir: Path,
    ctx: DistContext,
    fingerprint: str,
    *,
    loss_fn: LossFn = softmax_cross_entropy,
    frozen_modules: list[torch.nn.Module] | None = None,
    on_eval: Callable[[int, dict, Logbook], None] | None = None,
    targets: Callable[[torch.Tensor], torch.Tensor] | None = None,
    final: FinalWeights | None = None,
) -> dict:
    """Train `model` in place for `cfg.steps` steps, resuming from `run_dir/checkpoints/latest.safetensors`.

    `targets(images)` replaces the data's labels with a function of the very (augmented, mixed)
    batch the model sees: a teacher's logits, for distillation. `final`: where the finished model
    goes; it is written once, right after the last step and before the last evaluation, and
    replaces the training checkpoint (a run killed after that resumes from it). Without it the
    last step is saved as a training checkpoint. Returns the final evaluation metrics (empty if
    there is no eval data).
    """
    from tqdm.auto import tqdm

    device = ctx.device
    bf16 = cfg.precision == "bf16"
    # channels_last, or NCHW for small steps on a CPU (layout.py). FSDP only shards contiguous
    # parameters, so there only the inputs take the layout (the convolutions follow the input's).
    memory_format = training_layout(device, cfg.precision, cfg.batch // (ctx.world_size * cfg.batch_split), cfg.image_side)
    model.to(device=device, memory_format=torch.contiguous_format if cfg.fsdp else memory_format)
    if cfg.fsdp and isinstance(eval_data, torch.utils.data.IterableDataset):
        raise BigTransferError("--fsdp needs a folder or manifest for validation (streams split unevenly over "
                               "processes, and FSDP's forward passes must run in step)")
    wrapped = wrap_for_training(model, ctx, cfg.fsdp)  # DDP, FSDP, or the model itself
    net = torch.compile(wrapped) if cfg.compile else wrapped
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(model, cfg)
    anchors = _initial_weights(params, cfg)  # taken before a resume: w0 is the run's start, not the checkpoint
    if hasattr(model, "pre_logits_dropout"):
        model.pre_logits_dropout.p = cfg.prelogit_dropout
    checkpoint = run_dir / "checkpoints" / "latest.safetensors"
    start, saved = 0, {}
    if checkpoint.is_file():
        state, opt_state, start, saved = read_train_state(checkpoint, fingerprint)
        restore_train_state(model, optimizer, state, opt_state, cfg.fsdp)
        del state, opt_state
    elif final is not None and final.resume and (state := finished_weights(final.path, fingerprint)) is not None:
        restore_train_state(model, optimizer, state, {}, cfg.fsdp)  # trained; killed before it was evaluated
        start = cfg.steps
        del state
    layout = {"world_size": ctx.world_size, "workers": cfg.workers, "batch_split": cfg.batch_split}
    logbook = Logbook(run_dir, enabled=ctx.is_main, resume_step=start)

    def save(step: int) -> None:
        """Whole tensors, so the checkpoint resumes on any number of processes (collective under FSDP)."""
        if cfg.fsdp or ctx.is_main:
            state, opt_state = gather_train_state(model, optimizer, cfg.fsdp)
            if ctx.is_main:
                save_train_state(checkpoint, state, opt_state, step, fingerprint, {"layout": layout})

    my_chunks = list(range(ctx.rank * cfg.batch_split, (ctx.rank + 1) * cfg.batch_split))
    if hasattr(train_data, "loader"):  # a stream (sharded tar files): it keeps its own place
        micro = cfg.batch // (ctx.world_size * cfg.batch_split)
        loader = iter(train_data.loader(start, ctx.rank, ctx.world_size, micro, cfg.batch_split, cfg.workers,
                                        device.type == "cuda", same_layout=saved.get("layout", layout) == layout))
    else:
        batches = StepBatches(len(train_data), cfg.batch, cfg.seed, chunks=ctx.world_size * cfg.batch_split)
        loader = iter(_loader(train_data, ChunkSampler(batches, start, cfg.steps, my_chunks), cfg.workers, device))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    last_save = time.monotonic()
    bar = tqdm(total=cfg.steps, initial=start, desc="training", unit="step",
               disable=not (cfg.progress and ctx.is_main), dynamic_ncols=True)
    window_loss, window_steps, window_start = 0.0, 0, time.perf_counter()

    def evaluate(step: int, logged: bool = True) -> dict:
        metrics = evaluate_model(model, eval_data, ctx, batch=cfg.eval_batch, workers=cfg.workers, bf16=bf16,
                                 multilabel=cfg.multilabel).result()
        if logged:
            logbook.log(step, "eval", **metrics)
            if on_eval is not None:
                on_eval(step, metrics, logbook)
        return metrics

    final_metrics: dict = {}
    completed = start  # steps whose update is in the model (what a checkpoint must say)
    final_written = start == cfg.steps and final is not None and not checkpoint.is_file()  # resumed from it
    with _interrupts_between_updates() as guard:
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
                    images = images.to(device, non_blocking=True).contiguous(memory_format=memory_format)
                    labels = labels.to(device, non_blocking=True)
                    perm, mixed = None, lam
                    if lam < 1.0:
                        images, perm = mix(images, lam, _chunk_generator(cfg.seed, step, chunk))
                    if targets is not None:  # computed on the mixed batch itself: nothing left to mix
                        labels, perm, mixed = targets(images), None, 1.0
                    with gradient_sync(wrapped, sync=i == len(my_chunks) - 1):
                        with autocast:
                            loss = loss_fn(net(images), labels, perm, mixed) / len(my_chunks)
                        loss.backward()
                    step_loss += float(loss.detach())
                if anchors:
                    for p, p0 in zip(params, anchors):
                        if p.grad is not None:
                            p.grad.add_(p.detach() - p0, alpha=cfg.l2_to_init)
                if cfg.grad_clip:
                    torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                with guard.update():
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    done = completed = step + 1
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
                if done == cfg.steps:
                    break  # the finished model is saved below, once, before its last evaluation
                due = (done % cfg.checkpoint_every == 0) if cfg.checkpoint_every else (
                    time.monotonic() - last_save >= 60 * cfg.checkpoint_minutes)
                if cfg.fsdp:  # saving gathers shards: every process must decide the same
                    due = ctx.agree(due)
                if due:
                    save(done)
                    last_save = time.monotonic()
                if eval_data is not None and cfg.eval_every and done % cfg.eval_every == 0:
                    evaluate(done)
                    model.train()
                    for module in frozen_modules or []:
                        module.eval()
            bar.close()
            if final is None:
                if completed > start:
                    save(completed)
            elif not final_written:
                # Only the weights (no optimizer state: nothing is left to train), in the file the
                # run delivers, which then stands in for the training checkpoint it replaces.
                state, _ = gather_train_state(model, None, cfg.fsdp)
                if ctx.is_main:
                    final.write(state)
                    remove_file(checkpoint)
                final_written = True
            if eval_data is not None:
                final_metrics = evaluate(cfg.steps, logged=completed > start or final_written)
        except KeyboardInterrupt:
            # Keep completed steps: one process can save safely (several might be mid-collective).
            if not ctx.distributed and completed > start and not final_written:
                save(completed)
            raise
        finally:
            bar.close()
            logbook.close()
    return final_metrics


@torch.no_grad()
def evaluate_model(model: torch.nn.Module, data, ctx: DistContext | None = None, *, batch: int = 64,
                   workers: int = 0, bf16: bool = False, progress: bool = False,
                   multilabel: bool = False) -> ClassificationMeter | MultiLabelMeter:
    """Top-1/top-5/loss/confusion (or, multi-label, precision@1/loss) over `data`, sharded over
    processes and summed."""
    from tqdm.auto import tqdm

    ctx = ctx or DistContext(0, 1, 0, next(model.parameters()).device)
    device = ctx.device
    model.eval()
    num_classes = model.config.num_classes if hasattr(model, "config") else None
    if isinstance(data, torch.utils.data.IterableDataset):  # a stream shards itself over processes
        data.rank, data.world = ctx.rank, ctx.world_size
        subset, real = data, None
    else:
        # Every process runs the same number of batches (FSDP's forward passes are collective):
        # shards are padded to equal length by repeating items, and the padding is not counted.
        mine = list(range(ctx.rank, len(data), ctx.world_size))
        real = len(mine)
        mine += mine[:1] * (-(-len(data) // ctx.world_size) - real)
        subset = torch.utils.data.Subset(data, mine)
    loader = DataLoader(subset, batch_size=batch, num_workers=workers, pin_memory=device.type == "cuda")
    meter, seen = None, 0
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    for images, labels in tqdm(loader, desc="evaluating", unit="batch", disable=not (progress and ctx.is_main)):
        images = images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        with autocast:
            logits = model(images)
        if meter is None:
            meter = (MultiLabelMeter if multilabel else ClassificationMeter)(num_classes or logits.shape[1])
        if real is not None:
            keep = max(0, min(len(labels), real - seen))
            seen += len(labels)
            logits, labels = logits[:keep], labels[:keep]
        if len(labels):
            meter.update(logits, labels)
    meter = meter or (MultiLabelMeter if multilabel else ClassificationMeter)(num_classes or 1)
    if ctx.distributed:
        meter.load_state(ctx.sum(meter.state().to(device)).cpu())
    return meter


def default_workers() -> int:
    """Loader processes: leave one core to the training process itself."""
    return max(0, min(8, (os.cpu_count() or 1) - 1))
