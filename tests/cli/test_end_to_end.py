"""The whole user path on CPU: finetune -> evaluate -> predict -> embed -> export."""

import csv
import json

import numpy as np
import onnxruntime
import pytest
import torch
from image_data import COLOURS, colour_image, write_colour_folder
from PIL import Image

from bigtransfer.cli import main
from bigtransfer.data.transforms import eval_transform

TINY = "R[1,1,1,1]x0.5"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One short fine-tuning run on generated colour images, shared by the tests below."""
    root = tmp_path_factory.mktemp("e2e")
    data = write_colour_folder(root / "colours", per_class_train=20, per_class_val=10)
    run = root / "run"
    code = main(["finetune", "--data", str(data), "--model", TINY, "--batch", "30", "--steps", "40",
                 "--base-lr", "0.03", "--resolution", "28/24", "--workers", "0", "--quiet", "--out", str(run)])
    assert code == 0
    return root, data, run


def test_finetune_beats_chance_by_far(trained):
    _, _, run = trained
    summary = json.loads((run / "summary.json").read_text())
    assert summary["final"]["top1"] >= 0.9  # chance is 1/3
    assert summary["classes"] == sorted(COLOURS)


def test_evaluate_writes_reports(trained, capsys):
    root, data, run = trained
    out = root / "eval"
    assert main(["evaluate", "--model", str(run), "--data", str(data), "--out", str(out), "--quiet"]) == 0
    assert "top-1" in capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    summary = json.loads((run / "summary.json").read_text())
    assert metrics["top1"] == pytest.approx(summary["final"]["top1"])  # same split, same preprocessing
    assert metrics["examples"] == 30 and set(metrics["per_class_accuracy"]) == set(COLOURS)
    rows = list(csv.reader((out / "confusion.csv").read_text().splitlines()))
    assert rows[0][1:] == sorted(COLOURS)
    assert sum(int(v) for row in rows[1:] for v in row[1:]) == 30
    assert np.trace(np.array([[int(v) for v in row[1:]] for row in rows[1:]])) == round(metrics["top1"] * 30)
    per_class = list(csv.DictReader((out / "per_class_accuracy.csv").read_text().splitlines()))
    assert [r["class"] for r in per_class] == sorted(COLOURS)
    with Image.open(out / "confusion.png") as png:
        assert png.size[0] > 100 and png.size[1] > 100


def test_predict_names_classes_with_probabilities(trained, tmp_path, capsys):
    _, _, run = trained
    rng = np.random.default_rng(42)
    for name, colour in COLOURS.items():
        colour_image(rng, colour, size=30).save(tmp_path / f"{name}.png")
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    assert main(["predict", "--model", str(run), str(tmp_path), "--top-k", "2", "--json", "--quiet"]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert [p.endswith("broken.jpg") for p in report["unreadable"]] == [True]
    assert len(report["predictions"]) == 3
    for item in report["predictions"]:
        top = item["predictions"]
        assert len(top) == 2 and top[0]["probability"] >= top[1]["probability"]
        assert top[0]["label"] in item["path"]  # red.png -> red, ...
        assert 0 < sum(p["probability"] for p in top) <= 1.0 + 1e-6
    assert main(["predict", "--model", str(run), str(tmp_path / "red.png"), "--quiet"]) == 0
    assert "1. red" in capsys.readouterr().out


def test_embed_writes_features_and_index(trained, tmp_path):
    _, data, run = trained
    out = tmp_path / "features" / "val"
    assert main(["embed", "--model", str(run), str(data / "val"), "--out", str(out), "--quiet"]) == 0
    features = np.load(out.with_suffix(".npy"))
    index = list(csv.DictReader(out.with_suffix(".csv").read_text().splitlines()))
    assert features.shape == (30, 1024) and features.dtype == np.float32  # 2048 * width 0.5
    assert [int(r["row"]) for r in index] == list(range(30))
    assert index[0]["path"].endswith("blue_000.png")
    assert np.isfinite(features).all() and features.std() > 0


def test_export_onnx_matches_pytorch(trained, tmp_path):
    _, data, run = trained
    onnx_path = tmp_path / "model.onnx"
    assert main(["export", "--model", str(run), "--out", str(onnx_path)]) == 0
    report = json.loads(onnx_path.with_suffix(".onnx.json").read_text())
    assert report["max_abs_diff_vs_pytorch"] < 1e-3 and report["class_names"] == sorted(COLOURS)
    # The exported graph classifies real, pre-processed images like the run did, at any batch size.
    images = torch.stack([eval_transform(24)(Image.open(p).convert("RGB"))
                          for p in sorted((data / "val" / "green").glob("*.png"))[:5]])
    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    logits = session.run(None, {session.get_inputs()[0].name: images.numpy()})[0]
    assert logits.shape == (5, 3)
    assert (logits.argmax(1) == sorted(COLOURS).index("green")).mean() >= 0.8


def test_export_torchscript_matches_pytorch(trained, tmp_path):
    _, _, run = trained
    path = tmp_path / "model.pt"
    assert main(["export", "--model", str(run), "--format", "torchscript", "--out", str(path)]) == 0
    with pytest.warns(FutureWarning):  # PyTorch deprecates TorchScript; the format still works
        scripted = torch.jit.load(str(path))
    assert scripted(torch.zeros(4, 3, 24, 24)).shape == (4, 3)
    assert json.loads(path.with_suffix(".pt.json").read_text())["max_abs_diff_vs_pytorch"] < 1e-3


def test_export_pt2_matches_pytorch(trained, tmp_path):
    _, _, run = trained
    path = tmp_path / "model.pt2"
    assert main(["export", "--model", str(run), "--format", "pt2", "--out", str(path)]) == 0
    program = torch.export.load(str(path)).module()
    assert program(torch.zeros(5, 3, 24, 24)).shape == (5, 3)  # dynamic batch
    assert json.loads(path.with_suffix(".pt2.json").read_text())["max_abs_diff_vs_pytorch"] < 1e-3


def test_using_a_run_that_has_no_final_model_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "unfinished").mkdir()
    assert main(["predict", "--model", str(tmp_path / "unfinished"), str(tmp_path)]) == 2
    assert "no final.safetensors" in capsys.readouterr().err


def test_onnx_root_padding_survives_onnxruntime_optimizations(tmp_path):
    """onnxruntime fuses a zero Pad into MaxPool (which pads with -inf); our export must not let it."""
    from bigtransfer import create_model
    from bigtransfer.sharing.export import onnx_safe_copy

    torch.manual_seed(0)
    model = create_model(TINY, num_classes=3, zero_head=False).eval()
    x = torch.randn(2, 3, 24, 24) * 3  # strongly negative root outputs at the border
    safe = onnx_safe_copy(model)
    with torch.no_grad():
        torch.testing.assert_close(safe(x), model(x), rtol=1e-5, atol=1e-5)  # the same function in PyTorch
    path = tmp_path / "root.onnx"
    torch.onnx.export(safe.root, (x,), dynamo=True, external_data=False).save(str(path))
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, model.root(x).numpy(), rtol=1e-4, atol=1e-4)
