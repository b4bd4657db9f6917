"""How a training verb runs, as opposed to what it computes: one set of options for them all.

Fine-tuning, pre-training and distillation share these (their option dataclasses inherit them),
and the CLI builds them with one argument group (`cli/common.py: add_execution_args`). None of
them changes a run's results, so none is part of a run's fingerprint: a run may resume with
another batch split, more loader workers or on another device.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import BigTransferError


@dataclass(kw_only=True)
class ExecutionOptions:
    batch_split: int | str = 1  # micro-batches per step (gradient accumulation), or "auto"
    eval_every: int = 0  # steps; 0: only at the end
    checkpoint_every: int = 0  # steps; 0: every 10 minutes of wall time (and at the end)
    log_every: int = 10  # steps between training-loss records
    workers: int = 0  # data-loading processes
    precision: str = "auto"  # auto | fp32 | bf16 (autocast)
    compile: bool = False  # torch.compile the model
    fsdp: bool = False  # under torchrun: shard weights, gradients and momentum (FSDP)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    restart: bool = False  # discard the run's training checkpoint and start over
    progress: bool = True  # progress bars and the printed plan

    def check_execution(self, auto_split: bool = True) -> None:
        """Each execution option in range (no data or model needed); one clear error otherwise."""
        if not (auto_split and self.batch_split == "auto") and (
                not isinstance(self.batch_split, int) or self.batch_split < 1):
            raise BigTransferError(f"--batch-split must be a whole number >= 1{' or auto' if auto_split else ''}, "
                                   f"got {self.batch_split!r}")
        for flag, value, low in (("eval-every", self.eval_every, 0), ("checkpoint-every", self.checkpoint_every, 0),
                                 ("log-every", self.log_every, 1), ("workers", self.workers, 0)):
            if value < low:
                raise BigTransferError(f"--{flag} must be at least {low}, got {value}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise BigTransferError(f"--precision must be auto, fp32 or bf16, got {self.precision!r}")
        if self.device != "auto":
            import torch

            try:
                device = torch.device(self.device)
            except RuntimeError:
                raise BigTransferError(f"--device: not a device name: {self.device!r}") from None
            if device.type == "cuda" and not torch.cuda.is_available():
                raise BigTransferError(f"--device {self.device}: no CUDA device is available on this machine")
