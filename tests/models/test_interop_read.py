"""Reading timm and transformers BiT checkpoints, checked against those libraries' own models."""

import gc
import json

import pytest
import torch
from fixtures_bigarch import meta_built
from library_models import (
    RELEASED,
    images,
    relative_difference,
    released_params,
    timm_model,
    transformers_config,
    transformers_model,
)
from safetensors.torch import save_file

from bigtransfer import BigTransferError, create_model
from bigtransfer.cli import main
from bigtransfer.models.checkpoint import read_metadata, summarize
from bigtransfer.models.resnetv2 import keep_standardized_kernels

TINY = ((1, 1, 1, 1), 0.5)  # R14x0.5: same blocks as the released models, a few MB
TOLERANCE = 1e-4  # fp32 logits, relative to their largest magnitude


def _save_timm(model, path):
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def _logits(model, x):
    with torch.no_grad():
        out = model(x)
    return getattr(out, "logits", out)


def _assert_same_function(build, arch, x):
    """Ours, loaded from the file `build()` wrote, against the library's model `build()` returned (one
    model in memory at a time): exact in fp64, and in fp32 within 1e-4 or, where the two models' own fp32
    rounding (each against itself in fp64) is larger, within that sum: the most an exact mapping can
    differ by."""
    theirs, weights = build()
    want32 = _logits(theirs, x)
    want64 = _logits(theirs.double(), x.double())
    del theirs
    gc.collect()
    ours = create_model(arch, weights=weights).eval()
    # No kept standardized kernels: they would be a second copy of R152x4's weights (7.5 GB in fp64).
    # That they compute the same is tested in tests/inference/test_inference_fast.py.
    keep_standardized_kernels(ours, False)
    got32 = _logits(ours, x)
    got64 = _logits(ours.double(), x.double())
    del ours
    gc.collect()
    assert relative_difference(got64, want64) < 1e-10
    rounding = relative_difference(got32.double(), got64) + relative_difference(want32.double(), want64)
    assert relative_difference(got32, want32) <= max(TOLERANCE, 1.01 * rounding)


@pytest.mark.parametrize("arch", released_params())
def test_timm_file_gives_timms_logits_for_every_released_architecture(tmp_path, arch):
    timm = pytest.importorskip("timm")

    def build():
        # timm's registered model, weights from a random pool instead of its init (936M draws for R152x4)
        theirs = meta_built(lambda: timm.create_model(f"resnetv2_{arch[1:]}_bit", pretrained=False, num_classes=10))
        return theirs, _save_timm(theirs, tmp_path / "timm.safetensors")

    x = images(32, batch=2)  # the smallest input BiT's five stride-2 steps take: cheap for the largest models
    _assert_same_function(build, arch, x)
    assert summarize(tmp_path / "timm.safetensors").ws_eps == 1e-8


@pytest.mark.parametrize("arch", released_params())
def test_transformers_folder_gives_transformers_logits_for_every_released_architecture(tmp_path, arch):
    transformers = pytest.importorskip("transformers")
    config = transformers_config(*RELEASED[arch], num_classes=10)

    def build():
        theirs = meta_built(lambda: transformers.BitForImageClassification(config))  # random pool, not its init
        theirs.save_pretrained(tmp_path / "hf")
        return theirs, tmp_path / "hf"

    _assert_same_function(build, arch, images(32, batch=2))


def test_timm_summary_infers_architecture_and_head(tmp_path):
    path = _save_timm(timm_model(*TINY, num_classes=21843), tmp_path / "m.safetensors")
    summary = summarize(path)
    assert (summary.arch.name, summary.num_classes, summary.source_format) == ("R14x0.5", 21843, "timm")
    meta = read_metadata(path)
    assert meta["format"] == "timm" and meta["ws_eps"] == 1e-8
    json.dumps(meta)


def test_transformers_headless_bitmodel_gives_the_same_features(tmp_path):
    theirs = transformers_model(*TINY, num_classes=3, headless=True)
    x = images()
    with torch.no_grad():
        want = theirs(x).pooler_output.flatten(1)
    theirs.save_pretrained(tmp_path / "hf")
    assert summarize(tmp_path / "hf").num_classes is None
    with pytest.raises(BigTransferError, match="no head; pass num_classes"):
        create_model("R14x0.5", weights=tmp_path / "hf")
    ours = create_model("R14x0.5", weights=tmp_path / "hf", num_classes=4).eval()
    with torch.no_grad():
        assert relative_difference(ours.forward_features(x), want) <= TOLERANCE


def test_transformers_class_names_come_from_id2label(tmp_path):
    theirs = transformers_model(*TINY, num_classes=3)
    theirs.config.id2label = {0: "cat", 1: "dog", 2: "fish"}
    theirs.config.label2id = {"cat": 0, "dog": 1, "fish": 2}
    theirs.save_pretrained(tmp_path / "hf")
    assert read_metadata(tmp_path / "hf")["class_names"] == ["cat", "dog", "fish"]
    default = transformers_model(*TINY, num_classes=3)
    default.save_pretrained(tmp_path / "plain")
    assert "class_names" not in read_metadata(tmp_path / "plain")  # LABEL_0.. are placeholders, not names


def test_bare_transformers_file_is_read_with_the_default_bit_settings(tmp_path):
    theirs = transformers_model(*TINY, num_classes=5)
    theirs.save_pretrained(tmp_path / "hf")
    bare = tmp_path / "weights.safetensors"
    bare.write_bytes((tmp_path / "hf" / "model.safetensors").read_bytes())
    x = images()
    ours = create_model("R14x0.5", weights=bare).eval()
    assert relative_difference(_logits(ours, x), _logits(theirs, x)) <= TOLERANCE
    assert read_metadata(bare)["config"] is None


def test_transformers_folder_without_config_is_one_clear_error(tmp_path, capsys):
    transformers_model(*TINY, num_classes=5).save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "config.json").unlink()
    with pytest.raises(BigTransferError, match=r"hf: no config.json beside model.safetensors"):
        create_model("R14x0.5", weights=tmp_path / "hf")
    capsys.readouterr()
    assert main(["info", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("bigtransfer: error: ") and "config.json" in err and "\n" not in err


@pytest.mark.parametrize("setting, value", [("global_padding", "same"), ("embedding_dynamic_padding", True),
                                            ("hidden_act", "gelu")])
def test_transformers_settings_that_change_the_function_are_refused(tmp_path, setting, value):
    """Their model with these settings computes something else than BiT; no mapping can fix that."""
    theirs = transformers_model(*TINY, num_classes=5, **{setting: value})
    theirs.save_pretrained(tmp_path / "hf")
    with pytest.raises(BigTransferError, match=rf"config.json: {setting}=.* computes a different function"):
        summarize(tmp_path / "hf")
    # It really is another function: BiT's settings on the same tensors give other logits.
    bit = transformers_model(*TINY, num_classes=5)
    bit.load_state_dict(theirs.state_dict())
    x = images()
    assert relative_difference(_logits(bit, x), _logits(theirs, x)) > 1e-3


def test_transformers_valid_padding_is_refused(tmp_path):
    """global_padding='valid' leaves every conv unpadded (transformers' own BiT cannot even add its
    residuals then); refused from the config alone."""
    transformers_model(*TINY, num_classes=5, global_padding="valid").save_pretrained(tmp_path / "hf")
    with pytest.raises(BigTransferError, match=r"global_padding='valid' computes a different function"):
        summarize(tmp_path / "hf")


def test_transformers_bottleneck_layer_type_is_refused(tmp_path):
    transformers_model(*TINY, num_classes=5, layer_type="bottleneck").save_pretrained(tmp_path / "hf")
    with pytest.raises(BigTransferError, match="layer_type='bottleneck'"):
        summarize(tmp_path / "hf")


def test_config_that_disagrees_with_the_tensors_is_refused(tmp_path):
    transformers_model(*TINY, num_classes=5).save_pretrained(tmp_path / "hf")
    config_path = tmp_path / "hf" / "config.json"
    config = json.loads(config_path.read_text())
    config["depths"] = [1, 1, 2, 1]
    config_path.write_text(json.dumps(config))
    with pytest.raises(BigTransferError, match=r"depths \[1, 1, 2, 1\].* but the tensors are R14x0.5"):
        summarize(tmp_path / "hf")


def test_timm_file_of_another_architecture_than_model_is_one_line_exit_2(tmp_path, capsys):
    path = _save_timm(timm_model(*TINY, num_classes=5), tmp_path / "timm.safetensors")
    with pytest.raises(BigTransferError, match=r"this file is R14x0.5 \(5 classes\), you asked for R26x0.5"):
        create_model("R26x0.5", weights=path)
    code = main(["finetune", "--model", "R50x1", "--weights", str(path), "--data", "digits",
                 "--out", str(tmp_path / "run"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0
    assert "this file is R14x0.5 (5 classes), --model is R50x1" in err
    assert not (tmp_path / "run").exists()


def test_truncated_timm_file_is_one_line_exit_2(tmp_path, capsys):
    path = _save_timm(timm_model(*TINY, num_classes=5), tmp_path / "timm.safetensors")
    path.write_bytes(path.read_bytes()[:-5000])
    assert main(["info", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "timm.safetensors: truncated or corrupt .safetensors" in err and err.count("\n") == 0


def test_misshapen_missing_and_unexpected_tensors_are_named(tmp_path):
    state = {k: v.contiguous() for k, v in timm_model(*TINY, num_classes=5).state_dict().items()}
    bad = dict(state, **{"stages.1.blocks.0.conv2.weight": torch.zeros(64, 64, 1, 1)})
    save_file(bad, str(tmp_path / "shape.safetensors"))
    with pytest.raises(BigTransferError, match=r"tensor 'stages.1.blocks.0.conv2.weight' has shape \(64, 64, 1, 1\), "
                                               r"expected \(64, 64, 3, 3\)"):
        summarize(tmp_path / "shape.safetensors")
    save_file({k: v for k, v in state.items() if k != "stages.2.blocks.0.norm2.bias"},
              str(tmp_path / "missing.safetensors"))
    with pytest.raises(BigTransferError, match=r"missing tensor 'stages.2.blocks.0.norm2.bias'"):
        summarize(tmp_path / "missing.safetensors")
    save_file(dict(state, extra=torch.zeros(3)), str(tmp_path / "extra.safetensors"))
    with pytest.raises(BigTransferError, match=r"unexpected tensor 'extra'"):
        summarize(tmp_path / "extra.safetensors")
    save_file(dict(state, **{"norm.bias": torch.zeros(1024, dtype=torch.int32)}), str(tmp_path / "int.safetensors"))
    with pytest.raises(BigTransferError, match=r"'norm.bias' holds I32"):
        summarize(tmp_path / "int.safetensors")


@pytest.mark.parametrize("variant, message", [("batchnorm", "with BatchNorm, not BiT"),
                                              ("deep stem", "deep \\(3-conv\\) stem, not BiT's 7x7 root")])
def test_timms_other_resnetv2s_are_not_taken_for_bit(tmp_path, variant, message):
    pytest.importorskip("timm")
    from timm.layers import BatchNormAct2d, create_conv2d
    from timm.models.resnetv2 import ResNetV2

    if variant == "batchnorm":
        model = ResNetV2(layers=[1, 1, 1, 1], conv_layer=create_conv2d, norm_layer=BatchNormAct2d, num_classes=4)
    else:
        model = ResNetV2(layers=[1, 1, 1, 1], stem_type="deep", num_classes=4)
    path = _save_timm(model, tmp_path / "other.safetensors")
    with pytest.raises(BigTransferError, match=message):
        summarize(path)


def test_sharded_transformers_checkpoints_are_refused_with_the_fix(tmp_path):
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "bit"}))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {}}))
    with pytest.raises(BigTransferError, match=r"a sharded checkpoint .*save it as one file"):
        create_model("R50x1", weights=folder)


def test_half_precision_timm_file_loads_as_float32(tmp_path):
    theirs = timm_model(*TINY, num_classes=5)
    save_file({k: v.half().contiguous() for k, v in theirs.state_dict().items()}, str(tmp_path / "h.safetensors"))
    ours = create_model("R14x0.5", weights=tmp_path / "h.safetensors")
    assert all(p.dtype == torch.float32 for p in ours.parameters())


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pth"])
def test_pickled_library_files_are_refused_with_a_way_to_convert(tmp_path, name):
    folder = tmp_path / "hf"
    folder.mkdir()
    marker = tmp_path / "ran"

    class Exploit:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"x": Exploit()}, folder / name)
    for target in (folder, folder / name):
        with pytest.raises(BigTransferError, match=r"pickle-based PyTorch file.*save_file.*save_pretrained"):
            create_model("R14x0.5", weights=target)
    assert not marker.exists()


def test_model_flag_takes_a_transformers_folder(tmp_path, capsys):
    from PIL import Image

    theirs = transformers_model(*TINY, num_classes=2)
    theirs.config.id2label, theirs.config.label2id = {0: "red", 1: "blue"}, {"red": 0, "blue": 1}
    theirs.save_pretrained(tmp_path / "hf")
    Image.new("RGB", (40, 40), (200, 10, 10)).save(tmp_path / "a.png")
    assert main(["predict", "--model", str(tmp_path / "hf"), str(tmp_path / "a.png"), "--json",
                 "--resolution", "32"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {p["label"] for p in out["predictions"][0]["predictions"]} == {"red", "blue"}
    assert main(["info", str(tmp_path / "hf")]) == 0
    assert json.loads(capsys.readouterr().out)["format"] == "transformers"


def test_transformers_config_builder_matches_the_library(tmp_path):
    """Our config.json for a model is one transformers itself accepts and sizes as we do."""
    from bigtransfer.models.foreign_config import transformers_config as ours
    from bigtransfer.models.resnetv2 import parse_arch

    transformers = pytest.importorskip("transformers")
    arch = parse_arch("R101x3")
    config = transformers.BitConfig(**ours(arch, 7, None))
    reference = transformers_config(arch.units, 3, 7)
    with torch.device("meta"):
        a, b = (transformers.BitForImageClassification(c).state_dict() for c in (config, reference))
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}


@pytest.mark.parametrize("library", ["timm", "transformers"])
def test_the_mapping_is_exact_in_float64(tmp_path, library):
    """In fp64 the two models agree to rounding (~1e-13): what fp32 shows (~1e-5) is fp32's own rounding."""
    theirs = timm_model(*TINY, num_classes=5) if library == "timm" else transformers_model(*TINY, num_classes=5)
    if library == "timm":
        path = _save_timm(theirs, tmp_path / "timm.safetensors")
    else:
        theirs.save_pretrained(tmp_path / "hf")
        path = tmp_path / "hf"
    ours = create_model("R14x0.5", weights=path).eval().double()
    x = images().double()
    assert relative_difference(_logits(ours, x), _logits(theirs.double(), x)) < 1e-10
