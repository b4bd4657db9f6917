"""The fast inference path: standardized kernels kept while weights are unchanged, folded models,
the ONNX Runtime backend (cached per weights file) and bf16, and everything that only runs a model
forward going through them."""

from __future__ import annotations

import copy
import gc
import threading

import pytest
import torch
from fixtures_bigarch import meta_built
from library_models import relative_difference, released_params

from bigtransfer.cli import main
from bigtransfer.errors import BigTransferError
from bigtransfer.inference import backends
from bigtransfer.inference.predictor import load_predictor
from bigtransfer.models import create_model, resnetv2, save_checkpoint
from bigtransfer.models.resnetv2 import StdConv2d, fold_standardization, keep_standardized_kernels

TINY = "R[1,1,1,1]x0.5"


def _model(dtype=torch.float32, seed: int = 0):
    torch.manual_seed(seed)
    return create_model(TINY, num_classes=5, zero_head=False).to(dtype)


def _images(n: int = 3, size: int = 32, dtype=torch.float32, seed: int = 1):
    return (torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1).to(dtype)


def _per_forward(model):
    """The same model computing Weight Standardization on every call (the reference)."""
    reference = copy.deepcopy(model)
    keep_standardized_kernels(reference, False)
    return reference


@pytest.fixture
def standardizations(monkeypatch):
    """Counts the calls of standardize_weight (each is one kernel standardized)."""
    calls = []
    original = resnetv2.standardize_weight

    def counting(weight, eps=resnetv2.WS_EPS):
        calls.append(weight.shape)
        return original(weight, eps)

    monkeypatch.setattr(resnetv2, "standardize_weight", counting)
    return calls


def _convs(model) -> int:
    return sum(isinstance(m, StdConv2d) for m in model.modules())


# --------------------------------------------------------------------------- kept kernels
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_kept_kernels_give_exactly_the_per_forward_result(dtype):
    model = _model(dtype).eval()
    reference = _per_forward(model)
    x = _images(dtype=dtype)
    with torch.no_grad():
        want = reference(x)
        first, second = model(x), model(x)  # the second uses the kept kernels
    assert torch.equal(first, want) and torch.equal(second, want)


def test_kernels_are_standardized_once_while_only_running_forward(standardizations):
    model = _model().eval()
    x = _images()
    with torch.inference_mode():
        for _ in range(3):
            model(x)
    assert len(standardizations) == _convs(model)
    with torch.no_grad():
        model(x)
    assert len(standardizations) == _convs(model)  # inference_mode's kept kernels serve no_grad too


def test_training_standardizes_on_every_forward_and_its_gradients_are_unchanged(standardizations):
    model = _model()
    reference = _per_forward(model)
    x, y = _images(4), torch.tensor([0, 1, 2, 3])
    for net in (model, reference):
        net.train()
        torch.nn.functional.cross_entropy(net(x), y).backward()
    assert len(standardizations) == 2 * _convs(model)
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert torch.equal(p.grad, q.grad), name


def test_eval_mode_with_gradients_wanted_still_differentiates_the_standardization():
    model = _model().eval()
    reference = _per_forward(model)
    x = _images()
    for net in (model, reference):
        net(x).square().sum().backward()
    for p, q in zip(model.parameters(), reference.parameters()):
        assert torch.equal(p.grad, q.grad)


def test_frozen_weights_keep_kernels_and_still_give_input_gradients(standardizations):
    """A frozen body in eval mode (saliency maps, a probe on top): kernels kept, inputs differentiable."""
    model = _model().eval().requires_grad_(False)
    with torch.inference_mode():
        model(_images())  # kept kernels made in inference mode must still serve autograd later
    x = _images().requires_grad_(True)
    model(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert len(standardizations) == _convs(model)


def _changed_weights_are_used(model, change) -> None:
    x = _images()
    with torch.no_grad():
        before = model(x)
        change(model)
        after = model(x)
        want = _per_forward(model)(x)
    assert torch.equal(after, want) and not torch.equal(after, before)


def test_an_optimizer_step_invalidates_the_kept_kernels():
    model = _model().eval()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)

    def step(m):
        with torch.enable_grad():
            m(_images(seed=5)).square().sum().backward()
        optimizer.step()

    _changed_weights_are_used(model, step)


def test_load_state_dict_and_in_place_edits_invalidate_the_kept_kernels():
    other = _model(seed=7).state_dict()
    _changed_weights_are_used(_model().eval(), lambda m: m.load_state_dict(other))
    _changed_weights_are_used(_model().eval(), lambda m: m.root.conv.weight.add_(torch.randn_like(m.root.conv.weight)))


def test_a_model_moved_to_another_dtype_uses_kernels_of_that_dtype():
    model = _model().eval()
    with torch.no_grad():
        model(_images())
        model.to(torch.float64)
        x = _images(dtype=torch.float64)
        assert torch.equal(model(x), _per_forward(model)(x))


def test_train_then_eval_refreshes_after_an_edit_through_data():
    """`.data` edits bypass the version counter (as they bypass autograd); train()/eval() refresh."""
    model = _model().eval()

    def edit(m):
        m.root.conv.weight.data += torch.randn_like(m.root.conv.weight)
        m.train()
        m.eval()

    _changed_weights_are_used(model, edit)


def test_many_threads_running_forward_at_once_get_the_single_thread_answer():
    model = _model().eval()
    x = _images(2)
    with torch.no_grad():
        want = _per_forward(model)(x)
    results, errors = [], []

    def work():
        try:
            for _ in range(5):
                with torch.inference_mode():
                    results.append(model(x))
        except Exception as err:  # noqa: BLE001  (reported below)
            errors.append(err)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 20
    assert all(torch.equal(r, want) for r in results)


def test_folding_replaces_every_standardized_conv_by_a_plain_one_with_the_same_function():
    model = _model(torch.float64).eval()
    reference = _per_forward(model)
    folded = fold_standardization(copy.deepcopy(model))
    assert not any(isinstance(m, StdConv2d) for m in folded.modules())
    x = _images(dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), reference(x), rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------- the verbs' forward passes
def test_the_training_loops_evaluation_standardizes_each_kernel_once(standardizations):
    from bigtransfer.train.loop import evaluate_model

    model = _model()
    data = torch.utils.data.TensorDataset(_images(12), torch.arange(12) % 5)
    evaluate_model(model, data, batch=4)  # three batches
    assert len(standardizations) == _convs(model)


def test_few_shot_feature_extraction_standardizes_each_kernel_once(standardizations):
    from bigtransfer.train.linear_probe import extract_features

    model = _model()
    data = torch.utils.data.TensorDataset(_images(12), torch.arange(12) % 5)
    features, _ = extract_features(model, data, torch.device("cpu"), batch=4)
    assert features.shape == (12, model.num_features)
    assert len(standardizations) == _convs(model)


def test_dedups_embedding_model_is_folded():
    from bigtransfer.dedup.pipeline import embedding_model

    model = embedding_model(TINY, torch.device("cpu"))
    assert not any(isinstance(m, StdConv2d) for m in model.modules())


# --------------------------------------------------------------------------- the Predictor's backends
@pytest.fixture
def saved(tmp_path):
    model = _model()
    path = save_checkpoint(model, tmp_path / "model.safetensors", class_names=list("abcde"), resolution=32)
    return path, model.eval()


def test_the_onnxruntime_backend_agrees_with_torch_and_is_exported_once_per_weights_file(saved, tmp_path):
    path, model = saved
    x = _images(4)
    with torch.no_grad():
        logits, features = model(x), model.forward_features(x)
    predictor = load_predictor(path, device="cpu", backend="onnxruntime")
    assert (predictor.backend, predictor.precision) == ("onnxruntime", "fp32")
    assert relative_difference(predictor.logits(x), logits) < 1e-4
    assert relative_difference(predictor.features(x), features) < 1e-4
    files = list((tmp_path / "cache" / "onnx").rglob("*"))
    onnx_file = next(f for f in files if f.name == "model.onnx")
    assert backends.weights_digest(path)[:32] in onnx_file.parent.name and "32px" in onnx_file.parent.name
    assert not [f for f in files if ".tmp" in f.name]  # built aside, moved into place
    stamp = onnx_file.stat().st_mtime_ns
    again = load_predictor(path, device="cpu", backend="onnxruntime")
    assert onnx_file.stat().st_mtime_ns == stamp and again.runner.session is predictor.runner.session
    with pytest.raises(BigTransferError, match=r"must be \[N, 3, 32, 32\]"):
        predictor.logits(_images(1, size=40))


def test_bf16_runs_and_matches_torchs_own_bf16_autocast(saved):
    """bf16 is emulated on this CPU (no AVX512-BF16): slow, but the result must be autocast's."""
    path, model = saved
    x = _images(4)
    predictor = load_predictor(path, device="cpu", backend="torch", precision="bf16")
    assert predictor.precision == "bf16" and "--precision bf16" in predictor.choice
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want = model(x).float()
    got = predictor.logits(x)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2 * float(want.abs().max()))
    with torch.no_grad():
        assert relative_difference(got, model(x)) < 0.1  # and bf16 is still close to fp32


def test_auto_keeps_light_models_on_torch_and_sends_heavy_fp32_cpu_work_where_it_measured_fastest(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr("bigtransfer.train.loop.native_bf16", lambda device: False)
    light = backends.choose("auto", "auto", cpu, 1.6e7)
    assert (light.backend, light.precision) == ("torch", "fp32") and "light model" in light.reason
    monkeypatch.setattr(backends, "isa_class", lambda: "avx2")
    heavy = backends.choose("auto", "auto", cpu, 8e9)
    assert heavy.backend == backends.MEASURED_FP32["avx2"][0] and "avx2" in heavy.reason
    monkeypatch.setattr("bigtransfer.train.loop.native_bf16", lambda device: True)
    native = backends.choose("auto", "auto", cpu, 8e9)
    assert (native.backend, native.precision) == ("torch", "bf16") and "natively" in native.reason
    assert backends.choose("auto", "auto", torch.device("cuda"), 8e9).backend == "torch"


@pytest.mark.parametrize(("backend", "precision", "device", "message"), [
    ("onnxruntime", "auto", "cuda", "runs on the CPU"),
    ("onnxruntime", "bf16", "cpu", "--precision bf16 runs on --backend torch"),
    ("tensorrt", "auto", "cpu", "--backend must be one of"),
    ("torch", "fp16", "cpu", "--precision must be one of"),
])
def test_impossible_backend_choices_are_clear_errors(backend, precision, device, message):
    with pytest.raises(BigTransferError, match=message):
        backends.choose(backend, precision, torch.device(device), 8e9)


def test_the_cli_says_which_backend_runs_and_why(saved, tmp_path, capsys):
    path, _ = saved
    from PIL import Image

    Image.new("RGB", (40, 30), (200, 30, 30)).save(tmp_path / "red.png")
    assert main(["predict", "--model", str(path), str(tmp_path / "red.png"), "--json"]) == 0
    captured = capsys.readouterr()
    assert "bigtransfer: backend torch, fp32 (a light model" in captured.err
    assert '"predictions"' in captured.out and "backend" not in captured.out  # stdout stays JSON
    with pytest.raises(SystemExit) as exited:
        main(["predict", "--model", str(path), str(tmp_path / "red.png"), "--backend", "tensorrt"])
    assert exited.value.code == 2 and "invalid choice: 'tensorrt'" in capsys.readouterr().err


def test_the_onnx_cache_is_not_written_through_a_symbolic_link(saved, tmp_path):
    path, _ = saved
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "onnx").symlink_to(elsewhere)
    with pytest.raises(BigTransferError, match="symbolic link"):
        load_predictor(path, device="cpu", backend="onnxruntime")
    assert not list(elsewhere.iterdir())


def test_auto_falls_back_to_torch_and_says_why_when_onnx_cannot_be_used(saved, tmp_path, monkeypatch):
    path, model = saved
    monkeypatch.setattr(backends, "ONNX_MIN_FLOPS", 0)  # as if the model were heavy
    monkeypatch.setattr(backends, "isa_class", lambda: "avx2")
    monkeypatch.setattr("bigtransfer.train.loop.native_bf16", lambda device: False)
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "onnx").symlink_to(tmp_path)
    predictor = load_predictor(path, device="cpu")
    assert predictor.backend == "torch" and "ONNX Runtime was the choice, but" in predictor.choice
    x = _images()
    with torch.no_grad():
        torch.testing.assert_close(predictor.logits(x), model(x))


# --------------------------------------------------------------------------- every released architecture
@pytest.mark.parametrize("arch", released_params())
def test_onnx_agrees_with_the_exact_result_on_every_released_architecture(arch, tmp_path):
    """Random weights at 32 px (the graph is the same at any size): the folded ONNX graph in ONNX
    Runtime against the model computed in fp64, logits and pre-logits to 1e-4 relative. (fp32
    PyTorch is no exact yardstick for the deepest models: on R152x2 its own channels_last and NCHW
    results differ from each other by 1.4e-4, and from fp64 by up to 2.4e-4.) Weights come from a
    random pool copied in (fixtures_bigarch), not from a random draw per value."""
    model = meta_built(lambda: create_model(arch, num_classes=10, zero_head=False))
    keep_standardized_kernels(model, False)  # no second copy of the largest kernels
    x = _images(2)
    with torch.no_grad():
        model.double()  # in place and back: fp32 -> fp64 -> fp32 is exact, and never two copies
        exact_features = model.forward_features(x.double())
        exact_logits = model.forward_head(exact_features)
        model.float()
    backends.write_onnx(model, 32, tmp_path / "model.onnx")  # folds `model` in place
    del model
    gc.collect()
    forward = backends.OnnxForward(tmp_path / "model.onnx", 32, keep_session=False)
    logits, features = forward(x, "logits"), forward(x, "features")
    assert relative_difference(logits.double(), exact_logits) < 1e-4
    assert relative_difference(features.double(), exact_features) < 1e-4
