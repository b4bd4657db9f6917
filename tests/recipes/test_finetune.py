"""Fine-tuning end to end: the run directory, resume after a kill, DDP, accumulation, freezing."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from image_data import write_colour_folder
from killed_runs import kill_once_checkpointed
from safetensors import safe_open
from safetensors.torch import load_file

from bigtransfer import BigTransferError, create_model, save_checkpoint
from bigtransfer.cli import main
from bigtransfer.train.logbook import read_metrics

TINY = "R[1,1,1,1]x0.5"
# Digits, 10 per class, a tiny model at 24 px: seconds per run on two CPU cores.
DIGITS_RUN = ["--data", "digits", "-k", "10", "--model", TINY, "--batch", "20", "--resolution", "28/24",
              "--workers", "0", "--quiet"]


def finetune(*args) -> int:
    return main(["finetune", *args])


@pytest.fixture(scope="module")
def four_step_run(tmp_path_factory):
    """A finished 4-step digits run; tests that run on in it take a copy (`copied`)."""
    out = tmp_path_factory.mktemp("four_steps") / "run"
    assert finetune(*DIGITS_RUN, "--steps", "4", "--out", str(out)) == 0
    return out


@pytest.fixture(scope="module")
def six_step_run(tmp_path_factory):
    """A finished 6-step digits run, every step logged and a checkpoint every 2 steps. Read only."""
    out = tmp_path_factory.mktemp("six_steps") / "run"
    assert finetune(*DIGITS_RUN, "--steps", "6", "--log-every", "1", "--checkpoint-every", "2", "--out", str(out)) == 0
    return out


def copied(run, tmp_path):
    return Path(shutil.copytree(run, tmp_path / run.name))


def tensors(path):
    return load_file(str(path))


def assert_same_weights(a, b, exact=True):
    ta, tb = tensors(a), tensors(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        if exact:
            assert torch.equal(ta[k], tb[k]), k
        else:
            torch.testing.assert_close(ta[k], tb[k], rtol=1e-4, atol=1e-5, msg=k)


def test_run_directory_contents(tmp_path):
    out = tmp_path / "run"
    assert finetune(*DIGITS_RUN, "--steps", "8", "--eval-every", "4", "--log-every", "2", "--out", str(out)) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["plan"]["steps"] == 8 and config["plan"]["batch"] == 20
    assert config["plan"]["overrides"]["batch"] == 20 and config["plan"]["tier"] == "small"
    assert config["classes"] == [str(d) for d in range(10)]
    records = read_metrics(out)
    assert [r["step"] for r in records if r["kind"] == "train"] == [2, 4, 6, 8]
    assert [r["step"] for r in records if r["kind"] == "eval"] == [4, 8]
    assert all({"loss", "lr", "images_per_s"} <= r.keys() for r in records if r["kind"] == "train")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["train_examples"] == 100 and summary["test_examples"] == 539
    assert 0 <= summary["final"]["top1"] <= 1
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    with safe_open(str(out / "final.safetensors"), "pt") as fh:
        meta = fh.metadata()
    assert json.loads(meta["class_names"]) == [str(d) for d in range(10)] and meta["resolution"] == "24"
    assert not list(out.rglob("*.tmp"))


def test_resume_after_kill_reaches_the_same_weights(tmp_path):
    """Kill -9 a run after its first checkpoints; the same command then finishes it bit for bit
    like a run that was never interrupted (data order and augmentation are functions of the step)."""
    args = [*DIGITS_RUN, "--steps", "30", "--checkpoint-every", "3", "--workers", "2"]
    reference = tmp_path / "reference"
    assert finetune(*args, "--out", str(reference)) == 0

    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "bigtransfer", "finetune", *args, "--out", str(killed)]
    step_at_kill = kill_once_checkpointed(cmd, killed, 6)
    assert step_at_kill is not None and 6 <= step_at_kill < 30, "the kill must land mid-run"
    assert not (killed / "final.safetensors").exists()

    assert finetune(*args, "--out", str(killed)) == 0
    assert_same_weights(reference / "final.safetensors", killed / "final.safetensors", exact=True)
    logged = [r["step"] for r in read_metrics(killed) if r["kind"] == "train"]
    assert logged == sorted(set(logged)) and logged[-1] == 30  # steps logged after the checkpoint were dropped


def test_rerunning_a_finished_run_does_not_train_again(four_step_run, tmp_path):
    out = copied(four_step_run, tmp_path)
    args = [*DIGITS_RUN, "--steps", "4", "--out", str(out)]
    weights, records = tensors(out / "final.safetensors"), read_metrics(out)
    assert finetune(*args) == 0
    again = tensors(out / "final.safetensors")
    assert all(torch.equal(weights[k], again[k]) for k in weights)
    new = read_metrics(out)[len(records):]
    assert [r["kind"] for r in new] == [], "a finished run must not log new training steps"


def test_changed_settings_refuse_to_resume(four_step_run, tmp_path, capsys):
    out = copied(four_step_run, tmp_path)
    assert finetune(*DIGITS_RUN, "--steps", "6", "--out", str(out)) == 2
    assert "different settings" in capsys.readouterr().err
    assert finetune(*DIGITS_RUN, "--steps", "6", "--out", str(out), "--restart") == 0


def test_batch_split_accumulates_to_the_same_update(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    fp32 = ["--precision", "fp32"]  # compare the arithmetic, not bf16 rounding of different batch shapes
    assert finetune(*DIGITS_RUN, *fp32, "--steps", "6", "--out", str(one)) == 0
    assert finetune(*DIGITS_RUN, *fp32, "--steps", "6", "--batch-split", "4", "--out", str(two)) == 0
    assert_same_weights(one / "final.safetensors", two / "final.safetensors", exact=False)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_ddp_matches_one_process(tmp_path):
    """torchrun with 2 CPU (gloo) processes: same global batch, same loss curve, same weights.

    fp32, so that the comparison is about sharding and gradient sync, not bf16 rounding."""
    args = [*DIGITS_RUN, "--steps", "6", "--log-every", "1", "--precision", "fp32"]
    single = tmp_path / "single"
    assert finetune(*args, "--out", str(single)) == 0
    ddp = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
         "--master_port", str(_free_port()), "-m", "bigtransfer", "finetune", *args, "--out", str(ddp)],
        capture_output=True, text=True, env=env, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    curve = lambda run: [r["loss"] for r in read_metrics(run) if r["kind"] == "train"]
    assert len(curve(ddp)) == 6
    np.testing.assert_allclose(curve(ddp), curve(single), rtol=1e-4)
    assert_same_weights(single / "final.safetensors", ddp / "final.safetensors", exact=False)
    assert json.loads((ddp / "config.json").read_text())["world_size"] == 2


def test_freeze_until_keeps_early_stages(tmp_path):
    start = tmp_path / "start.safetensors"
    torch.manual_seed(1)
    save_checkpoint(create_model(TINY, num_classes=10, zero_head=False), start)
    out = tmp_path / "frozen"
    assert finetune(*DIGITS_RUN, "--steps", "4", "--freeze-until", "stage2", "--base-lr", "0.1",
                    "--weights", str(start), "--out", str(out)) == 0
    before, after = tensors(start), tensors(out / "final.safetensors")
    for name in before:
        unchanged = torch.equal(before[name], after[name])
        if name.startswith(("root.", "stages.0.", "stages.1.")):
            assert unchanged, f"{name} should be frozen"
        elif name.startswith(("stages.2.", "stages.3.", "head.")) and name.endswith("weight"):
            assert not unchanged, f"{name} should have trained"


def test_linear_probe_fits_only_the_head(tmp_path):
    data = write_colour_folder(tmp_path / "colours")
    out = tmp_path / "probe"
    assert finetune("--data", str(data), "--model", TINY, "--resolution", "24/20", "--linear-probe",
                    "--workers", "0", "--quiet", "--out", str(out)) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final"]["top1"] >= 0.8  # random features separate colours linearly
    weights = tensors(out / "final.safetensors")
    assert weights["head.weight"].abs().sum() > 0


def test_bad_batch_split_is_a_usage_error(tmp_path, capsys):
    assert finetune(*DIGITS_RUN, "--batch-split", "3", "--steps", "2", "--out", str(tmp_path / "x")) == 2
    assert "divide evenly" in capsys.readouterr().err
    assert finetune(*DIGITS_RUN, "--batch-split", "many", "--out", str(tmp_path / "y")) == 2


def test_few_shot_class_too_small_is_a_usage_error(tmp_path, capsys):
    data = write_colour_folder(tmp_path / "colours", per_class_train=3)
    assert finetune("--data", str(data), "--model", TINY, "-k", "5", "--out", str(tmp_path / "r")) == 2
    assert "has only 3 training image(s)" in capsys.readouterr().err


def test_plan_prints_the_rule_and_a_memory_estimate(tmp_path, capsys):
    data = write_colour_folder(tmp_path / "colours", per_class_train=4, per_class_val=2)
    assert main(["plan", "--data", str(data), "--model", "R50x1", "--memory-for", "16"]) == 0
    out = capsys.readouterr().out
    for fragment in ("12 training examples, 3 classes -> small task", "resize 160x160, random crop 128x128",
                     "500 steps (release)", "mixup          off", "MiB/image fp32", "--batch-split"):
        assert fragment in out, fragment
    assert main(["plan", "--data", "digits", "--model", "R50x1", "-k", "5", "--steps", "100", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["plan"]["dataset_size"] == 50 and report["plan"]["steps"] == 100
    assert report["plan"]["schedule"]["warmup_steps"] == 20 and report["memory"]["activations_per_image_gib_fp32"] > 0


def test_plan_needs_no_download_and_names_the_one_finetune_will_need(tmp_path, capsys):
    """A plan is arithmetic on the data: with the default model (BiT-M-R50x1) not downloaded it
    still prints, says what the head will be and which command fetches the weights; once the
    file is in the cache that line goes. Fine-tuning itself still refuses without the weights."""
    from bigtransfer.models import zoo

    data = write_colour_folder(tmp_path / "colours", per_class_train=4, per_class_val=2)
    assert main(["plan", "--data", str(data)]) == 0
    out = capsys.readouterr().out
    assert "head           3 classes, zero-initialised" in out
    assert "BiT-M-R50x1 not downloaded yet: bigtransfer download BiT-M-R50x1" in out
    assert main(["plan", "--data", str(data), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["download"] == "bigtransfer download BiT-M-R50x1"

    assert finetune("--data", str(data), "--out", str(tmp_path / "run"), "--quiet") == 2
    assert "not in the cache" in capsys.readouterr().err

    cached = zoo.cached_path(zoo.lookup("BiT-M-R50x1"))  # a plan only asks whether the file is there
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.write_bytes(b"not read by a plan")
    assert main(["plan", "--data", str(data)]) == 0
    assert "not downloaded" not in capsys.readouterr().out
    assert main(["plan", "--data", str(data), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["download"] is None


def test_batch_split_auto_picks_the_largest_micro_batch_that_fits(monkeypatch):
    from bigtransfer.models.resnetv2 import ModelConfig, parse_arch
    from bigtransfer.train import memory

    config = ModelConfig(parse_arch("R50x1"), 10)
    per_image = memory.SAFETY * memory.saved_bytes_per_image(config, 128, False)
    state = memory.state_bytes(config)
    # Room for the state and exactly 64 images' activations: 512 / 64 = 8 micro-batches.
    monkeypatch.setattr(memory, "available_bytes", lambda device: (state + 64.5 * per_image) / 0.8)
    assert memory.auto_batch_split(config, 128, 512, torch.device("cpu"), bf16=False) == 8
    monkeypatch.setattr(memory, "available_bytes", lambda device: state / 0.8)
    with pytest.raises(BigTransferError, match="even one image per micro-batch does not fit"):
        memory.auto_batch_split(config, 128, 512, torch.device("cpu"), bf16=False)


def test_batch_split_auto_from_the_command_line(tmp_path):
    out = tmp_path / "auto"
    assert finetune(*DIGITS_RUN, "--steps", "2", "--batch-split", "auto", "--out", str(out)) == 0
    assert json.loads((out / "config.json").read_text())["batch_split"] == 1  # tiny model: one pass fits


@pytest.mark.slow
def test_compiled_training_matches_eager(tmp_path):
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    fp32 = ["--precision", "fp32"]
    assert finetune(*DIGITS_RUN, *fp32, "--steps", "3", "--out", str(eager)) == 0
    assert finetune(*DIGITS_RUN, *fp32, "--steps", "3", "--compile", "--out", str(compiled)) == 0
    assert_same_weights(eager / "final.safetensors", compiled / "final.safetensors", exact=False)


def test_auto_precision_follows_device_and_workload(monkeypatch):
    from bigtransfer.train import loop

    cpu = torch.device("cpu")
    monkeypatch.setattr(loop, "native_bf16", lambda device: True)
    assert loop.resolve_precision("auto", cpu, 2.7e9) == "bf16"  # R50x1 at 128 px: bf16 pays on AMX
    assert loop.resolve_precision("auto", cpu, 0.2e9) == "fp32"  # small images: casts cost more
    assert loop.resolve_precision("fp32", cpu, 1e12) == "fp32" and loop.resolve_precision("bf16", cpu, 1) == "bf16"
    monkeypatch.setattr(loop, "native_bf16", lambda device: False)
    assert loop.resolve_precision("auto", cpu, 1e12) == "fp32"


def test_finetuning_starts_from_a_zero_head_even_when_the_class_count_matches(tmp_path, capsys):
    """The release always starts from an all-zero head: the first step's loss is exactly ln(K).
    A file whose head already has K classes (a 10-class checkpoint, the digits' 10 classes) used
    to keep its head; --keep-head still does, on purpose."""
    import math

    torch.manual_seed(1)
    model = create_model(TINY, num_classes=10)
    with torch.no_grad():
        model.head.weight.normal_(0.0, 0.5)
        model.head.bias.normal_(0.0, 1.0)
    weights = tmp_path / "ten_classes.safetensors"
    save_checkpoint(model, weights)

    def first_loss(*extra):
        out = tmp_path / ("kept" if extra else "zeroed")
        assert main(["finetune", "--data", "digits", "--model", str(weights), "--batch", "16", "--steps", "1",
                     "--resolution", "20/16", "--precision", "fp32", "--log-every", "1", "--workers", "0",
                     "--quiet", "--out", str(out), *extra]) == 0
        return next(r["loss"] for r in read_metrics(out) if r["kind"] == "train")

    assert first_loss() == pytest.approx(math.log(10), abs=1e-6)
    assert abs(first_loss("--keep-head") - math.log(10)) > 0.1

    assert main(["plan", "--data", "digits", "--model", str(weights)]) == 0
    assert "zero-initialised: a new all-zero head" in capsys.readouterr().out
    assert main(["plan", "--data", "digits", "--model", str(weights), "--keep-head"]) == 0
    assert "kept from the weights file" in capsys.readouterr().out
    code = main(["finetune", "--data", "digits", "--model", TINY, "--keep-head", "--steps", "1",
                 "--out", str(tmp_path / "nohead"), "--quiet"])
    assert code == 2 and "--keep-head" in capsys.readouterr().err


def test_a_finished_run_writes_its_model_once_and_no_training_checkpoint(six_step_run):
    """The last step is saved once, as the model the run delivers (weights only): no training
    checkpoint with momentum (twice its size) is written beside it."""
    out = six_step_run
    assert (out / "final.safetensors").is_file() and (out / "summary.json").is_file()
    assert not (out / "checkpoints" / "latest.safetensors").exists()


def test_a_run_killed_during_its_last_evaluation_resumes_from_its_model(six_step_run, tmp_path, monkeypatch):
    """Killed after the last step but before the evaluation ended: the model on disk is the
    finished one, so the same command evaluates it without training again. The reference is the
    same training uninterrupted (checkpoints do not change what it computes)."""
    from bigtransfer.train import loop

    args = [*DIGITS_RUN, "--steps", "6", "--log-every", "1"]
    reference = six_step_run

    def killed_while_evaluating(*a, **k):
        raise KeyboardInterrupt

    out = tmp_path / "run"
    real_evaluate = loop.evaluate_model
    monkeypatch.setattr(loop, "evaluate_model", killed_while_evaluating)
    assert finetune(*args, "--out", str(out)) == 130  # "bigtransfer: interrupted"
    assert (out / "final.safetensors").is_file() and not (out / "summary.json").exists()
    assert not (out / "checkpoints" / "latest.safetensors").exists()
    monkeypatch.setattr(loop, "evaluate_model", real_evaluate)
    trained = [r["step"] for r in read_metrics(out) if r["kind"] == "train"]
    assert finetune(*args, "--out", str(out)) == 0
    assert [r["step"] for r in read_metrics(out) if r["kind"] == "train"] == trained == list(range(1, 7))
    assert_same_weights(reference / "final.safetensors", out / "final.safetensors", exact=True)
    summary, expected = (json.loads((run / "summary.json").read_text()) for run in (out, reference))
    assert summary["final"] == expected["final"]
    # --restart trains again rather than resuming from the finished model
    assert finetune(*args, "--out", str(out), "--restart") == 0
    assert len([r for r in read_metrics(out) if r["kind"] == "train"]) == 6
