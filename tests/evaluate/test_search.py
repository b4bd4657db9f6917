"""Hyper-parameter search: the space, the study's crash-resume and sharing, the final comparison."""

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

optuna = pytest.importorskip("optuna")

from bigtransfer import BigTransferError
from bigtransfer.cli import main
from bigtransfer.evaluate.search import (
    SearchOptions,
    SearchSpace,
    finetune_overrides,
    open_study,
    run_search,
)
from bigtransfer.report.protocols import rebuild

TINY = "R[1,1,1,1]x0.5"
SMALL_SPACE = SearchSpace(steps=(3, 6), resolution=(16, 24))


def test_sampled_points_respect_the_paper_space():
    space = SearchSpace()
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0), direction="maximize")
    points = []
    for _ in range(300):
        trial = study.ask()
        points.append(space.sample(trial))
        study.tell(trial, 0.0)
    for p in points:
        assert 1e-4 <= p["base_lr"] <= 1e-1 and 1e-6 <= p["l2_to_init"] <= 1e-1
        assert 0 <= p["dropout"] <= 0.7
        assert p["steps"] in (500, 1000, 2000, 4000, 8000, 16000)
        assert p["mixup"] in (0.0, 0.05, 0.1, 0.2, 0.4)
        assert p["resolution"] in (64, 128, 192, 256, 320, 384)
    # log-uniform: each decade of the lr range gets about a third of the draws
    decades = [sum(10 ** e <= p["base_lr"] < 10 ** (e + 1) for p in points) for e in (-4, -3, -2)]
    assert all(60 < n < 140 for n in decades), decades
    assert {p["steps"] for p in points} == set(space.steps) and {p["resolution"] for p in points} == set(space.resolution)


def test_a_point_becomes_finetune_overrides():
    params = {"base_lr": 0.01, "steps": 2000, "dropout": 0.3, "l2_to_init": 1e-4, "mixup": 0.0, "resolution": 128}
    assert finetune_overrides(params) == {"base_lr": 0.01, "steps": 2000, "dropout": 0.3, "l2_to_init": 1e-4,
                                          "mixup": 0.0, "resolution": (160, 128)}


@pytest.mark.parametrize("kwargs, flag", [({"lr": (0.1, 0.01)}, "--space-lr"), ({"dropout": (0, 1.0)}, "--space-dropout"),
                                          ({"steps": ()}, "--space-steps"), ({"resolution": (0, 8)}, "--space-resolution")])
def test_bad_spaces_are_refused(kwargs, flag):
    with pytest.raises(BigTransferError, match=flag):
        SearchSpace(**kwargs)


def options(out, **kw):
    from bigtransfer.recipes.finetune import FinetuneOptions

    ft = FinetuneOptions(data="digits", model=TINY, batch=16, steps=4, resolution=(20, 16), flip=False, workers=0,
                         precision="fp32", progress=False, checkpoint_every=kw.pop("checkpoint_every", 0))
    return SearchOptions(finetune=ft, out=out, space=kw.pop("space", SMALL_SPACE), heartbeat=kw.pop("heartbeat", 60),
                         **kw)


def test_search_then_final_comparison_and_report(tmp_path, capsys):
    out = tmp_path / "s"
    results = run_search(options(out, trials=3, train_size=300, val_size=100))
    assert results["complete"] == 3
    final = results["final"]
    assert set(final) >= {"hyperrule/val", "hyperrule/test", "searched/test", "best_params", "best_val_top1"}
    best = max((t for t in results["trials"] if t["state"] == "COMPLETE"), key=lambda t: t["val_top1"])
    assert final["best_trial"] == best["number"] and final["best_val_top1"] == best["val_top1"]
    searched = json.loads((out / "final" / "searched" / "config.json").read_text())
    assert searched["plan"]["steps"] == best["steps"] and searched["plan"]["crop"] == best["resolution"]
    assert searched["plan"]["dataset_size"] == 400  # retrained on train800val200's stand-in: 300 + 100
    trial_config = json.loads((out / "trials" / "0000" / "config.json").read_text())
    assert trial_config["plan"]["dataset_size"] == 300 and "regularisers" in trial_config
    html = (out / "report.html").read_text()
    assert "HyperRule vs search" in html and 'src="data:image/png;base64,' in html
    (out / "report.html").unlink()
    rebuild(out)
    assert (out / "report.html").is_file()
    assert len((out / "results.csv").read_text().splitlines()) == 1 + 3
    # Asking again for the same number of trials runs nothing new, and the finished final runs are
    # only reported: not evaluated again, nothing rewritten. The CLI names the winning trial.
    def written():  # every file of the final runs but the lock, which each process rewrites with its own pid
        return {p: p.stat().st_mtime_ns for p in (out / "final").rglob("*") if p.is_file() and p.suffix != ".lock"}

    finished = written()
    assert main(["search", "--data", "digits", "--model", TINY, "--batch", "16", "--steps", "4", "--resolution",
                 "20/16", "--no-flip", "--workers", "0", "--precision", "fp32", "--trials", "3", "--train-size", "300",
                 "--val-size", "100", "--space-steps", "3,6", "--space-resolution", "16,24", "--quiet",
                 "--out", str(out)]) == 0
    assert f"random search (trial {final['best_trial']})" in capsys.readouterr().out
    assert written() == finished
    # A study's space is fixed: another space in the same directory is refused up front.
    with pytest.raises(BigTransferError, match=r"other settings \(space\)"):
        run_search(options(out, trials=3, train_size=300, val_size=100, space=SearchSpace(steps=(3,))))


WORKER = textwrap.dedent("""
    import sys
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    from test_search import worker_options
    from bigtransfer.evaluate.search import run_search
    out, trials, seed, heartbeat, steps, checkpoint_every = sys.argv[1:]
    run_search(worker_options(Path(out), int(trials), int(seed), int(heartbeat), int(steps), int(checkpoint_every)))
""")


def worker_options(out, trials, seed, heartbeat, steps, checkpoint_every):
    """A search worker's options: no final comparison, one step count and resolution."""
    space = SearchSpace(steps=(steps,), resolution=(16,))
    return options(out, trials=trials, seed=seed, heartbeat=heartbeat, final=False, space=space,
                   checkpoint_every=checkpoint_every)


def worker(tmp_path, out, trials, seed, heartbeat=60, steps=4, checkpoint_every=0):
    """A search worker in its own process."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(tests=str(Path(__file__).parent)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    argv = [str(out), str(trials), str(seed), str(heartbeat), str(steps), str(checkpoint_every)]
    return subprocess.Popen([sys.executable, str(script), *argv],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def study_of(out):
    opts = options(out)
    return open_study(opts)


def test_a_killed_worker_s_trial_is_retried_in_its_own_directory(tmp_path):
    """A worker killed mid-trial (its process, SIGKILL); a later worker (here, in this process)
    fails the stale trial and retries it in the same directory, from its checkpoint. 40 steps with
    a checkpoint every 5: the kill lands right after the first one, 35 steps before the trial ends."""
    out = tmp_path / "s"
    first = worker(tmp_path, out, 2, 0, heartbeat=1, steps=40, checkpoint_every=5)
    checkpoint = out / "trials" / "0000" / "checkpoints" / "latest.safetensors"
    deadline = time.monotonic() + 600  # generous: a loaded machine can take minutes to start a worker
    while not checkpoint.is_file() and time.monotonic() < deadline and first.poll() is None:
        time.sleep(0.01)
    assert checkpoint.is_file(), first.communicate()[0] if first.poll() is not None else "no checkpoint in time"
    first.send_signal(signal.SIGKILL)
    first.wait()
    first.stdout.close()
    time.sleep(3)  # past the grace period (2 heartbeats): the trial is stale now
    run_search(worker_options(out, 2, 0, heartbeat=1, steps=40, checkpoint_every=5))
    trials = study_of(out).trials
    states = [t.state.name for t in trials]
    assert states.count("COMPLETE") == 2 and states[0] == "FAIL", states
    retried = [t for t in trials if optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(t) == 0]
    assert len(retried) == 1 and retried[0].state.name == "COMPLETE"
    assert retried[0].params == trials[0].params
    assert retried[0].user_attrs["run"] == str(out / "trials" / "0000")
    # Same directory, same settings: the run resumed from the killed worker's checkpoint (a changed
    # fingerprint would have been refused), and no second directory was started.
    assert (out / "trials" / "0000" / "summary.json").is_file()
    assert not (out / "trials" / f"{retried[0].number:04d}").exists()


def test_two_workers_share_one_sqlite_study(tmp_path):
    out = tmp_path / "s"
    out.mkdir()
    study_of(out)  # created once up front, as a first worker would
    procs = [worker(tmp_path, out, 4, seed) for seed in (1, 2)]
    for p in procs:
        output = p.communicate(timeout=600)[0]
        assert p.returncode == 0, output
    trials = study_of(out).trials
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    assert 4 <= len(complete) <= 5  # each worker stops once the study has 4; one may be mid-trial then
    assert len({t.user_attrs["worker"] for t in complete}) == 2
    assert len({t.user_attrs["run"] for t in complete}) == len(complete)
    assert all(math.isfinite(t.value) for t in complete)


def test_cli_search_prints_the_comparison(tmp_path, capsys):
    out = tmp_path / "s"
    args = ["search", "--data", "digits", "--model", TINY, "--trials", "2", "--steps", "3", "--batch", "16",
            "--resolution", "20/16", "--no-flip", "--space-steps", "2,3", "--space-resolution", "16",
            "--space-lr", "0.001,0.1", "--workers", "0", "--precision", "fp32", "--quiet", "--out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "2 completed trials" in printed and "BiT-HyperRule" in printed and "random search" in printed
    assert main([*args[:-2], "--space-lr", "0.1", "--out", str(tmp_path / "x")]) == 2
    assert "--space-lr takes MIN,MAX" in capsys.readouterr().err
