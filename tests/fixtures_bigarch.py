"""Released-size models (up to R152x4's 936M parameters) with random weights, built cheaply.

A library's random init draws every value (kaiming, trunc-normal: seconds and a second pass over
gigabytes for the largest models). Tests that only need *some* non-degenerate weights build the
model on the meta device, allocate it with `to_empty`, and copy slices of one seeded pool of normal
values into it: a copy per tensor instead of a random draw per value.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# Prime: a tensor's slice starts at a different offset of the pool, and no tensor dimension divides
# the span, so neighbouring rows, channels or tensors never hold the same values in the same places.
_POOL_SPAN = 1_000_003


def pooled_fill_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter of `module` from one seeded pool of N(0, 1) values: kernels and heads as drawn,
    1-D weights (norm scales) 1 + 0.1 N and 1-D biases 0.1 N, so no norm is the identity."""
    if any(True for _ in module.buffers()):
        raise AssertionError("pooled_fill_ fills parameters only; this module has buffers to_empty left unset")
    params = list(module.named_parameters())
    largest = max(p.numel() for _, p in params)
    pool = torch.randn(largest + _POOL_SPAN, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        for index, (name, p) in enumerate(params):
            start = (index * 7919) % _POOL_SPAN
            p.copy_(pool[start:start + p.numel()].view(p.shape))
            if p.ndim == 1:
                p.mul_(0.1)
                if name.endswith("weight"):
                    p.add_(1.0)
    return module


def meta_built(build: Callable[[], torch.nn.Module], seed: int = 0) -> torch.nn.Module:
    """The module `build()` makes, built on the meta device (no init), then allocated on the CPU and
    filled by `pooled_fill_`; in eval mode."""
    with torch.device("meta"):
        module = build()
    return pooled_fill_(module.to_empty(device="cpu"), seed).eval()
