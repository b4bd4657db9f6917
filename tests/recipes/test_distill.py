"""bigtransfer distill: function matching, exact resume, unlabelled images, clear errors."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from bit_files import authors_arrays
from killed_runs import CHECKPOINT, kill_once_checkpointed
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from bigtransfer import create_model, save_checkpoint
from bigtransfer.cli import main
from bigtransfer.recipes import distill
from bigtransfer.train.logbook import read_metrics

TINY = "R[1,1,1,1]x0.5"
STEPS = ["--batch", "16", "--resolution", "16", "--workers", "0", "--quiet"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A (briefly) fine-tuned digits classifier: the teacher of every test here."""
    run = tmp_path_factory.mktemp("teacher") / "run"
    assert main(["finetune", "--data", "digits", "--model", TINY, "--batch", "32", "--steps", "15",
                 "--resolution", "20/16", "--workers", "0", "--quiet", "--out", str(run)]) == 0
    return run


def test_teacher_and_student_see_identical_pixels(teacher, tmp_path, monkeypatch):
    seen = {"teacher": [], "student": []}
    real_teacher_on, real_student = distill._teacher_on, distill._student

    def recording_teacher(*args, **kwargs):
        targets = real_teacher_on(*args, **kwargs)

        def record(images):
            seen["teacher"].append(images.detach().clone())
            return targets(images)
        return record

    def recording_student(*args, **kwargs):
        student = real_student(*args, **kwargs)
        student.register_forward_pre_hook(
            lambda module, inputs: seen["student"].append(inputs[0].detach().clone()) if module.training else None)
        return student

    monkeypatch.setattr(distill, "_teacher_on", recording_teacher)
    monkeypatch.setattr(distill, "_student", recording_student)
    assert main(["distill", "--teacher", str(teacher), "--student", TINY, "--data", "digits", "--steps", "3",
                 *STEPS, "--out", str(tmp_path / "s")]) == 0
    assert len(seen["teacher"]) == len(seen["student"]) == 3
    for t, s in zip(seen["teacher"], seen["student"]):
        assert torch.equal(t.contiguous(), s.contiguous())  # the same crop, flip and MixUp, to the bit
    assert not torch.equal(seen["student"][0], seen["student"][1])  # and they are augmented batches


def test_the_loss_is_zero_when_the_student_is_the_teacher(teacher, tmp_path):
    out = tmp_path / "same"
    assert main(["distill", "--teacher", str(teacher), "--student", str(teacher), "--data", "digits",
                 "--steps", "2", "--log-every", "1", *STEPS, "--out", str(out)]) == 0
    first = next(r for r in read_metrics(out) if r["kind"] == "train")
    assert first["loss"] == pytest.approx(0.0, abs=1e-6)
    other = tmp_path / "other"
    assert main(["distill", "--teacher", str(teacher), "--student", TINY, "--data", "digits",
                 "--steps", "2", "--log-every", "1", *STEPS, "--out", str(other)]) == 0
    assert next(r for r in read_metrics(other) if r["kind"] == "train")["loss"] > 0.01


def test_a_killed_distillation_resumes_exactly(teacher, tmp_path):
    args = ["distill", "--teacher", str(teacher), "--student", TINY, "--data", "digits", "--steps", "12",
            "--checkpoint-every", "3", *STEPS]
    reference = tmp_path / "reference"
    assert main([*args, "--out", str(reference)]) == 0
    killed = tmp_path / "killed"
    at_kill = kill_once_checkpointed([sys.executable, "-m", "bigtransfer", *args, "--out", str(killed)], killed, 6)
    assert 6 <= (at_kill or 0) < 12, "the kill must land mid-run"
    with safe_open(str(killed / CHECKPOINT), "pt") as fh:
        assert any(k.endswith("::exp_avg_sq") for k in fh.keys())  # noqa: SIM118  # Adam's state travels with the checkpoint
    assert main([*args, "--out", str(killed)]) == 0
    a, b = load_file(str(reference / "final.safetensors")), load_file(str(killed / "final.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_unlabelled_images_are_labelled_by_the_teacher(teacher, tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(24):
        Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
    out = tmp_path / "s"
    assert main(["distill", "--teacher", str(teacher), "--student", TINY, "--data", str(folder), "--steps", "2",
                 *STEPS, "--out", str(out)]) == 0
    assert "unlabelled data: no test accuracy" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["labelled"] is False and summary["train_images"] == 24
    assert main(["predict", "--model", str(out), str(folder / "img0.png"), "--json", "--quiet"]) == 0
    predictions = json.loads(capsys.readouterr().out)["predictions"]
    assert predictions[0]["predictions"][0]["label"] in [str(d) for d in range(10)]  # the teacher's classes


def test_the_student_is_a_run_like_any_other(teacher, tmp_path, capsys):
    out = tmp_path / "s"
    assert main(["distill", "--teacher", str(teacher), "--student", TINY, "--data", "digits", "--steps", "3",
                 "--eval-every", "1", *STEPS, "--compare", str(teacher), "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["teacher"]["examples"] == summary["final"]["examples"] == 539
    capsys.readouterr()
    assert main(["evaluate", "--model", str(out), "--data", "digits", "--quiet"]) == 0
    assert f"top-1 {summary['final']['top1']:.2%}" in capsys.readouterr().out
    (out / "report.html").unlink()
    assert main(["report", str(out)]) == 0
    page = (out / "report.html").read_text()
    assert "student (distilled)" in page and "student (fine-tuned directly)" in page and "teacher" in page
    assert len([r for r in read_metrics(out) if r["kind"] == "eval"]) == 3


def test_cached_teacher_logits_need_fixed_views(teacher, tmp_path):
    out = tmp_path / "cached"
    assert main(["distill", "--teacher", str(teacher), "--student", TINY, "--data", "digits", "--steps", "2",
                 "--cache-teacher", *STEPS, "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["plan"]["fixed_views"] is True and config["plan"]["mixup"] == 0.0
    assert np.load(out / "cache" / "teacher_logits.npy").shape == (1258, 10)


def test_bad_teachers_and_students_are_one_line(teacher, tmp_path, capsys):
    torch.manual_seed(0)
    five = tmp_path / "five.safetensors"
    save_checkpoint(create_model(TINY, num_classes=5), five)
    headless = tmp_path / "headless.npz"
    np.savez(headless, **authors_arrays((1, 1, 1, 1), 0.5, num_classes=None))
    cases = [(["--teacher", str(teacher), "--student", str(five)], "--new-head"),
             (["--teacher", str(headless), "--student", TINY], "not a classifier"),
             (["--teacher", str(tmp_path / "nothing"), "--student", TINY], "no such weights file"),
             (["--teacher", str(teacher), "--student", "Rfoo"], "unknown architecture")]
    for argv, message in cases:
        assert main(["distill", *argv, "--data", "digits", "--steps", "1", *STEPS,
                     "--out", str(tmp_path / "x")]) == 2, message
        err = capsys.readouterr().err
        assert message in err and err.strip().count("\n") == 0, err
    assert main(["distill", "--teacher", str(teacher), "--student", str(five), "--new-head", "--data", "digits",
                 "--steps", "1", *STEPS, "--out", str(tmp_path / "ok")]) == 0
