"""Random hyper-parameter search (paper Supp. A), to compare against BiT-HyperRule.

The paper's space: lr log-uniform [1e-4, 1e-1]; steps in {500, 1000, 2000, 4000, 8000, 16000};
dropout on the pre-logits uniform [0, 0.7]; weight decay towards the initial weights log-uniform
[1e-6, 1e-1]; MixUp alpha in {none, 0.05, 0.1, 0.2, 0.4}; resolution in {64, ..., 384} (the
train crop; the resize before it keeps the HyperRule's 160/128 ratio). Everything not searched
is the HyperRule's (or the overrides given). Each trial fine-tunes on the training part of a
held-out split (VTAB-1k: 800) and is scored on the validation part (200); the best trial's
settings are then retrained on train+validation and tested, beside the HyperRule trained the
same way.

Optuna keeps the books: a study in an SQLite file under OUT by default, or any database URL
that several workers on several machines share. A trial's fine-tuning run lives in
OUT/trials/NNNN and checkpoints like any run. A worker that dies stops sending heartbeats; its
trial is then marked failed and retried with the same settings in the same directory, so it
resumes from its checkpoint instead of starting over. An SQLite file named by --storage must be
new or a study database: one holding anything but Optuna's tables, or a file that is not SQLite,
is refused before Optuna touches it. (An empty file is an empty SQLite database, and is what a
worker starting the same study a moment earlier leaves while it creates the tables: accepted.)
"""

from __future__ import annotations

import contextlib
import os
import socket
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from .. import rundir
from ..atomic import write_json
from ..data.cache import decoded_splits
from ..data.sources import Splits, load_source, stratified_split
from ..errors import BigTransferError
from ..recipes.finetune import FinetuneOptions, check_options, make_plan, run_finetune
from ..report.folder import claim_out
from ..rundir import RunInUse
from ..safe_text import path_text, quoted

RESIZE_RATIO = 160 / 128  # the HyperRule's resize/crop ratio


@dataclass(frozen=True)
class SearchSpace:
    lr: tuple[float, float] = (1e-4, 1e-1)  # log-uniform
    steps: tuple[int, ...] = (500, 1000, 2000, 4000, 8000, 16000)
    dropout: tuple[float, float] = (0.0, 0.7)  # uniform
    l2_to_init: tuple[float, float] = (1e-6, 1e-1)  # log-uniform
    mixup: tuple[float, ...] = (0.0, 0.05, 0.1, 0.2, 0.4)  # 0: no MixUp
    resolution: tuple[int, ...] = (64, 128, 192, 256, 320, 384)

    def __post_init__(self):
        for name in ("lr", "l2_to_init"):
            low, high = getattr(self, name)
            if not 0 < low <= high:
                raise BigTransferError(f"--space-{name.replace('_', '-')}: need 0 < MIN <= MAX, got {low},{high}")
        if not 0 <= self.dropout[0] <= self.dropout[1] < 1:
            raise BigTransferError(f"--space-dropout: need 0 <= MIN <= MAX < 1, got {self.dropout}")
        for name in ("steps", "mixup", "resolution"):
            values = getattr(self, name)
            if not values or min(values) < 0 or (name != "mixup" and min(values) < 1):
                raise BigTransferError(f"--space-{name}: need positive values, got {values}")

    def sample(self, trial) -> dict:
        """One point of the space, drawn through an Optuna trial (so the study records it)."""
        return {
            "base_lr": trial.suggest_float("base_lr", *self.lr, log=True),
            "steps": trial.suggest_categorical("steps", list(self.steps)),
            "dropout": trial.suggest_float("dropout", *self.dropout),
            "l2_to_init": trial.suggest_float("l2_to_init", *self.l2_to_init, log=True),
            "mixup": trial.suggest_categorical("mixup", list(self.mixup)),
            "resolution": trial.suggest_categorical("resolution", list(self.resolution)),
        }


def finetune_overrides(params: dict) -> dict:
    """FinetuneOptions fields for a point of the space."""
    crop = int(params["resolution"])
    return {"base_lr": params["base_lr"], "steps": int(params["steps"]), "dropout": params["dropout"],
            "l2_to_init": params["l2_to_init"], "mixup": params["mixup"],
            "resolution": (round(crop * RESIZE_RATIO), crop)}


@dataclass
class SearchOptions:
    finetune: FinetuneOptions  # data, model and everything not searched (the HyperRule's unless overridden)
    out: Path = Path("runs/search")
    trials: int = 40  # completed trials wanted in the study (over all workers)
    space: SearchSpace = field(default_factory=SearchSpace)
    storage: str | None = None  # default: sqlite:///OUT/study.sqlite3
    study_name: str = "search"
    seed: int | None = 0  # the sampler's; give each worker sharing a study its own
    val_fraction: float = 0.2
    train_size: int | None = None  # with val_size: a VTAB-1k style fixed draw (800 / 200)
    val_size: int | None = None
    split_seed: int = 0
    final: bool = True  # retrain the winner and the HyperRule on train+val, test both
    cache: bool = True
    heartbeat: int = 60  # seconds; a trial silent for 2x this is failed and retried


def search_splits(opts: SearchOptions, splits: Splits) -> dict[str, Splits]:
    """'search': train -> val (what trials see); 'final': train+val -> test."""
    labels = splits.train.labels
    if opts.train_size is not None or opts.val_size is not None:
        from .vtab import vtab_1k_split

        if opts.train_size is None or opts.val_size is None:
            raise BigTransferError("--train-size and --val-size go together")
        parts = vtab_1k_split(len(labels), opts.split_seed, opts.train_size, opts.val_size)
        train, val, trainval = parts["train800"], parts["val200"], parts["train800val200"]
    else:
        train, val = stratified_split(labels, opts.val_fraction, opts.split_seed)
        trainval = np.arange(len(labels))
    return {"search": Splits(splits.train.subset(train), splits.train.subset(val), splits.skipped),
            "final": Splits(splits.train.subset(trainval), splits.test, splits.skipped)}


def _optuna():
    try:
        import optuna
    except ImportError:
        raise BigTransferError("bigtransfer search needs Optuna: pip install 'bigtransfer[search]'") from None
    return optuna


# The tables Optuna keeps a study in (optuna/storages/_rdb/models.py, and alembic's version table).
OPTUNA_TABLES = frozenset({"studies", "study_directions", "study_user_attributes", "study_system_attributes",
                           "trials", "trial_user_attributes", "trial_system_attributes", "trial_params",
                           "trial_values", "trial_intermediate_values", "trial_heartbeats", "version_info",
                           "alembic_version"})
SQLITE_HEADER = b"SQLite format 3\x00"


def check_storage(url: str | None) -> None:
    """--storage: an SQLite file must not exist yet, or be a database of Optuna's tables alone.

    Optuna would add its tables to any database it is pointed at (and then fail on one that is not
    a study's)."""
    path = _sqlite_file(url)
    if path is None or not os.path.lexists(path):
        return
    where = "--storage"
    if not path.is_file():
        raise BigTransferError(f"{where}: {path_text(path)} is not a file")
    with open(path, "rb") as fh:
        header = fh.read(len(SQLITE_HEADER))
    if not header:
        return  # an empty database: SQLite's own, or a worker's that is creating the study now
    if header != SQLITE_HEADER:
        raise BigTransferError(f"{where}: {path_text(path)} is not an SQLite database; name a new file or an "
                               f"existing study's database")
    foreign = sorted(set(_sqlite_tables(path, where)) - OPTUNA_TABLES)
    if foreign:
        raise BigTransferError(f"{where}: {path_text(path)} holds tables that are not an Optuna study's "
                               f"({quoted(foreign[0])}{f' and {len(foreign) - 1} more' if len(foreign) > 1 else ''}); "
                               f"name a new file or a study's own database")


def _sqlite_file(url: str | None) -> Path | None:
    """The file an `sqlite://` storage URL names (None for another database or an in-memory one)."""
    if not url or url.split(":", 1)[0].split("+", 1)[0] != "sqlite":
        return None
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        database = make_url(url).database
    except (ArgumentError, ValueError):
        raise BigTransferError(f"--storage {quoted(url)}: not a database URL") from None
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return Path(database).expanduser()


def _sqlite_tables(path: Path, where: str) -> list[str]:
    """The tables and views of an SQLite file, read without writing to it."""
    import sqlite3
    from urllib.parse import quote

    try:
        with contextlib.closing(sqlite3.connect(f"file:{quote(str(path.resolve()))}?mode=ro", uri=True)) as db:
            rows = db.execute("SELECT name FROM sqlite_master WHERE type IN ('table', 'view')").fetchall()
    except sqlite3.Error as err:
        raise BigTransferError(f"{where}: {path_text(path)} is not a readable SQLite database ({err})") from None
    return [name for (name,) in rows if not name.startswith("sqlite_")]


def open_study(opts: SearchOptions):
    """The study, created or joined; stale trials of dead workers are failed and retried."""
    optuna = _optuna()
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # heartbeats: stable for years
    url = opts.storage or f"sqlite:///{(Path(opts.out) / 'study.sqlite3').resolve()}"
    try:
        # A retried trial is a copy of the stale one, user attributes included: it finds its run
        # directory there and resumes it.
        storage = RDBStorage(url, heartbeat_interval=opts.heartbeat, grace_period=2 * opts.heartbeat,
                             heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=3),
                             engine_kwargs={"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None)
    except Exception as err:  # noqa: BLE001  (SQLAlchemy raises many kinds for a bad URL or server)
        raise BigTransferError(f"--storage {url}: cannot open the study database ({err})") from None
    return optuna.create_study(storage=storage, study_name=opts.study_name, direction="maximize",
                               sampler=optuna.samplers.RandomSampler(seed=opts.seed), load_if_exists=True)


def _prepared(opts: SearchOptions, finetune: FinetuneOptions, splits: Splits) -> Splits:
    """The splits decoded once at this run's resolution (shared by every trial at that size)."""
    if not opts.cache:
        return splits
    plan = make_plan(finetune, splits)
    return decoded_splits(splits, plan.train_side, plan.crop, cache_dir=Path(opts.out) / "cache",
                          strict=finetune.strict, progress=False)


def run_search(opts: SearchOptions) -> dict:
    """Run trials until the study has `opts.trials` complete ones, then (optionally) the final
    comparison; returns the collected results (also written as results.json/csv and report.html)."""
    optuna = _optuna()
    out = Path(opts.out)
    check_options(opts.finetune, check_out=False)
    rundir.check_claim(out, "search")
    check_storage(opts.storage)
    splits = load_source(opts.finetune.data, val_fraction=opts.finetune.val_fraction, seed=opts.finetune.split_seed,
                         strict=opts.finetune.strict, progress=opts.finetune.progress)
    if opts.final and splits.test is None:
        raise BigTransferError(f"--data {opts.finetune.data}: no test split for the final comparison "
                               "(pass --val-fraction, or --no-final)")
    parts = search_splits(opts, splits)
    # A study's space is fixed (Optuna refuses a parameter whose choices change); more trials are fine.
    fixed = ("data", "model", "weights", "batch", "steps", "base_lr", "resolution", "mixup", "flip", "random_crop",
             "schedule")
    claim_out(out, {
        "protocol": "search", "space": asdict(opts.space), "study_name": opts.study_name, "storage": opts.storage,
        "split": [opts.val_fraction, opts.train_size, opts.val_size, opts.split_seed],
        "finetune": {k: v for k, v in asdict(opts.finetune).items() if k in fixed}})
    study = open_study(opts)
    worker = f"{socket.gethostname()}:{os.getpid()}"

    def objective(trial) -> float:
        params = opts.space.sample(trial)
        run_dir = Path(trial.user_attrs.get("run") or out / "trials" / f"{trial.number:04d}")  # set if a retry
        trial.set_user_attr("run", str(run_dir))
        trial.set_user_attr("worker", worker)
        finetune = replace(opts.finetune, out=run_dir, progress=False, **finetune_overrides(params))
        try:
            summary = run_finetune(finetune, splits=_prepared(opts, finetune, parts["search"]))
        except RunInUse as err:  # a retried trial whose first worker still trains it: leave it be
            print(f"trial {trial.number}: {err}", flush=True)
            raise optuna.TrialPruned(str(err)) from None
        if opts.finetune.progress:
            print(f"trial {trial.number}: val top-1 {summary['final']['top1']:.2%} "
                  + " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items()),
                  flush=True)
        return summary["final"]["top1"]

    done = sum(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    if done < opts.trials:
        study.optimize(objective, n_trials=opts.trials - done,
                       callbacks=[optuna.study.MaxTrialsCallback(opts.trials)])
    if opts.final:
        _final_comparison(opts, study, parts)
    from ..report.protocols.search import collect_search, write_search_report

    results = collect_search(out, study)
    write_search_report(out, results)
    return results


def _final_comparison(opts: SearchOptions, study, parts: dict[str, Splits]) -> None:
    """HyperRule vs the best trial: validation score, then retrained on train+val and tested."""
    best = study.best_trial
    base = replace(opts.finetune, progress=False)
    runs = {
        "hyperrule/val": (replace(base, out=Path(opts.out) / "final" / "hyperrule-val"), parts["search"]),
        "hyperrule/test": (replace(base, out=Path(opts.out) / "final" / "hyperrule"), parts["final"]),
        "searched/test": (replace(base, out=Path(opts.out) / "final" / "searched",
                                  **finetune_overrides(best.params)), parts["final"]),
    }
    summary = {"best_trial": best.number, "best_params": best.params, "best_val_top1": best.value}
    for name, (finetune, data) in runs.items():
        summary[name] = run_finetune(finetune, splits=_prepared(opts, finetune, data))["final"]["top1"]
    write_json(Path(opts.out) / "final.json", summary)
