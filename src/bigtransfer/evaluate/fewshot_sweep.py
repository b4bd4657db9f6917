"""The paper's few-shot protocol: fine-tune at K examples per class over several random draws.

For every K (default 1, 5, 10, 25, 100) and every repeat r (seeds 0..R-1, default 5) draw K
images of every class, fine-tune with BiT-HyperRule, and test on the full test split. The
result is min <- median -> max per K, as the authors' release reports it, beside a linear probe
on frozen features fitted to the same draws.

Every (K, seed) is an independent job in OUT/<K>shot/seed<r>/, a normal fine-tuning run
directory. A finished job (its summary.json exists) is never repeated; an interrupted one
resumes from its checkpoint. `shard=(i, n)` runs only every n-th job starting at i, so n
processes (one per GPU, or one per machine sharing OUT) split a sweep; any of them, or
`bigtransfer report OUT`, then collects what has finished.

Images are decoded and resized once per resolution (data/cache.py) and shared by all jobs.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from .. import rundir
from ..atomic import write_json
from ..data.cache import decoded, decoded_splits
from ..data.dataset import TransformedImages
from ..data.fewshot import sample_per_class
from ..data.sources import Splits, load_source
from ..data.transforms import eval_transform
from ..errors import BigTransferError
from ..recipes.finetune import FinetuneOptions, check_options, make_plan, prepare_data, run_finetune
from ..report.folder import claim_out
from ..report.protocols.fewshot import collect_fewshot, write_fewshot_report
from ..rundir import RunInUse

FULL = "full"  # a "shot count" meaning the whole training split
DEFAULT_SHOTS = (1, 5, 10, 25, 100)


@dataclass(frozen=True)
class Job:
    shots: int | str  # K, or FULL
    seed: int

    @property
    def name(self) -> str:
        return f"{self.shots}shot/seed{self.seed}"

    @property
    def examples_per_class(self) -> int | None:
        return None if self.shots == FULL else int(self.shots)


@dataclass
class SweepOptions:
    finetune: FinetuneOptions  # data, model, HyperRule overrides, execution; out/K/seed are set per job
    out: Path = Path("runs/fewshot")
    shots: tuple = DEFAULT_SHOTS
    repeats: int = 5
    linear_probe: bool = True
    cache: bool = True
    shard: tuple[int, int] = (0, 1)
    extra: dict = field(default_factory=dict)  # recorded in protocol.json (e.g. the caller's name)


def parse_shots(text: str) -> tuple:
    """'1,5,10,full' -> (1, 5, 10, 'full')."""
    shots = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        if part == FULL:
            shots.append(FULL)
            continue
        try:
            k = int(part)
        except ValueError:
            raise BigTransferError(f"--shots: expected whole numbers or 'full', got {part!r}") from None
        if k < 1:
            raise BigTransferError(f"--shots: K must be at least 1, got {k}")
        shots.append(k)
    if not shots:
        raise BigTransferError("--shots: give at least one K, e.g. 1,5,10")
    return tuple(dict.fromkeys(shots))


def jobs(shots, repeats: int) -> list[Job]:
    if repeats < 1:
        raise BigTransferError(f"--repeats must be at least 1, got {repeats}")
    return [Job(k, seed) for k in shots for seed in range(repeats)]


def draw(splits: Splits, job: Job) -> np.ndarray:
    """The training indices a job uses: exactly what `finetune -k K --seed S` would draw."""
    if job.shots == FULL:
        return np.arange(len(splits.train))
    return sample_per_class(splits.train.labels, int(job.shots), job.seed, splits.classes)


def job_options(opts: SweepOptions, job: Job) -> FinetuneOptions:
    return replace(opts.finetune, out=Path(opts.out) / job.name, examples_per_class=job.examples_per_class,
                   seed=job.seed, progress=False)


def protocol_settings(opts: SweepOptions) -> dict:
    """What defines the sweep's results (a resumed sweep must match it)."""
    ft = asdict(opts.finetune)
    keep = ("data", "model", "weights", "val_fraction", "split_seed", "batch", "base_lr", "steps", "resolution",
            "mixup", "flip", "random_crop", "schedule", "freeze_until", "linear_probe", "dropout", "l2_to_init")
    finetune = {k: ft[k] for k in keep}
    if ft["keep_head"]:  # recorded only when set, so sweeps written before the option still resume
        finetune["keep_head"] = True
    return {"protocol": "fewshot", "shots": list(opts.shots), "repeats": opts.repeats,
            "linear_probe_baseline": opts.linear_probe, "finetune": finetune, **opts.extra}


def cached_splits(opts: SweepOptions, splits: Splits, todo: list[Job]) -> Splits:
    """The splits with the images `todo` trains on decoded once at the plan's resize and the test
    split at its crop, kept under OUT/cache."""
    plans = [make_plan(job_options(opts, job), prepare_data(job_options(opts, job), splits)) for job in todo]
    sides = {(plan.train_side, plan.crop) for plan in plans}
    if len(sides) != 1:  # draws straddle the 96x96 area rule: decode on the fly
        return splits
    (train_side, crop), = sides
    needed = sorted(set().union(*(draw(splits, job).tolist() for job in todo)))
    return decoded_splits(splits, train_side, crop, needed=needed, cache_dir=Path(opts.out) / "cache",
                          strict=opts.finetune.strict, progress=opts.finetune.progress)


def run_sweep(opts: SweepOptions) -> dict:
    """Run this shard's unfinished jobs (and the linear-probe baseline); returns the collected results."""
    index, count = opts.shard
    if not 0 <= index < count:
        raise BigTransferError(f"--shard must be I/N with 0 <= I < N, got {index}/{count}")
    out = Path(opts.out)
    all_jobs = jobs(opts.shots, opts.repeats)
    check_options(opts.finetune, check_out=False)
    rundir.check_claim(out, "fewshot")
    splits = load_source(opts.finetune.data, val_fraction=opts.finetune.val_fraction, seed=opts.finetune.split_seed,
                         strict=opts.finetune.strict, progress=opts.finetune.progress)
    if splits.test is None:
        raise BigTransferError(f"--data {opts.finetune.data}: nothing to evaluate on (no val/test split)")
    for job in all_jobs:
        draw(splits, job)  # a class with fewer than K images is an error now, not after hours of other jobs
    claim_out(out, protocol_settings(opts))
    mine = [job for i, job in enumerate(all_jobs) if i % count == index]
    todo = [job for job in mine if not (out / job.name / "summary.json").is_file()]
    data = cached_splits(opts, splits, todo) if todo and opts.cache else splits
    from tqdm.auto import tqdm

    bar = tqdm(total=len(mine), initial=len(mine) - len(todo), desc="few-shot runs", unit="run",
               disable=not opts.finetune.progress)
    for job in todo:
        start = time.perf_counter()
        try:
            summary = run_finetune(job_options(opts, job), splits=data)
        except RunInUse as err:  # another worker of this sweep is training it: never both at once
            bar.write(f"{job.name}: skipped, {err}")
            continue
        bar.update()
        if opts.finetune.progress:
            bar.write(f"{job.name}: top-1 {summary['final']['top1']:.2%} ({time.perf_counter() - start:.0f}s)")
    bar.close()
    if opts.linear_probe and index == 0:
        _linear_probe_baseline(opts, splits, all_jobs)
    results = collect_fewshot(out)
    write_fewshot_report(out, results)
    return results


def _linear_probe_baseline(opts: SweepOptions, splits: Splits, all_jobs: list[Job]) -> None:
    """Logistic regression on frozen pre-logits for every (K, seed) draw; features computed once."""
    from ..inference.predictor import resolve_device
    from ..models.factory import create_model, model_source
    from ..train.linear_probe import extract_features, fit_logistic_regression

    path = Path(opts.out) / "linear_probe.json"
    done = json.loads(path.read_text()) if path.is_file() else {}
    missing = [job for job in all_jobs if job.name not in done]
    if not missing:
        return
    ft = opts.finetune
    plan = make_plan(job_options(opts, missing[0]), prepare_data(job_options(opts, missing[0]), splits))
    device = resolve_device(ft.device)
    name, weights = model_source(ft.model, ft.weights)
    torch.manual_seed(0)  # a from-scratch body (a control experiment) is the same one every time
    model = create_model(name, num_classes=len(splits.classes), weights=weights).to(device)
    needed = sorted(set().union(*(draw(splits, job).tolist() for job in missing)))
    cache_dir = Path(opts.out) / "cache" if opts.cache else None
    train = decoded(splits.train, plan.crop, needed=needed, cache_dir=cache_dir, strict=ft.strict, progress=ft.progress)
    test = decoded(splits.test, plan.crop, cache_dir=cache_dir, strict=ft.strict, progress=ft.progress)
    transform = eval_transform(plan.crop)
    train_x, train_y = extract_features(model, TransformedImages(train.subset(needed), transform), device,
                                        workers=ft.workers, progress=ft.progress)
    test_x, test_y = extract_features(model, TransformedImages(test, transform), device,
                                      workers=ft.workers, progress=ft.progress)
    position = {i: p for p, i in enumerate(needed)}
    for job in missing:
        rows = torch.tensor([position[i] for i in draw(splits, job).tolist()])
        weight, bias = fit_logistic_regression(train_x[rows], train_y[rows], len(splits.classes))
        logits = test_x @ weight.T + bias
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
        done[job.name] = {"shots": job.shots, "seed": job.seed,
                          "top1": float((logits.argmax(1) == test_y).float().mean()),
                          "top5": float((top5 == test_y[:, None]).any(1).float().mean())}
        write_json(path, done)

