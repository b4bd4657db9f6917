"""The paper's normalisation ablation (Tables 4 and 5): BN, BN+WS, GN, GN+WS, upstream and transferred.

The same architecture is pre-trained four times on one upstream dataset, once per normalisation,
with everything else equal; Table 4 is each model's upstream validation top-1. Each model is then
transferred with the few-shot protocol (fine-tuning with BiT-HyperRule over random draws) to the
downstream tasks; Table 5 is the median test top-1 per task and shot count. The defaults are the
demo's scale (procedural glyphs upstream, handwritten digits downstream, minutes per model on a
CPU); the paper's scale is R50x1 on ILSVRC-2012 at batch 4096, where GN+WS wins upstream and in
transfer (Table 4: BN 75.6, BN+WS 75.8, GN 70.2, GN+WS 76.0 top-1).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from ..errors import BigTransferError
from ..recipes.demo_scale import DEMO_SCALE as _DEMO
from ..recipes.finetune import FinetuneOptions
from ..recipes.pretrain import PretrainOptions, run_pretrain
from ..report.folder import claim_out
from ..report.protocols.ablation import transfer_dir
from .fewshot_sweep import SweepOptions, run_sweep

NORMS = ("bn", "bn_ws", "gn", "gn_ws")


@dataclass
class AblationOptions:
    out: Path = Path("runs/ablation")
    upstream: str = _DEMO.upstream_data
    downstream: tuple[str, ...] = ("digits",)
    arch: str = _DEMO.arch
    norms: tuple[str, ...] = NORMS
    # upstream recipe, scaled down as in the demo
    upstream_resolution: int = _DEMO.upstream_resolution
    upstream_batch: int = _DEMO.pretrain_batch
    upstream_epochs: float = _DEMO.pretrain_epochs
    upstream_base_lr: float = _DEMO.pretrain_base_lr
    min_crop_area: float = _DEMO.min_crop_area
    # transfer: the few-shot protocol with the demo's time-budgeted HyperRule
    shots: tuple = _DEMO.shots
    repeats: int = 3  # draws per shot count (the CLI's --repeats default; the demo itself draws more)
    finetune_batch: int = _DEMO.finetune_batch
    finetune_steps: int = _DEMO.finetune_steps
    finetune_lr: float = _DEMO.finetune_lr
    finetune_resolution: tuple[int, int] = _DEMO.finetune_resolution
    flip: bool = False  # the digits: a mirrored digit is another shape
    workers: int = _DEMO.workers
    precision: str = "auto"
    device: str = "auto"
    progress: bool = True
    extra: dict = field(default_factory=dict)


def _pretrain(opts: AblationOptions, norm: str) -> dict:
    out = Path(opts.out) / "upstream" / norm
    if (out / "summary.json").is_file():
        return json.loads((out / "summary.json").read_text())
    return run_pretrain(PretrainOptions(
        data=opts.upstream, model=opts.arch, norm=norm, out=out, recipe=_DEMO.recipe,  # Table 4 is BiT-S-style
        resolution=opts.upstream_resolution,
        batch=opts.upstream_batch, epochs=opts.upstream_epochs, base_lr=opts.upstream_base_lr,
        min_crop_area=opts.min_crop_area, workers=opts.workers, precision=opts.precision, device=opts.device,
        progress=opts.progress, log_every=50))


def _transfer(opts: AblationOptions, norm: str, task: str) -> dict:
    finetune = FinetuneOptions(
        data=task, model=str(Path(opts.out) / "upstream" / norm), batch=opts.finetune_batch, steps=opts.finetune_steps,
        base_lr=opts.finetune_lr, resolution=opts.finetune_resolution, flip=opts.flip, workers=opts.workers,
        precision=opts.precision, device=opts.device, progress=opts.progress)
    return run_sweep(SweepOptions(finetune=finetune, out=transfer_dir(opts.out, task, norm), shots=opts.shots,
                                  repeats=opts.repeats, linear_probe=False))


def protocol_settings(opts: AblationOptions) -> dict:
    settings = asdict(opts)
    for key in ("out", "workers", "precision", "device", "progress", "extra"):
        settings.pop(key)
    return {"protocol": "ablation", **settings, **opts.extra}


def run_ablation(opts: AblationOptions) -> dict:
    """Pre-train once per normalisation, transfer each, and write the two tables; resumable."""
    from ..report.protocols.ablation import collect_ablation, write_ablation_report

    unknown = [n for n in opts.norms if n not in NORMS]
    if unknown:
        raise BigTransferError(f"--norms: unknown normalisation {unknown[0]!r} (choose from {', '.join(NORMS)})")
    claim_out(Path(opts.out), protocol_settings(opts))
    for norm in opts.norms:
        if opts.progress:
            print(f"[{norm}] pre-training {opts.arch} with {norm.upper().replace('_', '+')} on {opts.upstream}",
                  flush=True)
        _pretrain(opts, norm)
        for task in opts.downstream:
            if opts.progress:
                print(f"[{norm}] transfer to {task}", flush=True)
            _transfer(replace(opts, progress=False), norm, task)
    results = collect_ablation(Path(opts.out))
    write_ablation_report(Path(opts.out), results)
    return results
