"""VTAB-1k: 19 tasks, 1000 training images each, BiT-HyperRule, one score table.

Layout: ROOT/<task>/ is any labelled source the data loader reads, holding the task's train and
test splits: `train/<class>/*` + `test/<class>/*` folders, or a `manifest.csv` with a split
column (`bigtransfer vtab-import` writes this layout from a Hugging Face dataset saved to disk).
Task names are the release's (below). VTAB-1k is defined by fixed splits: when the task folder
has them (`train/` or `train800/` beside `validation/`, `val/` or `val200/`; or manifest rows of
those splits), they are used as given: `train800` is the training split, `val200` the
validation split, `train800val200` both. Only without them is the 1000 drawn from the train
split with a fixed seed (the first 800 of a permutation are `train800`, the next 200 `val200`),
and the report says which. The score is the test top-1 after fine-tuning on train800val200;
`validate` also fine-tunes on train800 and scores val200 (what hyper-parameter selection uses).

Per task the HyperRule decides everything, except the paper's Supp. F exceptions: no flip where
mirroring changes the label, no random crop where cropping does.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from ..data.sources import Splits, load_source
from ..data.vtab_tasks import (
    GROUP_OF,
    GROUPS,
    NO_CROP,
    NO_FLIP,
    TASKS,
    TRAIN_SIZE,
    VAL_SIZE,
    aggregate,
    augmentation,
)
from ..errors import BigTransferError
from ..recipes.finetune import FinetuneOptions, check_options, run_finetune
from ..rundir import RunInUse
from ..safe_text import quoted

__all__ = ["GROUPS", "GROUP_OF", "NO_CROP", "NO_FLIP", "TASKS", "aggregate", "augmentation", "run_vtab",
           "vtab_1k_split"]

def vtab_1k_split(train_size_available: int, seed: int = 0, train: int = TRAIN_SIZE,
                  val: int = VAL_SIZE) -> dict[str, np.ndarray]:
    """Indices into a task's train split: train800, val200 and train800val200 (a fixed-seed draw)."""
    if train_size_available < train + val:
        raise BigTransferError(f"VTAB-1k needs {train + val} training images, the task has {train_size_available}")
    order = np.random.default_rng(seed).permutation(train_size_available)
    return {"train800": np.sort(order[:train]), "val200": np.sort(order[train:train + val]),
            "train800val200": np.sort(order[:train + val])}


@dataclass
class VtabOptions:
    finetune: FinetuneOptions  # model, HyperRule overrides, execution; data/out/flip/crop set per task
    root: Path = Path("vtab")
    out: Path = Path("runs/vtab")
    tasks: tuple[str, ...] = TASKS
    runs: int = 1  # independent fine-tunes per task (seeds 0..runs-1); the release has run0..run2
    split_seed: int = 0
    validate: bool = False
    cache: bool = True
    train_size: int = TRAIN_SIZE
    val_size: int = VAL_SIZE
    shard: tuple[int, int] = (0, 1)
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class VtabJob:
    task: str
    variant: str  # "train800val200" (scored on test) or "train800" (scored on val200)
    seed: int

    @property
    def name(self) -> str:
        return f"{self.task}/{self.variant}/seed{self.seed}"


def tasks_present(opts: VtabOptions) -> list[str]:
    for task in opts.tasks:
        if task not in GROUP_OF:
            raise BigTransferError(f"--tasks: unknown VTAB task {quoted(task)} (known: {', '.join(TASKS)})")
        if not (Path(opts.root) / task).exists():
            raise BigTransferError(f"--root {opts.root}: no folder for task {quoted(task)} (expected {opts.root}/{task}/)")
    return list(opts.tasks)


def task_data(opts: VtabOptions, task: str) -> Path:
    folder = Path(opts.root) / task
    manifest = folder / "manifest.csv"
    return manifest if manifest.is_file() else folder


def all_jobs(opts: VtabOptions) -> list[VtabJob]:
    variants = ("train800val200", "train800") if opts.validate else ("train800val200",)
    return [VtabJob(t, v, s) for t in opts.tasks for v in variants for s in range(opts.runs)]


def protocol_settings(opts: VtabOptions) -> dict:
    ft = asdict(opts.finetune)
    keep = ("model", "weights", "batch", "base_lr", "steps", "resolution", "mixup", "schedule", "flip", "random_crop",
            "dropout", "l2_to_init")
    finetune = {k: ft[k] for k in keep}
    if ft["keep_head"]:  # recorded only when set, so runs written before the option still resume
        finetune["keep_head"] = True
    return {"protocol": "vtab", "root": str(opts.root), "tasks": list(opts.tasks), "runs": opts.runs,
            "split_seed": opts.split_seed, "validate": opts.validate, "train_size": opts.train_size,
            "val_size": opts.val_size, "finetune": finetune, **opts.extra}


def task_splits(opts: VtabOptions, splits: Splits) -> dict:
    """train800, val200 and train800val200 of a task: as given in its folder, else drawn from train."""
    if splits.val is not None:
        return {"train800": splits.train, "val200": splits.val, "train800val200": splits.train.concat(splits.val),
                "source": "given"}
    parts = vtab_1k_split(len(splits.train), opts.split_seed, opts.train_size, opts.val_size)
    return {**{name: splits.train.subset(rows) for name, rows in parts.items()}, "source": "drawn"}


def job_splits(opts: VtabOptions, splits: Splits, job: VtabJob) -> Splits:
    """The job's training images and what it is scored on (test, or val200 for train800)."""
    parts = task_splits(opts, splits)
    if job.variant == "train800":
        return Splits(parts["train800"], parts["val200"], splits.skipped)
    if splits.test is None:
        raise BigTransferError(f"{opts.root}/{job.task}: no test split (expected {job.task}/test/ or a split column)")
    return Splits(parts["train800val200"], splits.test, splits.skipped)


def write_split_record(opts: VtabOptions, task: str, splits: Splits) -> None:
    """OUT/<task>/splits.json: whether the 800/200 came from the folder or a seeded draw, and sizes."""
    from ..atomic import write_json

    parts = task_splits(opts, splits)
    record = {"source": parts["source"], "train800": len(parts["train800"]), "val200": len(parts["val200"]),
              "test": len(splits.test) if splits.test is not None else 0}
    if parts["source"] == "drawn":
        record["split_seed"] = opts.split_seed
    write_json(Path(opts.out) / task / "splits.json", record)


def job_options(opts: VtabOptions, job: VtabJob) -> FinetuneOptions:
    """The job's fine-tuning: the task's Supp. F switches (and --no-flip/--no-crop for every task)."""
    aug = augmentation(job.task)
    return replace(opts.finetune, data=str(task_data(opts, job.task)), out=Path(opts.out) / job.name, seed=job.seed,
                   examples_per_class=None, progress=False, flip=aug["flip"] and opts.finetune.flip,
                   random_crop=aug["random_crop"] and opts.finetune.random_crop,
                   extra={"vtab_task": job.task, "vtab_split": job.variant, "vtab_split_seed": opts.split_seed})


def run_vtab(opts: VtabOptions) -> dict:
    """Fine-tune every unfinished job of this shard, then collect scores; returns the results."""
    from tqdm.auto import tqdm

    from ..data.cache import decoded_splits
    from ..recipes.finetune import make_plan
    from ..report.folder import claim_out
    from ..report.protocols.vtab import collect_vtab, write_vtab_report

    index, count = opts.shard
    if not 0 <= index < count:
        raise BigTransferError(f"--shard must be I/N with 0 <= I < N, got {index}/{count}")
    tasks_present(opts)
    check_options(opts.finetune, check_out=False)
    out = Path(opts.out)
    claim_out(out, protocol_settings(opts))
    jobs = all_jobs(opts)
    mine = [job for i, job in enumerate(jobs) if i % count == index]
    todo = [job for job in mine if not (out / job.name / "summary.json").is_file()]
    bar = tqdm(total=len(mine), initial=len(mine) - len(todo), desc="VTAB-1k runs", unit="run",
               disable=not opts.finetune.progress)
    for task in dict.fromkeys(job.task for job in todo):
        splits = load_source(str(task_data(opts, task)), strict=opts.finetune.strict,
                             progress=opts.finetune.progress, require_test=False, separate_val=True)
        write_split_record(opts, task, splits)
        task_jobs = [job for job in todo if job.task == task]
        for variant in dict.fromkeys(job.variant for job in task_jobs):
            runs = [job for job in task_jobs if job.variant == variant]
            data = job_splits(opts, splits, runs[0])
            if opts.cache:  # decoded once, shared by the task's runs
                plan = make_plan(job_options(opts, runs[0]), data)
                data = decoded_splits(data, plan.train_side, plan.crop, cache_dir=out / "cache" / task,
                                      strict=opts.finetune.strict, progress=opts.finetune.progress)
            for job in runs:
                try:
                    summary = run_finetune(job_options(opts, job), splits=data)
                except RunInUse as err:  # another worker is training this job: never both at once
                    bar.write(f"{job.name}: skipped, {err}")
                    continue
                bar.update()
                if opts.finetune.progress:
                    bar.write(f"{job.name}: top-1 {summary['final']['top1']:.2%}")
    bar.close()
    results = collect_vtab(out)
    write_vtab_report(out, results)
    return results
