"""One process or many (torchrun): rank, world size, device, and the few collectives we use."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_env(cls, device: str = "auto") -> DistContext:
        """Reads torchrun's RANK/WORLD_SIZE/LOCAL_RANK; starts the process group when there are several."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        dev = torch.device(device)
        if dev.type == "cuda":
            dev = torch.device("cuda", local_rank % max(1, torch.cuda.device_count()))
            torch.cuda.set_device(dev)
        if world > 1 and not dist.is_initialized():
            dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
        return cls(rank, world, local_rank, dev)

    def mean(self, value: float) -> float:
        """Average of a scalar over all processes (the value itself with one process)."""
        if not self.distributed:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t.item()) / self.world_size

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.distributed:
            dist.all_reduce(tensor)
        return tensor

    def agree(self, flag: bool) -> bool:
        """The main process's `flag`, on every process (for decisions all must take together)."""
        if not self.distributed:
            return flag
        t = torch.tensor([1 if flag else 0], device=self.device)
        dist.broadcast(t, src=0)
        return bool(t.item())

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def shutdown(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()


def wrap_for_training(model: torch.nn.Module, ctx: DistContext, fsdp: bool) -> torch.nn.Module:
    """DDP (replicated) or FSDP (each residual unit sharded: weights, grads and momentum split
    across processes) when there are several processes; the model itself otherwise."""
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        from ..errors import BigTransferError

        if not ctx.distributed:
            raise BigTransferError("--fsdp shards the model over processes: launch with torchrun --nproc_per_node N")
        from ..models.resnetv2 import keep_standardized_kernels

        # A kept standardized kernel is a whole (unsharded) copy per layer: not under FSDP.
        keep_standardized_kernels(model, False)
        for stage in model.stages:
            for unit in stage:
                fully_shard(unit)
        fully_shard(model)  # root, pre-head norm and head
        return model
    if ctx.distributed:
        return torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[ctx.device] if ctx.device.type == "cuda" else None)
    return model


@contextlib.contextmanager
def gradient_sync(net: torch.nn.Module, sync: bool):
    """Accumulating micro-batches: only the last one should reduce gradients across processes."""
    if hasattr(net, "set_requires_gradient_sync"):  # FSDP
        net.set_requires_gradient_sync(sync)
        yield
    elif isinstance(net, torch.nn.parallel.DistributedDataParallel) and not sync:
        with net.no_sync():
            yield
    else:
        yield
