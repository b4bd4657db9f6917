"""One training run's life in its folder, the same for every training verb.

    with TrainingRun.claim(out, "finetune", ctx, restart=opts.restart) as run:  # ours, locked, --restart
        ... data, plan, settings ...
        if (done := run.finished(settings)) is not None:    # the same run, done: report it, change nothing
            return done
        ... model ...
        run.write_config(**run.execution_facts(precision, opts))
        metrics = train(..., run.dir, run.ctx, run.fingerprint, final=run.final_weights(model, ...))
        return run.finish(summary)                          # summary.json, then every process meets

Under torchrun every process enters; the main one claims and writes, the others follow it (a
refused claim stops them all). Leaving the block normally ends the process group; an error
leaves it to the process's exit, as before.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path

import torch

from .. import rundir
from ..atomic import remove_file, write_json
from ..models import save_checkpoint
from .checkpointing import FinalWeights, check_resumable, fingerprint_of, finished_summary
from .distributed import DistContext

CHECKPOINT = Path("checkpoints") / "latest.safetensors"
FINAL = "final.safetensors"


def options_record(options) -> dict:
    """A dataclass of options as config.json records them (paths as text)."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(options).items()}


class TrainingRun:
    """A claimed and locked run folder: its settings' fingerprint, config.json, the finished model
    and summary.json, written on the main process."""

    def __init__(self, folder: Path, ctx: DistContext, *, restart: bool = False, final_stands_in: bool = True):
        self.dir, self.ctx, self.restart = Path(folder), ctx, restart
        self.final_stands_in = final_stands_in  # a finished model replaces the training checkpoint
        self.settings: dict = {}
        self.fingerprint = ""

    @property
    def checkpoint(self) -> Path:
        return self.dir / CHECKPOINT

    @property
    def final_path(self) -> Path:
        return self.dir / FINAL

    @classmethod
    @contextlib.contextmanager
    def claim(cls, out: Path, kind: str, ctx: DistContext, *, restart: bool = False,
              final_stands_in: bool = True) -> Iterator[TrainingRun]:
        """Claim and lock `out` for a `kind` run (new, empty or one of ours); under `restart`, drop its
        training checkpoint (only that: metrics and the rest are ours to overwrite as the run goes)."""
        with rundir.owned(Path(out), kind, main=ctx.is_main, agree=ctx.agree):
            run = cls(out, ctx, restart=restart, final_stands_in=final_stands_in)
            if restart and ctx.is_main:
                remove_file(run.checkpoint)
            ctx.barrier()
            yield run
            ctx.shutdown()

    def finished(self, settings: dict) -> dict | None:
        """Fingerprint `settings` (everything that defines the result); the summary if this very run
        already finished here, else None once any checkpoint left here is known to be this run's."""
        self.settings, self.fingerprint = settings, fingerprint_of(settings)
        done = None if self.restart else finished_summary(self.dir, self.fingerprint)
        if done is not None:
            return done
        self._check_resumable()
        return None

    def identify(self, settings: dict) -> None:
        """Fingerprint `settings` and check that any checkpoint left here is this run's, without
        reusing a finished run (for a verb whose fingerprint leaves out what its summary reports)."""
        self.settings, self.fingerprint = settings, fingerprint_of(settings)
        self._check_resumable()

    def _check_resumable(self) -> None:
        # before config.json is replaced; a finished run's model stands in for its checkpoint
        stand_in = self.final_path if self.final_stands_in and not self.restart else None
        check_resumable(self.checkpoint, self.fingerprint, stand_in)

    def execution_facts(self, precision: str, options) -> dict:
        """How this run executes, as config.json records it: processes, device, precision, options."""
        return {"world_size": self.ctx.world_size, "device": str(self.ctx.device), "precision": precision,
                "options": options_record(options)}

    def write_config(self, **facts) -> None:
        """config.json: the settings, their fingerprint, then `facts` in the order given."""
        if self.ctx.is_main:
            write_json(self.dir / "config.json", {**self.settings, "fingerprint": self.fingerprint, **facts})

    def final_weights(self, model: torch.nn.Module, *, class_names: list[str], resolution: int,
                      provenance: dict) -> FinalWeights:
        """Where the finished model goes (final.safetensors, with the run's fingerprint in its
        provenance, so a run killed before its last evaluation resumes from it; not under --restart)."""
        def write(state: dict | None = None) -> None:
            save_checkpoint(model, self.final_path, class_names=class_names, resolution=resolution,
                            provenance={**provenance, "fingerprint": self.fingerprint}, state_dict=state)

        return FinalWeights(self.final_path, write, resume=not self.restart)

    def finish(self, summary: dict, then: Callable[[], None] | None = None) -> dict:
        """summary.json (its presence, with config.json's fingerprint, marks the run finished), `then`
        on the main process, and every process waits for the main one; returns `summary`."""
        if self.ctx.is_main:
            write_json(self.dir / "summary.json", summary)
            if then is not None:
                then()
        self.ctx.barrier()
        return summary
