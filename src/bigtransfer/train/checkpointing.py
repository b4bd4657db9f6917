"""Training state on disk: model, optimizer momentum and step, in one atomically written file.

`.safetensors` only (no pickle): tensors under `model/...` and `optimizer/...`, the step and
the run's fingerprint in the metadata. A resumed run refuses a checkpoint whose fingerprint
differs, so a changed command cannot silently continue someone else's run.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..atomic import RESUME_HINT, write_atomically, write_json
from ..errors import BigTransferError

FORMAT = "bigtransfer-train-state"


def gather_train_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, fsdp: bool
                       ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(model state, momentum by parameter name), whole and on the CPU.

    Under FSDP every process must call this (it gathers the shards); the result is only
    complete on the main process. Whole tensors are what make a checkpoint resumable on any
    number of processes, and loadable without torch.distributed at all.
    """
    if fsdp:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_state = get_model_state_dict(model, options=options)
        momentum = {}
        if optimizer is not None:
            states = get_optimizer_state_dict(model, optimizer, options=options).get("state", {})
            momentum = {name: s["momentum_buffer"] for name, s in states.items() if "momentum_buffer" in s}
        return model_state, momentum
    names = {id(p): n for n, p in model.named_parameters()}
    momentum = {}
    for group in (optimizer.param_groups if optimizer is not None else []):
        for p in group["params"]:
            buf = optimizer.state.get(p, {}).get("momentum_buffer")
            if buf is not None:
                momentum[names[id(p)]] = buf.detach().cpu()
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}, momentum


def save_train_state(path: Path, model_state: dict[str, torch.Tensor], momentum: dict[str, torch.Tensor],
                     step: int, fingerprint: str, extra: dict | None = None) -> None:
    tensors = {f"model/{k}": v.contiguous() for k, v in model_state.items()}
    tensors.update({f"optimizer/{k}": v.contiguous() for k, v in momentum.items()})
    meta = {"format": FORMAT, "step": str(step), "fingerprint": fingerprint, "extra": json.dumps(extra or {})}
    write_atomically(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta), what=f"checkpoint of step {step}",
                     hint=RESUME_HINT, durable=True)


def read_train_state(path: Path, fingerprint: str) -> tuple[dict, dict, int, dict]:
    """(model state, momentum, completed steps, extra) from a training checkpoint."""
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
    return state, momentum, int(meta["step"]), json.loads(meta.get("extra") or "{}")


def restore_train_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, model_state: dict,
                        momentum: dict, fsdp: bool) -> None:
    """Put whole tensors back into a (possibly sharded) model and its optimizer."""
    if fsdp:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_optimizer_state_dict,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True)
        set_model_state_dict(model, model_state, options=options)
        if momentum:
            current = get_optimizer_state_dict(model, optimizer, options=options)
            current["state"] = {name: {"momentum_buffer": buf} for name, buf in momentum.items()}
            set_optimizer_state_dict(model, optimizer, current, options=options)
        return
    model.load_state_dict(model_state)
    params = dict(model.named_parameters())
    for name, buf in momentum.items():
        optimizer.state[params[name]]["momentum_buffer"] = buf.to(params[name].device)


def fingerprint_of(settings: dict) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def write_json_atomic(path: Path, data: dict) -> None:
    """JSON via a temporary file and a rename: readers never see half a file."""
    write_json(path, data)
