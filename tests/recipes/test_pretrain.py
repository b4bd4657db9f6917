"""Pre-training end to end: glyphs, multi-label, the transfer probe, DDP, resume across process
counts, and the offline demo's machinery."""

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from fixtures_runs import tiny_demo_fixture  # noqa: F401  (shared fixture)
from image_data import write_colour_folder
from killed_runs import kill_once_checkpointed, step_of
from safetensors.torch import load_file

from bigtransfer.cli import main
from bigtransfer.recipes import upstream
from bigtransfer.recipes.pretrain import PretrainOptions, build_upstream_model
from bigtransfer.train.logbook import read_metrics

TINY = "R[1,1,1,1]x0.5"
GLYPHS = "glyphs:classes=6,per_class=12,test_per_class=3,size=24"
BASE = ["--model", TINY, "--resolution", "24", "--batch", "12", "--workers", "0", "--quiet", "--min-crop-area", "0.5"]


def pretrain(*args) -> int:
    return main(["pretrain", *args])


def test_pretrain_on_glyphs_then_finetune_from_the_run(tmp_path, capsys):
    out = tmp_path / "pre"
    assert pretrain("--data", GLYPHS, *BASE, "--epochs", "4", "--eval-every", "6", "--probe-data", "digits",
                    "--probe-shots", "1,5", "--out", str(out)) == 0
    config = json.loads((out / "config.json").read_text())
    plan = config["plan"]
    assert plan["steps"] == 24 and plan["batch"] == 12 and plan["weight_decay"] == 1e-4
    assert plan["schedule"]["base_lr"] == pytest.approx(0.03 * 12 / 256) and plan["multilabel"] is False
    records = read_metrics(out)
    assert [r["step"] for r in records if r["kind"] == "eval"] == [6, 12, 18, 24]
    probes = [r for r in records if r["kind"] == "fewshot"]
    assert [r["step"] for r in probes] == [6, 12, 18, 24] and {"1shot", "5shot"} <= probes[-1].keys()
    assert all(0.1 <= r["5shot"] <= 1 for r in probes)  # ten digit classes: chance is 0.1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["fewshot"] == {k: probes[-1][k] for k in ("1shot", "5shot")}
    assert "few-shot probe: 1shot" in capsys.readouterr().out
    # The run directory is a model for fine-tuning.
    assert main(["finetune", "--model", str(out), "--data", "digits", "-k", "2", "--steps", "2", "--batch", "10",
                 "--resolution", "28/24", "--workers", "0", "--quiet", "--out", str(tmp_path / "ft")]) == 0
    fine = load_file(str(tmp_path / "ft" / "final.safetensors"))
    pre = load_file(str(out / "final.safetensors"))
    assert fine["head.weight"].shape[0] == 10 and pre["head.weight"].shape[0] == 6
    ft_config = json.loads((tmp_path / "ft" / "config.json").read_text())
    assert ft_config["plan"]["arch"] == "R14x0.5"  # [1,1,1,1] units is depth 14


def _multilabel_manifest(tmp_path):
    rng = np.random.default_rng(0)
    from PIL import Image

    rows = ["path,labels,split"]
    for i in range(24):
        labels = ["cat", "dog", "sky"][i % 3] + (";sky" if i % 4 == 0 else "")
        name = f"img{i}.png"
        Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(tmp_path / name)
        rows.append(f"{name},{labels},{'test' if i >= 18 else 'train'}")
    csv_path = tmp_path / "tags.csv"
    csv_path.write_text("\n".join(rows) + "\n")
    return csv_path


def test_multilabel_manifest_uses_sigmoid_and_precision_at_1(tmp_path):
    data = _multilabel_manifest(tmp_path)
    out = tmp_path / "ml"
    assert pretrain("--data", str(data), *BASE, "--epochs", "2", "--out", str(out)) == 0
    plan = json.loads((out / "config.json").read_text())["plan"]
    assert plan["multilabel"] is True and plan["head_bias_init"] == -10.0
    evaluation = [r for r in read_metrics(out) if r["kind"] == "eval"][-1]
    assert "precision_at_1" in evaluation and "top1" not in evaluation
    train_losses = [r["loss"] for r in read_metrics(out) if r["kind"] == "train"]
    # Sigmoid loss from bias -10 over 3 classes starts near 10 (one positive) or 20 (two).
    assert 5 < train_losses[0] < 25
    bias = load_file(str(out / "final.safetensors"))["head.bias"]
    assert (bias < -9).all()  # two tiny steps barely move it from -10


def test_upstream_model_head_bias_follows_the_plan():
    opts = PretrainOptions(data="unused", model=TINY)
    sigmoid = build_upstream_model(opts, upstream.upstream_plan(100, 7, multilabel=True))
    softmax = build_upstream_model(opts, upstream.upstream_plan(100, 7, loss="softmax"))
    assert torch.all(sigmoid.head.bias == -10.0) and torch.all(softmax.head.bias == 0.0)
    assert sigmoid.head.weight.abs().sum() == 0  # zero head either way
    same = build_upstream_model(opts, upstream.upstream_plan(100, 7))
    assert torch.equal(same.root.conv.weight, softmax.root.conv.weight)  # init follows the seed


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(nproc, args):
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
            "127.0.0.1", "--master_port", str(_free_port()), "-m", "bigtransfer", "pretrain", *args]


def _close(a, b):
    ta, tb = load_file(str(a)), load_file(str(b))
    return all(torch.allclose(ta[k], tb[k], rtol=1e-4, atol=1e-5) for k in ta)


def test_two_processes_match_one_and_resume_on_a_different_count(tmp_path):
    """The global batch is the same for any process count, so 2 gloo processes reproduce 1
    (fp32), and a run killed under 2 processes finishes under 1 with the same weights."""
    # softmax, as before the recipe's loss became a flag: with the sigmoid's summed per-class terms,
    # fp32 reduction order alone drifts the two runs apart by ~4e-4 after 20 steps
    args = ["--data", GLYPHS, *BASE, "--epochs", "4", "--precision", "fp32", "--log-every", "1", "--loss", "softmax"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = tmp_path / "single"
    assert pretrain(*args, "--out", str(single)) == 0
    ddp = tmp_path / "ddp"
    done = subprocess.run(_torchrun(2, [*args, "--out", str(ddp)]), capture_output=True, text=True, env=env,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    losses = lambda run: [r["loss"] for r in read_metrics(run) if r["kind"] == "train"]
    np.testing.assert_allclose(losses(ddp), losses(single), rtol=1e-4)
    assert _close(single / "final.safetensors", ddp / "final.safetensors")

    moved = tmp_path / "moved"
    at_kill = kill_once_checkpointed(_torchrun(2, [*args, "--checkpoint-every", "4", "--out", str(moved)]), moved, 8,
                                     env=env)
    assert at_kill is not None and 8 <= at_kill < 24, "the kill must land mid-run"
    assert pretrain(*args, "--checkpoint-every", "4", "--out", str(moved)) == 0  # now one process
    assert _close(single / "final.safetensors", moved / "final.safetensors")


def test_pretrain_reads_shards(tmp_path):
    folder = write_colour_folder(tmp_path / "colours", per_class_train=8, per_class_val=2)
    shards = tmp_path / "shards"
    assert main(["pack", "--data", str(folder), "--out", str(shards), "--shard-size", "6", "--quiet"]) == 0
    out = tmp_path / "pre"
    assert pretrain("--data", str(shards), *BASE, "--epochs", "2", "--out", str(out)) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["train_images"] == 24 and summary["final"]["examples"] == 6


def test_demo_machinery_on_a_tiny_budget(tiny_demo):
    """The shared tiny demo (tests/fixtures_runs.py: 6 glyph classes, 1 epoch, 2 fine-tuning steps)."""
    out, result = tiny_demo.out, tiny_demo.result
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["transfer_accuracy"]) == set(summary["scratch_accuracy"]) == {"1", "full"}
    assert len(summary["runs"]) == 8 and summary["transfer_accuracy"] == result.transfer_accuracy
    assert {"1shot", "5shot", "10shot"} <= set(summary["pretrain"]["fewshot_probe_on_digits"])
    assert (out / "accuracy_vs_examples.png").stat().st_size > 10_000


def test_fsdp_matches_one_process_and_its_checkpoint_loads_anywhere(tmp_path):
    """FSDP shards weights, gradients and momentum; the loss curve and weights stay those of one
    process, and its checkpoints hold whole tensors that a single process resumes from."""
    args = ["--data", GLYPHS, *BASE, "--epochs", "2", "--precision", "fp32", "--log-every", "1"]
    single = tmp_path / "single"
    assert pretrain(*args, "--out", str(single)) == 0
    sharded = tmp_path / "fsdp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    log = open(tmp_path / "torchrun.log", "w+")  # noqa: SIM115  (a pipe could fill up while we poll)
    proc = subprocess.Popen(_torchrun(2, [*args, "--fsdp", "--checkpoint-every", "3", "--out", str(sharded)]),
                            stdout=subprocess.DEVNULL, stderr=log, env=env)
    # A finished run keeps no training checkpoint: take a copy of one while the run goes on.
    checkpoint, mid_run = sharded / "checkpoints" / "latest.safetensors", tmp_path / "mid_run.safetensors"
    while proc.poll() is None and not mid_run.exists():
        if (step_of(checkpoint) or 0) >= 3:
            with contextlib.suppress(OSError):  # replaced or removed between the look and the copy
                shutil.copyfile(checkpoint, mid_run)
        time.sleep(0.01)
    proc.wait(timeout=300)
    log.close()
    assert proc.returncode == 0, (tmp_path / "torchrun.log").read_text()[-3000:]
    losses = lambda run: [r["loss"] for r in read_metrics(run) if r["kind"] == "train"]
    np.testing.assert_allclose(losses(sharded), losses(single), rtol=1e-4)
    assert _close(single / "final.safetensors", sharded / "final.safetensors")
    momentum = [k for k in load_file(str(mid_run)) if k.startswith("optimizer/")]
    assert "optimizer/stages.0.0.conv2.weight" in momentum  # whole, named like the model's parameters
    # One process, no FSDP: the finished run's checkpoint loads and the run reports as done.
    assert pretrain(*args, "--out", str(sharded)) == 0
    assert _close(single / "final.safetensors", sharded / "final.safetensors")


def test_fsdp_needs_several_processes(tmp_path, capsys):
    assert pretrain("--data", GLYPHS, *BASE, "--epochs", "1", "--fsdp", "--out", str(tmp_path / "x")) == 2
    assert "torchrun" in capsys.readouterr().err


def test_pretrain_plan_shows_loss_and_decay_and_trains_with_them(tmp_path, capsys, monkeypatch):
    assert main(["pretrain", "--data", GLYPHS, *BASE, "--plan"]) == 0
    out = capsys.readouterr().out
    assert "sigmoid cross-entropy, head bias -10" in out and "kernels only" in out
    assert main(["pretrain", "--data", GLYPHS, *BASE, "--plan", "--recipe", "bit-s", "--decay", "all"]) == 0
    out = capsys.readouterr().out
    assert "softmax cross-entropy" in out and "on every parameter" in out

    groups = []
    real_sgd = torch.optim.SGD

    class RecordingSGD(real_sgd):
        def __init__(self, params, **kwargs):
            groups.append([(g["weight_decay"], [p.ndim for p in g["params"]]) for g in params])
            super().__init__(params, **kwargs)

    monkeypatch.setattr(torch.optim, "SGD", RecordingSGD)
    run = tmp_path / "run"
    assert pretrain("--data", GLYPHS, *BASE, "--epochs", "1", "--weight-decay", "0.001", "--out", str(run)) == 0
    (decayed, kept), = groups
    assert decayed[0] == 0.001 and all(d == 4 for d in decayed[1])
    assert kept[0] == 0.0 and all(d == 1 for d in kept[1])
    plan = json.loads((run / "config.json").read_text())["plan"]
    assert plan["loss"] == "sigmoid" and plan["decayed"] == "kernels"
