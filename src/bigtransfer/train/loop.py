"""The one training loop (fine-tuning, pre-training and distillation differ only in what they pass in).

It takes what the plan decided (`TrainingRecipe`) and how the run executes (`ExecutionOptions`,
resolved: no "auto" left). `train` reads top to bottom; `_Training` holds its pieces.

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
from dataclasses import fields
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
from .execution import ExecutionOptions
from .layout import training_layout
from .logbook import Logbook
from .losses import softmax_cross_entropy
from .memory import auto_batch_split, forward_flops_per_image
from .recipe import TrainingRecipe

LossFn = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None", float], torch.Tensor]


CHECKPOINT_MINUTES = 10.0  # wall time between training checkpoints when no step cadence is set


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


def resolve_execution(execution: ExecutionOptions, model: torch.nn.Module, recipe: TrainingRecipe,
                      ctx: DistContext, *, extra_flops: float = 0.0) -> ExecutionOptions:
    """`execution` with its "auto" values decided for this model, recipe and machine: the precision
    from the device and the work per image (`extra_flops`: a teacher's too), the batch split from
    the memory a micro-batch needs."""
    flops = forward_flops_per_image(model.config, recipe.image_side) + extra_flops
    precision = resolve_precision(execution.precision, ctx.device, flops)
    split = execution.batch_split
    if split == "auto":
        split = auto_batch_split(model.config, recipe.image_side, recipe.batch // ctx.world_size, ctx.device,
                                 precision == "bf16")
    # only the execution options: a verb's options dataclass also carries what its plan decides
    options = {f.name: getattr(execution, f.name) for f in fields(ExecutionOptions)}
    return ExecutionOptions(**{**options, "batch_split": split, "precision": precision})


def _check_resolved(execution: ExecutionOptions) -> None:
    if execution.precision not in ("fp32", "bf16") or not isinstance(execution.batch_split, int) \
            or execution.batch_split < 1:
        raise BigTransferError(f"the training loop needs a precision of fp32 or bf16 and a whole batch split, got "
                               f"{execution.precision!r} and {execution.batch_split!r} (see resolve_execution)")


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


def make_optimizer(model: torch.nn.Module, cfg: TrainingRecipe) -> torch.optim.Optimizer:
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


def _initial_weights(params: list[torch.nn.Parameter], cfg: TrainingRecipe, fsdp: bool) -> list[torch.Tensor]:
    """Copies of the starting weights when decaying towards them (else nothing)."""
    if cfg.l2_to_init < 0 or not 0 <= cfg.prelogit_dropout < 1:
        raise BigTransferError(f"l2_to_init must be >= 0 and dropout in [0, 1), got {cfg.l2_to_init}, "
                               f"{cfg.prelogit_dropout}")
    if not cfg.l2_to_init:
        return []
    if fsdp:
        raise BigTransferError("weight decay towards the initial weights is not supported with --fsdp")
    return [p.detach().clone() for p in params]


def train(
    model: torch.nn.Module,
    train_data,
    eval_data,
    recipe: TrainingRecipe,
    execution: ExecutionOptions,
    run_dir: Path,
    ctx: DistContext,
    fingerprint: str,
    *,
    loss_fn: LossFn = softmax_cross_entropy,
    frozen_modules: list[torch.nn.Module] | None = None,
    on_eval: Callable[[int, dict, Logbook], None] | None = None,
    targets: Callable[[torch.Tensor], torch.Tensor] | None = None,
    final: FinalWeights | None = None,
    eval_batch: int | None = None,
) -> dict:
    """Train `model` in place for `recipe.steps` steps, resuming from `run_dir/checkpoints/latest.safetensors`.

    `execution` must be resolved (`resolve_execution`: no "auto" left). `targets(images)` replaces
    the data's labels with a function of the very (augmented, mixed) batch the model sees: a
    teacher's logits, for distillation. `final`: where the finished model goes; it is written once,
    right after the last step and before the last evaluation, and replaces the training checkpoint
    (a run killed after that resumes from it). Without it the last step is saved as a training
    checkpoint. `eval_batch`: default twice a training micro-batch (evaluation saves no
    activations). Returns the final evaluation metrics (empty if there is no eval data).
    """
    run = _Training(model, train_data, eval_data, recipe, execution, run_dir, ctx, fingerprint,
                    frozen_modules or [], on_eval, final, eval_batch)
    window = _LossWindow(run)
    with _interrupts_between_updates() as guard:
        try:
            run.train_mode()
            for step in range(run.start, recipe.steps):
                lr = recipe.schedule.at(step)
                window.add(run.step(step, lr, loss_fn, targets, guard))
                done = run.completed
                run.bar.update(1)
                if done % execution.log_every == 0 or done == recipe.steps:
                    window.log(done, lr)
                if done == recipe.steps:
                    break  # the finished model is saved by finish(), once, before its last evaluation
                if run.checkpoint_due(done):
                    run.write_checkpoint(done)
                if run.evaluation_due(done):
                    run.evaluate(done)
                    run.train_mode()
            return run.finish()
        except KeyboardInterrupt:
            run.save_interrupted()
            raise
        finally:
            run.close()


class _Training:
    """One call of `train`: the model placed and wrapped, its optimizer, where it resumes, its
    batches, and the pieces of the loop (a step, saving, evaluating, finishing)."""

    def __init__(self, model, train_data, eval_data, recipe: TrainingRecipe, execution: ExecutionOptions,
                 run_dir: Path, ctx: DistContext, fingerprint: str, frozen_modules: list[torch.nn.Module],
                 on_eval, final: FinalWeights | None, eval_batch: int | None):
        from tqdm.auto import tqdm

        _check_resolved(execution)
        self.model, self.eval_data, self.recipe, self.execution, self.ctx = model, eval_data, recipe, execution, ctx
        self.fingerprint, self.frozen_modules, self.on_eval, self.final = fingerprint, frozen_modules, on_eval, final
        self.fsdp, self.bf16 = execution.fsdp, execution.precision == "bf16"
        micro_batch = recipe.batch // (ctx.world_size * execution.batch_split)
        self.eval_batch = eval_batch or 2 * micro_batch
        self._place(micro_batch)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(model, recipe)
        self.anchors = _initial_weights(self.params, recipe, self.fsdp)  # before a resume: w0 is the run's start
        if hasattr(model, "pre_logits_dropout"):
            model.pre_logits_dropout.p = recipe.prelogit_dropout
        self.checkpoint = run_dir / "checkpoints" / "latest.safetensors"
        self.start, saved = self._resume()
        self.layout = {"world_size": ctx.world_size, "workers": execution.workers, "batch_split": execution.batch_split}
        self.logbook = Logbook(run_dir, enabled=ctx.is_main, resume_step=self.start)
        self.my_chunks = list(range(ctx.rank * execution.batch_split, (ctx.rank + 1) * execution.batch_split))
        self.loader = self._batches(train_data, micro_batch, saved.get("layout", self.layout) == self.layout)
        self.autocast = torch.autocast(ctx.device.type, dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()
        self.last_save = time.monotonic()
        self.bar = tqdm(total=recipe.steps, initial=self.start, desc="training", unit="step",
                        disable=not (execution.progress and ctx.is_main), dynamic_ncols=True)
        self.completed = self.start  # steps whose update is in the model (what a checkpoint must say)
        # resumed from the finished model itself: nothing to write again
        self.final_written = self.start == recipe.steps and final is not None and not self.checkpoint.is_file()

    def _place(self, micro_batch: int) -> None:
        """The model on its device in its memory layout, wrapped for DDP or FSDP, compiled if asked."""
        device, execution = self.ctx.device, self.execution
        # channels_last, or NCHW for small steps on a CPU (layout.py). FSDP only shards contiguous
        # parameters, so there only the inputs take the layout (the convolutions follow the input's).
        self.memory_format = training_layout(device, execution.precision, micro_batch, self.recipe.image_side)
        self.model.to(device=device, memory_format=torch.contiguous_format if self.fsdp else self.memory_format)
        if self.fsdp and isinstance(self.eval_data, torch.utils.data.IterableDataset):
            raise BigTransferError("--fsdp needs a folder or manifest for validation (streams split unevenly over "
                                   "processes, and FSDP's forward passes must run in step)")
        self.wrapped = wrap_for_training(self.model, self.ctx, self.fsdp)  # DDP, FSDP, or the model itself
        self.net = torch.compile(self.wrapped) if execution.compile else self.wrapped

    def _resume(self) -> tuple[int, dict]:
        """(completed steps, the checkpoint's extra record): from the training checkpoint, or from the
        finished model of a run killed before its last evaluation, or (0, {}) for a new run."""
        final = self.final
        if self.checkpoint.is_file():
            state, opt_state, start, saved = read_train_state(self.checkpoint, self.fingerprint)
            restore_train_state(self.model, self.optimizer, state, opt_state, self.fsdp)
            return start, saved
        if final is not None and final.resume and (state := finished_weights(final.path, self.fingerprint)) is not None:
            restore_train_state(self.model, self.optimizer, state, {}, self.fsdp)  # trained; killed before evaluated
            return self.recipe.steps, {}
        return 0, {}

    def _batches(self, train_data, micro_batch: int, same_layout: bool) -> Iterator:
        """This process's micro-batches from step `start` on: a pure function of (seed, step)."""
        ctx, execution, recipe = self.ctx, self.execution, self.recipe
        if hasattr(train_data, "loader"):  # a stream (sharded tar files): it keeps its own place
            return iter(train_data.loader(self.start, ctx.rank, ctx.world_size, micro_batch, execution.batch_split,
                                          execution.workers, ctx.device.type == "cuda", same_layout=same_layout))
        batches = StepBatches(len(train_data), recipe.batch, recipe.seed, chunks=ctx.world_size * execution.batch_split)
        sampler = ChunkSampler(batches, self.start, recipe.steps, self.my_chunks)
        return iter(_loader(train_data, sampler, execution.workers, ctx.device))

    def train_mode(self) -> None:
        self.model.train()
        for module in self.frozen_modules:
            module.eval()

    def step(self, step: int, lr: float, loss_fn: LossFn, targets, guard: UpdateGuard) -> float:
        """One optimisation step: this process's micro-batches (gradients accumulated, synced on the
        last), Supp. A's pull towards the start, clipping, then the update, which no signal splits."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        lam = mixup_ratio(self.recipe.mixup_alpha, self.recipe.seed, step)
        loss = 0.0
        for i, chunk in enumerate(self.my_chunks):
            loss += self._micro_batch(step, chunk, lam, i == len(self.my_chunks) - 1, loss_fn, targets)
        if self.anchors:
            for p, p0 in zip(self.params, self.anchors):
                if p.grad is not None:
                    p.grad.add_(p.detach() - p0, alpha=self.recipe.l2_to_init)
        if self.recipe.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.params, self.recipe.grad_clip)
        with guard.update():
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.completed = step + 1
        return loss

    def _micro_batch(self, step: int, chunk: int, lam: float, last: bool, loss_fn: LossFn, targets) -> float:
        """Forward and backward of one micro-batch (MixUp'd with its own permutation); its share of the loss."""
        device = self.ctx.device
        images, labels = next(self.loader)
        images = images.to(device, non_blocking=True).contiguous(memory_format=self.memory_format)
        labels = labels.to(device, non_blocking=True)
        perm, mixed = None, lam
        if lam < 1.0:
            images, perm = mix(images, lam, _chunk_generator(self.recipe.seed, step, chunk))
        if targets is not None:  # computed on the mixed batch itself: nothing left to mix
            labels, perm, mixed = targets(images), None, 1.0
        with gradient_sync(self.wrapped, sync=last):
            with self.autocast:
                loss = loss_fn(self.net(images), labels, perm, mixed) / len(self.my_chunks)
            loss.backward()
        return float(loss.detach())

    def checkpoint_due(self, done: int) -> bool:
        """Every `checkpoint_every` steps, or else every CHECKPOINT_MINUTES of wall time."""
        every = self.execution.checkpoint_every
        due = (done % every == 0) if every else time.monotonic() - self.last_save >= 60 * CHECKPOINT_MINUTES
        return self.ctx.agree(due) if self.fsdp else due  # saving gathers shards: every process decides the same

    def evaluation_due(self, done: int) -> bool:
        return self.eval_data is not None and bool(self.execution.eval_every) and done % self.execution.eval_every == 0

    def write_checkpoint(self, step: int) -> None:
        """Whole tensors, so the checkpoint resumes on any number of processes (collective under FSDP)."""
        if self.fsdp or self.ctx.is_main:
            state, opt_state = gather_train_state(self.model, self.optimizer, self.fsdp)
            if self.ctx.is_main:
                save_train_state(self.checkpoint, state, opt_state, step, self.fingerprint, {"layout": self.layout})
        self.last_save = time.monotonic()

    def evaluate(self, step: int, logged: bool = True) -> dict:
        metrics = evaluate_model(self.model, self.eval_data, self.ctx, batch=self.eval_batch,
                                 workers=self.execution.workers, bf16=self.bf16,
                                 multilabel=self.recipe.multilabel).result()
        if logged:
            self.logbook.log(step, "eval", **metrics)
            if self.on_eval is not None:
                self.on_eval(step, metrics, self.logbook)
        return metrics

    def finish(self) -> dict:
        """After the last step: the model saved once (the delivered file, or a training checkpoint
        without `final`), then the last evaluation, logged unless this call trained and wrote nothing."""
        self.bar.close()
        if self.final is None:
            if self.completed > self.start:
                self.write_checkpoint(self.completed)
        elif not self.final_written:
            # Only the weights (no optimizer state: nothing is left to train), in the file the
            # run delivers, which then stands in for the training checkpoint it replaces.
            state, _ = gather_train_state(self.model, None, self.fsdp)
            if self.ctx.is_main:
                self.final.write(state)
                remove_file(self.checkpoint)
            self.final_written = True
        if self.eval_data is None:
            return {}
        return self.evaluate(self.recipe.steps, logged=self.completed > self.start or self.final_written)

    def save_interrupted(self) -> None:
        """Ctrl-C or SIGTERM: keep the completed steps. One process can save safely (several might be
        mid-collective)."""
        if not self.ctx.distributed and self.completed > self.start and not self.final_written:
            self.write_checkpoint(self.completed)

    def close(self) -> None:
        self.bar.close()
        self.logbook.close()


class _LossWindow:
    """The training loss and throughput between two log records (the loss averaged over processes)."""

    def __init__(self, run: _Training):
        self.run = run
        self.loss, self.steps, self.start = 0.0, 0, time.perf_counter()

    def add(self, loss: float) -> None:
        self.loss += loss
        self.steps += 1

    def log(self, done: int, lr: float) -> None:
        elapsed = time.perf_counter() - self.start
        mean_loss = self.run.ctx.mean(self.loss / self.steps)
        rate = self.steps * self.run.recipe.batch / max(elapsed, 1e-9)
        self.run.logbook.log(done, "train", loss=mean_loss, lr=lr, images_per_s=rate)
        self.run.bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}", img_s=f"{rate:.1f}")
        self.loss, self.steps, self.start = 0.0, 0, time.perf_counter()


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
