"""Training runs killed outright mid-way, for the resume tests of every training verb."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from safetensors import SafetensorError, safe_open

CHECKPOINT = Path("checkpoints") / "latest.safetensors"


def step_of(checkpoint: Path) -> int | None:
    """The step a training checkpoint holds; None while there is none (or it is caught mid-rename)."""
    try:
        with safe_open(str(checkpoint), "pt") as fh:
            return int(fh.metadata()["step"])
    except (SafetensorError, OSError, KeyError, ValueError):
        return None


def kill_once_checkpointed(cmd: list[str], out: Path, step: int, env: dict | None = None) -> int | None:
    """Run `cmd` (a training run writing `out`) in a session of its own, SIGKILL the whole session
    as soon as its checkpoint holds `step` or later, and return the step the checkpoint holds then."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 600  # generous under load (torchrun alone can take minutes): ends at the checkpoint
    while time.time() < deadline and proc.poll() is None and (step_of(out / CHECKPOINT) or 0) < step:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return step_of(out / CHECKPOINT)
