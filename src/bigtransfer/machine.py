"""What machine produced a result: the CPU (or GPU) and the instruction sets its kernels use.

Results of the same command differ between machines in their last bits (oneDNN picks kernels,
and with them the order of fp32 sums, by instruction set and thread count), so a reported figure
says where it was measured.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

# Instruction sets that change which fp32/bf16 kernels oneDNN runs.
KERNEL_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
CPUINFO = Path("/proc/cpuinfo")
CPUINFO_LIMIT = 4 << 20  # bytes: more than any real cpuinfo; read no further


def _cpuinfo_field(text: str, name: str) -> str | None:
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == name:
            return value.strip()
    return None


def cpu() -> dict:
    """{'model': the CPU's name, 'flags': its kernel-relevant instruction sets (None: unknown), 'cores'}."""
    text = ""
    try:
        with CPUINFO.open() as fh:
            text = fh.read(CPUINFO_LIMIT)
    except OSError:
        pass  # not Linux: the platform module's name, no flags
    model = _cpuinfo_field(text, "model name") or platform.processor() or platform.machine()
    flags = _cpuinfo_field(text, "flags")
    known = None if flags is None else [f for f in KERNEL_FLAGS if f in flags.split()]
    return {"model": model, "flags": known, "cores": os.cpu_count()}


def describe(device: str = "cpu") -> dict:
    """The machine as a results file records it: CPU, torch threads and version, and the GPU if used."""
    import torch

    info = {"cpu": cpu(), "torch": torch.__version__, "threads": torch.get_num_threads(), "device": device}
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def one_line(info: dict) -> str:
    """'Intel(R) Xeon(R) ... (2 cores; avx2, avx512_bf16), 2 threads' for a table's caption."""
    cpu_info = info["cpu"]
    flags = cpu_info["flags"]
    isa = "instruction sets unknown" if flags is None else ", ".join(flags) or "no AVX2"
    where = info.get("gpu") or f"{cpu_info['model']} ({cpu_info['cores']} cores; {isa})"
    threads = info['threads']
    at_once = info.get("runs_at_once", 1)
    runs = f" per run, {at_once} runs at once" if at_once > 1 else ""
    return f"{where}, {threads} torch thread{'' if threads == 1 else 's'}{runs}, torch {info['torch']}"
