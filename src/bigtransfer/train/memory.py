"""What a model costs to train: memory, the micro-batch size that fits, and FLOPs per image.

The activation estimate runs one forward pass on the meta device (no memory, no compute) and
adds up every tensor autograd saves for the backward pass: what a real step keeps alive.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from ..errors import BigTransferError
from ..models.resnetv2 import ModelConfig, ResNetV2

SAFETY = 1.3  # allocator slack, cuDNN/oneDNN workspaces, the loader's batches


def _saved_bytes(model: ResNetV2, batch: int, crop: int, bf16: bool) -> int:
    x = torch.empty(batch, 3, crop, crop, device="meta")
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        if not isinstance(t, torch.nn.Parameter):  # weights are counted in state_bytes
            seen[id(t)] = t.numel() * (2 if bf16 and t.is_floating_point() else t.element_size())
        return t  # keeping the object alive keeps its id unique for the pass

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x).sum()
    del out
    return sum(seen.values())


@functools.lru_cache(maxsize=64)
def saved_bytes_per_image(config: ModelConfig, crop: int, bf16: bool) -> int:
    """Bytes autograd saves for the backward pass per image at `crop` x `crop`.

    Two batch sizes are differenced, so per-pass costs (standardized kernels) cancel out.
    """
    with torch.device("meta"):
        model = ResNetV2(config)
    # Batches of 2 and 3, not 1 and 2: BatchNorm refuses a training batch of one 1x1 feature map.
    return _saved_bytes(model, 3, crop, bf16) - _saved_bytes(model, 2, crop, bf16)


@functools.lru_cache(maxsize=64)
def forward_flops_per_image(config: ModelConfig, crop: int) -> int:
    """FLOPs (2 per multiply-add) of one image's forward pass, counted on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = ResNetV2(config).eval()  # eval: BatchNorm variants accept one image at any size
    with FlopCounterMode(display=False) as counter:
        model(torch.empty(1, 3, crop, crop, device="meta"))
    return int(counter.get_total_flops())


def state_bytes(config: ModelConfig, trainable_fraction: float = 1.0) -> int:
    """Weights + gradients + SGD momentum, fp32."""
    from ..models.resnetv2 import parameter_count

    n = parameter_count(config.arch, config.num_classes, config.norm)
    return int(n * 4 * (1 + 2 * trainable_fraction))


def training_bytes(config: ModelConfig, crop: int, micro_batch: int, bf16: bool) -> int:
    return int(state_bytes(config) + SAFETY * micro_batch * saved_bytes_per_image(config, crop, bf16))


def available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 8 * 2**30  # unknown platform: assume a modest machine


def auto_batch_split(config: ModelConfig, crop: int, per_process_batch: int, device: torch.device,
                     bf16: bool, budget_fraction: float = 0.8) -> int:
    """The smallest split (largest micro-batch dividing the batch) whose estimate fits in memory."""
    budget = budget_fraction * available_bytes(device)
    for split in range(1, per_process_batch + 1):
        if per_process_batch % split:
            continue
        if training_bytes(config, crop, per_process_batch // split, bf16) <= budget:
            return split
    raise BigTransferError(
        f"even one image per micro-batch does not fit: {training_bytes(config, crop, 1, bf16) / 2**30:.1f} GiB "
        f"needed, {budget / 2**30:.1f} GiB available; use a smaller model or --resolution"
    )


def report(config: ModelConfig, crop: int, batch: int, memory_for_gib: float | None = None) -> dict:
    """The memory figures `bigtransfer plan` prints (GiB), with a --batch-split suggestion if asked."""
    gib = 2**30
    out = {
        "weights_grads_momentum_gib": state_bytes(config) / gib,
        "activations_per_image_gib_fp32": SAFETY * saved_bytes_per_image(config, crop, False) / gib,
        "activations_per_image_gib_bf16": SAFETY * saved_bytes_per_image(config, crop, True) / gib,
        "full_batch_one_pass_gib_fp32": training_bytes(config, crop, batch, False) / gib,
    }
    if memory_for_gib:
        fits = [s for s in range(1, batch + 1) if batch % s == 0
                and training_bytes(config, crop, batch // s, False) <= 0.8 * memory_for_gib * gib]
        out["suggested_batch_split_fp32"] = fits[0] if fits else None
    return out
