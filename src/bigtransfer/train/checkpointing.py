"""Training state on disk: model, optimizer state and step, in one atomically written file.

`.safetensors` only (no pickle): tensors under `model/...` and `optimizer/...`, the step and
the run's fingerprint in the metadata. A resumed run refuses a checkpoint whose fingerprint
differs, so a changed command cannot silently continue someone else's run.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..atomic import RESUME_HINT, write_safetensors
from ..errors import BigTransferError
from ..safe_text import load_json

FORMAT = "bigtransfer-train-state"


SEPARATOR = "::"  # optimizer/<param>::<state key>; SGD's momentum keeps its old name, optimizer/<param>


def _flat(name: str, key: str) -> str:
    return name if key == "momentum_buffer" else f"{name}{SEPARATOR}{key}"


def _nested(flat: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    state: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in flat.items():
        name, _, part = key.partition(SEPARATOR)
        state.setdefault(name, {})[part or "momentum_buffer"] = value
    return state


def gather_train_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, fsdp: bool
                       ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(model state, optimizer state flattened by parameter name), whole and on the CPU.

    SGD's state is its momentum; Adam's its two moments and step count. Under FSDP every process
    must call this (it gathers the shards); the result is only complete on the main process.
    Whole tensors are what make a checkpoint resumable on any number of processes, and loadable
    without torch.distributed at all.
    """
    if fsdp:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_state = get_model_state_dict(model, options=options)
        flat = {}
        if optimizer is not None:
            states = get_optimizer_state_dict(model, optimizer, options=options).get("state", {})
            flat = {_flat(name, k): v for name, s in states.items() for k, v in s.items() if torch.is_tensor(v)}
        return model_state, flat
    names = {id(p): n for n, p in model.named_parameters()}
    flat = {}
    for group in (optimizer.param_groups if optimizer is not None else []):
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                if torch.is_tensor(value):
                    flat[_flat(names[id(p)], key)] = value.detach().cpu()
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}, flat


def save_train_state(path: Path, model_state: dict[str, torch.Tensor], optimizer_state: dict[str, torch.Tensor],
                     step: int, fingerprint: str, extra: dict | None = None) -> None:
    tensors = {f"model/{k}": v.contiguous() for k, v in model_state.items()}
    tensors.update({f"optimizer/{k}": v.contiguous() for k, v in optimizer_state.items()})
    meta = {"format": FORMAT, "step": str(step), "fingerprint": fingerprint, "extra": json.dumps(extra or {})}
    write_safetensors(path, tensors, meta, what=f"checkpoint of step {step}", hint=RESUME_HINT)


def read_train_state(path: Path, fingerprint: str) -> tuple[dict, dict, int, dict]:
    """(model state, optimizer state, completed steps, extra) from a training checkpoint."""
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            if meta.get("format") != FORMAT:
                raise BigTransferError(f"{path}: not a bigtransfer training checkpoint")
            if meta.get("fingerprint") != fingerprint:
                raise BigTransferError(f"{path}: {DIFFERENT_SETTINGS}")
            names = fh.keys()
            state = {k[len("model/"):]: fh.get_tensor(k) for k in names if k.startswith("model/")}
            momentum = {k[len("optimizer/"):]: fh.get_tensor(k) for k in names if k.startswith("optimizer/")}
    except (SafetensorError, OSError) as err:
        raise BigTransferError(f"{path}: unreadable training checkpoint ({err}); pass --restart to start over") from None
    return state, momentum, int(meta["step"]), load_json(meta.get("extra") or "{}")


DIFFERENT_SETTINGS = ("this run directory holds a run with different settings; re-run the original command to "
                      "resume, or choose a new --out (or pass --restart)")


def check_resumable(path: Path, fingerprint: str, final: Path | None = None) -> None:
    """A training checkpoint, if there is one, belongs to this run (read from its header alone);
    so does a finished model `final` that stands in for it (a finished run keeps no checkpoint)."""
    if not path.is_file():
        if final is not None and final.is_file() and _provenance_fingerprint(final) != fingerprint:
            raise BigTransferError(f"{final}: {DIFFERENT_SETTINGS}")
        return
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
    except (SafetensorError, OSError) as err:
        raise BigTransferError(f"{path}: unreadable training checkpoint ({err}); pass --restart to start over") from None
    if meta.get("format") != FORMAT:
        raise BigTransferError(f"{path}: not a bigtransfer training checkpoint")
    if meta.get("fingerprint") != fingerprint:
        raise BigTransferError(f"{path}: {DIFFERENT_SETTINGS}")


def finished_summary(run_dir: Path, fingerprint: str) -> dict | None:
    """The summary of a finished run with this fingerprint (nothing left to do), else None."""
    run_dir = Path(run_dir)
    try:
        config = load_json((run_dir / "config.json").read_text())
        summary = load_json((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    done = isinstance(config, dict) and config.get("fingerprint") == fingerprint and isinstance(summary, dict)
    return summary if done and (run_dir / "final.safetensors").is_file() else None


@dataclass(frozen=True)
class FinalWeights:
    """Where a run's finished model goes: `write(state)` makes `path` from whole tensors (called on
    the main process), with the run's fingerprint in its provenance metadata. `resume`: a run
    killed after writing it (before its last evaluation) continues from it (not under --restart)."""

    path: Path
    write: Callable[[dict[str, torch.Tensor]], object]
    resume: bool = True


def _fingerprint_in(metadata: dict | None) -> str | None:
    """The run fingerprint that a weights file's provenance metadata names, if any."""
    provenance = load_json((metadata or {}).get("provenance") or "{}")
    return provenance.get("fingerprint") if isinstance(provenance, dict) else None


def _provenance_fingerprint(path: Path) -> str | None:
    """The fingerprint of the run that wrote a weights file (None if it names none or is unreadable)."""
    try:
        with safe_open(str(path), framework="pt") as fh:
            return _fingerprint_in(fh.metadata())
    except (SafetensorError, OSError, ValueError):
        return None


def finished_weights(path: Path, fingerprint: str) -> dict[str, torch.Tensor] | None:
    """The tensors of `path` if it is this run's finished model (its provenance names the
    fingerprint), else None: a run killed between saving its model and evaluating it resumes here."""
    if not Path(path).is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as fh:  # one open: the header, then the tensors
            if _fingerprint_in(fh.metadata()) != fingerprint:
                return None
            return {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError):
        return None  # damaged or unreadable: train again rather than trust it


def restore_train_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, model_state: dict,
                        optimizer_state: dict, fsdp: bool) -> None:
    """Put whole tensors back into a (possibly sharded) model and its optimizer."""
    nested = _nested(optimizer_state)
    if fsdp:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_optimizer_state_dict,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True)
        set_model_state_dict(model, model_state, options=options)
        if nested:
            current = get_optimizer_state_dict(model, optimizer, options=options)
            current["state"] = nested
            set_optimizer_state_dict(model, optimizer, current, options=options)
        return
    model.load_state_dict(model_state)
    params = dict(model.named_parameters())
    for name, state in nested.items():
        for key, value in state.items():  # Adam's step count stays on the CPU, as torch keeps it
            optimizer.state[params[name]][key] = value if key == "step" else value.to(params[name].device)


def fingerprint_of(settings: dict) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]

