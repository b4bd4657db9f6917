"""`bigtransfer export --quantize int8`: ONNX Runtime static quantization calibrated on the user's
images, its top-1 change measured and recorded, and refused beyond --max-drop."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from image_data import COLOURS, write_colour_folder
from PIL import Image

from bigtransfer.cli import main
from bigtransfer.data.transforms import eval_transform

TINY = "R[1,1,1,1]x0.5"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A short fine-tuning run on generated colour images (train/ and val/, the run's test split)."""
    root = tmp_path_factory.mktemp("quantize")
    data = write_colour_folder(root / "colours", per_class_train=20, per_class_val=10)
    run = root / "run"
    assert main(["finetune", "--data", str(data), "--model", TINY, "--batch", "30", "--steps", "30", "--base-lr",
                 "0.03", "--resolution", "28/24", "--workers", "0", "--quiet", "--out", str(run)]) == 0
    return data, run


def _val_images(data):
    files = sorted((data / "val").rglob("*.png"))
    labels = [sorted(COLOURS).index(f.parent.name) for f in files]
    return torch.stack([eval_transform(24)(Image.open(f).convert("RGB")) for f in files]).numpy(), np.array(labels)


def test_int8_export_measures_its_top1_change_on_the_runs_test_split_and_records_it(trained, tmp_path, capsys):
    data, run = trained
    out = tmp_path / "model-int8.onnx"
    assert main(["export", "--model", str(run), "--out", str(out), "--quantize", "int8", "--calibration",
                 str(data / "train"), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "int8: top-1" in printed and "30 images of" in printed and "the run's test split" in printed

    report = json.loads((tmp_path / "model-int8.onnx.json").read_text())["quantization"]
    assert report["evaluated_images"] == 30 and report["calibration_images"] == 60
    assert report["top1_change_points"] == pytest.approx(100 * (report["top1_int8"] - report["top1_fp32"]))
    assert report["top1_change_points"] >= -1.0  # the default --max-drop let it through

    model = onnx.load(str(out))
    props = {p.key: p.value for p in model.metadata_props}
    assert float(props["bigtransfer.quantization.top1_change_points"]) == pytest.approx(
        report["top1_change_points"], abs=1e-4)
    assert json.loads(props["bigtransfer.class_names"]) == sorted(COLOURS)
    ops = {node.op_type for node in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops
    assert any(t.data_type == onnx.TensorProto.INT8 for t in model.graph.initializer)  # int8 kernels

    card = (tmp_path / "model-int8.onnx.md").read_text()
    assert "## int8 quantization" in card and f"change {report['top1_change_points']:+.2f} points" in card

    # What the file says it scores is what it scores, in plain ONNX Runtime.
    images, labels = _val_images(data)
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    logits = session.run(["logits"], {"images": images})[0]
    assert (logits.argmax(1) == labels).mean() == pytest.approx(report["top1_int8"])


def test_int8_export_losing_more_than_max_drop_is_refused_and_writes_nothing(trained, tmp_path, capsys,
                                                                            monkeypatch):
    """The colours are too easy to lose top-1 on, so the measurement reports a 5-point loss here:
    quantization runs for real; the refusal must carry the figure and leave nothing behind."""
    import bigtransfer.sharing.quantize

    data, run = trained
    measured = iter([0.90, 0.85])  # fp32, then int8
    monkeypatch.setattr(bigtransfer.sharing.quantize, "top1_of", lambda *args, **kwargs: next(measured))
    out = tmp_path / "out" / "model.onnx"
    code = main(["export", "--model", str(run), "--out", str(out), "--quantize", "int8", "--calibration",
                 str(data / "train"), "--max-drop", "1", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "loses 5.00 points of top-1" in err and "more than --max-drop 1" in err, err
    assert "fp32 90.00%, int8 85.00%" in err and "Traceback" not in err
    # no model, no sidecars, no temporary files (nothing is built beside the outputs)
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_int8_can_be_measured_on_other_labelled_data(trained, tmp_path, capsys):
    data, run = trained
    weights = run / "final.safetensors"
    copy = tmp_path / "weights.safetensors"
    copy.write_bytes(weights.read_bytes())  # a weights file on its own: no run, so no test split of its own
    assert main(["export", "--model", str(copy), "--out", str(tmp_path / "m.onnx"), "--quantize", "int8",
                 "--calibration", str(data / "train"), "--quiet"]) == 2
    assert "name labelled images with --data" in capsys.readouterr().err
    assert main(["export", "--model", str(copy), "--out", str(tmp_path / "m.onnx"), "--quantize", "int8",
                 "--calibration", str(data / "train"), "--data", str(data), "--quiet"]) == 0
    report = json.loads((tmp_path / "m.onnx.json").read_text())["quantization"]
    assert report["evaluated_on"] == f"{data} (test split)" and report["evaluated_images"] == 30


@pytest.mark.parametrize(("extra", "message"), [
    (["--quantize", "int8"], "--quantize int8 needs --calibration"),
    (["--quantize", "int8", "--calibration", "x", "--format", "pt2"], "use --format onnx or triton"),
    (["--calibration", "x"], "--calibration and --data go with --quantize int8"),
    (["--quantize", "int8", "--calibration", "x", "--max-drop", "-1"], "--max-drop must be at least 0"),
    (["--quantize", "int8", "--calibration", "x", "--calibration-images", "0"], "--calibration-images must be"),
])
def test_bad_quantization_options_fail_before_anything_loads(extra, message, tmp_path, capsys):
    code = main(["export", "--model", str(tmp_path / "no-such-run"), "--out", str(tmp_path / "m.onnx"), *extra])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err, err


def test_a_calibration_folder_without_images_is_a_clear_error(trained, tmp_path, capsys):
    _, run = trained
    (tmp_path / "empty").mkdir()
    code = main(["export", "--model", str(run), "--out", str(tmp_path / "m.onnx"), "--quantize", "int8",
                 "--calibration", str(tmp_path / "empty"), "--quiet"])
    assert code == 2 and "no image files found" in capsys.readouterr().err
    assert not (tmp_path / "m.onnx").exists()
