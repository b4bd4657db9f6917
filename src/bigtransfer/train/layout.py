"""The memory layout a training run keeps its model and inputs in.

channels_last is what GPU tensor cores want, and on a CPU it speeds up training steps whose
activations are large. For small ones it costs: one training step of the demo's fine-tuning
(R14x0.5, 16 images of 32 px, fp32, one thread) took 0.89 of the time in NCHW on a 2-core
Intel Xeon (AVX-512, AMX) and 0.74 with AVX2 kernels; with bf16 autocast there NCHW took
0.67-0.91 up to 16 images of 128 px. In fp32 the two were even at 64k pixels per micro-batch
(64 images of 32 px, 16 of 64 px); above it channels_last was 1.05-1.17x faster for R14x0.5
(128 x 32 and 16 x 128 px) and 1.10x for R50x1 at 32 x 224 px (AVX2 kernels), and the two were
close for R50x1 at 32 x 128 px (NCHW/channels_last 1.01; 0.95 with AVX2 kernels). A 2-core AMD
EPYC (AVX-512, AVX512-BF16, no AMX) puts the fp32 crossover at the same place (0.83 at the demo's
step, 0.95 at 64 x 32 px, 1.07 at 128 x 32 px) and NCHW 0.61-0.77 in bf16. Above these
sizes the loop keeps channels_last, as it always did. `python benchmarks/cpu_layout.py` re-measures them on any CPU
(`benchmarks/results/cpu_layout*.md`).
"""

from __future__ import annotations

import torch

# Pixels per micro-batch (images x side x side) up to which NCHW trains at least as fast on a CPU.
NCHW_MAX_PIXELS = {"fp32": 64 * 32 * 32, "bf16": 16 * 128 * 128}


def training_layout(device: torch.device, precision: str, micro_batch: int, side: int) -> torch.memory_format:
    """channels_last or NCHW for a run's model and training inputs. `side` 0 (unknown): channels_last."""
    if device.type != "cpu" or not side:
        return torch.channels_last
    small = micro_batch * side * side <= NCHW_MAX_PIXELS[precision]
    return torch.contiguous_format if small else torch.channels_last
