"""`bigtransfer export --format triton`: a model repository whose config.pbtxt parses with Triton's
own model-config schema (model_config.proto, compiled in tritonclient) and whose model runs in
ONNX Runtime."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from google.protobuf import text_format
from image_data import COLOURS

from bigtransfer.cli import main
from bigtransfer.models import create_model, save_checkpoint

TINY = "R[1,1,1,1]x0.5"


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    torch.manual_seed(0)
    model = create_model(TINY, num_classes=3, zero_head=False).eval()
    path = save_checkpoint(model, tmp_path_factory.mktemp("triton") / "colours-r14.safetensors",
                           class_names=sorted(COLOURS), resolution=24)
    return path, model


def _parsed(path):
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def test_the_repository_config_parses_with_tritons_schema_and_the_model_runs(weights, tmp_path):
    path, model = weights
    repo = tmp_path / "repo"
    assert main(["export", "--model", str(path), "--format", "triton", "--out", str(repo), "--max-batch", "8",
                 "--quiet"]) == 0
    folder = repo / "colours-r14"
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()) == [
        "1/model.onnx", "README.md", "config.pbtxt", "labels.txt"]
    config = _parsed(folder / "config.pbtxt")
    assert (config.name, config.backend, config.platform, config.max_batch_size) == (
        "colours-r14", "onnxruntime", "onnxruntime_onnx", 8)
    assert config.HasField("dynamic_batching") and config.dynamic_batching.max_queue_delay_microseconds > 0
    (image,) = config.input
    assert (image.name, list(image.dims), image.data_type) == ("images", [3, 24, 24], 11)  # 11: TYPE_FP32
    outputs = {o.name: list(o.dims) for o in config.output}
    assert outputs == {"logits": [3], "features": [model.num_features]}
    assert (folder / "labels.txt").read_text().split() == sorted(COLOURS)

    # The model Triton would load: the input and output names and shapes the config declares.
    session = onnxruntime.InferenceSession(str(folder / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == [image.name]
    assert [o.name for o in session.get_outputs()] == ["logits", "features"]
    x = torch.rand(8, 3, 24, 24, generator=torch.Generator().manual_seed(3)) * 2 - 1
    logits, features = session.run(None, {"images": x.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(logits, model(x).numpy(), rtol=1e-4, atol=1e-4)
    assert features.shape == (8, model.num_features)
    props = {p.key: p.value for p in onnx.load(str(folder / "1" / "model.onnx")).metadata_props}
    assert json.loads(props["bigtransfer.class_names"]) == sorted(COLOURS)


def test_a_repository_takes_more_models_but_replaces_one_only_when_asked(weights, tmp_path, capsys):
    path, _ = weights
    repo = tmp_path / "repo"
    base = ["export", "--model", str(path), "--format", "triton", "--out", str(repo), "--quiet", "--no-check"]
    assert main(base) == 0
    assert main([*base, "--name", "second"]) == 0
    assert {p.name for p in repo.iterdir() if not p.name.startswith(".")} == {"colours-r14", "second"}
    assert main(base) == 2 and "--overwrite" in capsys.readouterr().err
    (repo / "colours-r14" / "2").mkdir()  # the user's own version beside ours
    assert main([*base, "--overwrite"]) == 0
    assert (repo / "colours-r14" / "2").is_dir() and _parsed(repo / "colours-r14" / "config.pbtxt").name == "colours-r14"
    assert not [p for p in repo.rglob("*") if ".tmp" in p.name]


@pytest.mark.parametrize(("extra", "message"), [
    (["--name", "../escape"], "a Triton model name"),
    (["--max-batch", "0"], "--max-batch must be at least 1"),
])
def test_bad_triton_options_are_clear_errors(weights, tmp_path, capsys, extra, message):
    path, _ = weights
    code = main(["export", "--model", str(path), "--format", "triton", "--out", str(tmp_path / "repo"), *extra])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "repo").exists()


def test_a_folder_of_someone_elses_files_is_not_made_a_repository(weights, tmp_path, capsys):
    path, _ = weights
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    code = main(["export", "--model", str(path), "--format", "triton", "--out", str(tmp_path / "mine")])
    assert code == 2 and "did not write" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["notes.txt"]
