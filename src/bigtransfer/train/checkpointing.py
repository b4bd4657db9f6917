"""Training state on disk: model, optimizer momentum and step, in one atomically written file.

`.safetensors` only (no pickle): tensors under `model/...` and `optimizer/...`, the step and
the run's fingerprint in the metadata. A resumed run refuses a checkpoint whose fingerprint
differs, so a changed command cannot silently continue someone else's run.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..errors import BigTransferError

FORMAT = "bigtransfer-train-state"


def save_train_state(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int,
                     fingerprint: str) -> None:
    names = {id(p): n for n, p in model.named_parameters()}
    tensors = {f"model/{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    for group in optimizer.param_groups:
        for p in group["params"]:
            buf = optimizer.state.get(p, {}).get("momentum_buffer")
            if buf is not None:
                tensors[f"optimizer/{names[id(p)]}"] = buf.detach().cpu().contiguous()
    meta = {"format": FORMAT, "step": str(step), "fingerprint": fingerprint}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=meta)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_train_state(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                     fingerprint: str) -> int:
    """Restore model and momentum from `path`; returns the number of completed steps."""
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            if meta.get("format") != FORMAT:
                raise BigTransferError(f"{path}: not a bigtransfer training checkpoint")
            if meta.get("fingerprint") != fingerprint:
                raise BigTransferError(
                    f"{path}: this run directory holds a run with different settings; "
                    f"re-run the original command to resume, or choose a new --out (or pass --restart)"
                )
            names = fh.keys()
            state = {k[len("model/"):]: fh.get_tensor(k) for k in names if k.startswith("model/")}
            momentum = {k[len("optimizer/"):]: fh.get_tensor(k) for k in names if k.startswith("optimizer/")}
    except (SafetensorError, OSError) as err:
        raise BigTransferError(f"{path}: unreadable training checkpoint ({err}); pass --restart to start over") from None
    model.load_state_dict(state)
    params = dict(model.named_parameters())
    for name, buf in momentum.items():
        optimizer.state[params[name]]["momentum_buffer"] = buf.to(params[name].device)
    return int(meta["step"])


def fingerprint_of(settings: dict) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]
