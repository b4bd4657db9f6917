"""Writing timm and transformers BiT checkpoints, loaded back by those libraries' own code."""

import json

import numpy as np
import pytest
import torch
from library_models import (
    RELEASED,
    images,
    key_complaints,
    load_messages,
    relative_difference,
    timm_model,
    transformers_model,
)
from safetensors.torch import save_file

from bigtransfer import create_model, save_checkpoint
from bigtransfer.cli import main
from bigtransfer.models.checkpoint import read_metadata
from bigtransfer.sharing.export import export

timm = pytest.importorskip("timm", reason="timm is not installed (pip install 'bigtransfer[interop]')")
transformers = pytest.importorskip("transformers", reason="transformers is not installed")

TINY = "R14x0.5"
TOLERANCE = 1e-4
CLASSES = ["apple", "banana", "cherry"]


def _ours(tmp_path, arch=TINY, classes=CLASSES, seed=0):
    """One of our checkpoints with a non-zero head, class names and a resolution."""
    torch.manual_seed(seed)
    model = create_model(arch, num_classes=len(classes), zero_head=False)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return save_checkpoint(model, tmp_path / "ours.safetensors", class_names=classes, resolution=96), model.eval()


def _logits(model, x):
    with torch.no_grad():
        out = model(x)
    return getattr(out, "logits", out)


def _timm_loads(path, arch, classes):
    """The documented recipe: timm's registered name, the file and the class count in the overlay."""
    with load_messages() as messages:
        model = timm.create_model(f"resnetv2_{arch[1:]}_bit", pretrained=True, num_classes=classes,
                                  pretrained_cfg_overlay={"file": str(path), "num_classes": classes})
    assert key_complaints(messages) == [], messages
    return model.eval()


def _transformers_loads(folder):
    with load_messages() as messages:
        model, info = transformers.BitForImageClassification.from_pretrained(str(folder), output_loading_info=True)
    assert all(not v for v in info.values()), info
    assert key_complaints(messages) == [], messages
    return model.eval()


def test_timm_export_of_a_small_model_loads_into_timms_resnetv2(tmp_path):
    from functools import partial

    from safetensors.torch import load_file
    from timm.layers import StdConv2d
    from timm.models.resnetv2 import ResNetV2

    path, ours = _ours(tmp_path)
    report = export(str(path), tmp_path / "timm.safetensors", "timm")
    assert report["check"].startswith("loaded by timm") and report["max_relative_diff"] <= TOLERANCE
    theirs = ResNetV2(layers=[1, 1, 1, 1], width_factor=0.5, stem_type="fixed", num_classes=3,
                      conv_layer=partial(StdConv2d, eps=1e-8))
    missing, unexpected = theirs.load_state_dict(load_file(str(tmp_path / "timm.safetensors")), strict=False)
    assert missing == [] and unexpected == []
    x = images()
    assert relative_difference(_logits(theirs.eval(), x), _logits(ours, x)) <= TOLERANCE


def test_timm_export_keeps_class_names_and_resolution_for_bigtransfer(tmp_path):
    path, _ = _ours(tmp_path)
    export(str(path), tmp_path / "timm.safetensors", "timm", check=False)
    meta = read_metadata(tmp_path / "timm.safetensors")
    assert (meta["format"], meta["class_names"], meta["resolution"]) == ("timm", CLASSES, 96)


def test_released_architecture_exports_load_with_the_documented_recipes(tmp_path):
    path, ours = _ours(tmp_path, arch="R50x1", classes=[f"c{i}" for i in range(10)])
    x = images(32)
    want = _logits(ours, x)
    del ours
    export(str(path), tmp_path / "timm.safetensors", "timm", check=False)
    theirs = _timm_loads(tmp_path / "timm.safetensors", "R50x1", 10)
    assert relative_difference(_logits(theirs, x), want) <= TOLERANCE
    del theirs
    export(str(path), tmp_path / "hf", "transformers", check=False)
    theirs = _transformers_loads(tmp_path / "hf")
    assert theirs.config.id2label == {i: f"c{i}" for i in range(10)}
    assert relative_difference(_logits(theirs, x), want) <= TOLERANCE


def test_timm_without_the_class_count_in_the_overlay_drops_the_head(tmp_path):
    """Why the documented recipe repeats num_classes: timm compares it with its registry's (1000)."""
    path, _ = _ours(tmp_path, arch="R50x1", classes=[f"c{i}" for i in range(10)])
    export(str(path), tmp_path / "timm.safetensors", "timm", check=False)
    with load_messages() as messages:
        timm.create_model("resnetv2_50x1_bit", pretrained=True, num_classes=10,
                          pretrained_cfg_overlay={"file": str(tmp_path / "timm.safetensors")})
    assert any("head.fc.weight" in m for m in key_complaints(messages))


def test_transformers_export_loads_with_labels_and_its_preprocessor(tmp_path):
    from PIL import Image

    from bigtransfer.data.transforms import eval_transform

    path, ours = _ours(tmp_path)
    report = export(str(path), tmp_path / "hf", "transformers")
    assert report["check"].startswith("loaded by transformers") and report["max_relative_diff"] <= TOLERANCE
    theirs = _transformers_loads(tmp_path / "hf")
    assert theirs.config.id2label == dict(enumerate(CLASSES))
    assert theirs.config.label2id == {n: i for i, n in enumerate(CLASSES)}
    x = images()
    assert relative_difference(_logits(theirs, x), _logits(ours, x)) <= TOLERANCE
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (150, 200, 3), dtype=np.uint8))
    processor = transformers.AutoImageProcessor.from_pretrained(str(tmp_path / "hf"))
    pixels = processor(image, return_tensors="pt").pixel_values
    ours_pixels = eval_transform(96)(image)[None]
    assert pixels.shape == ours_pixels.shape == (1, 3, 96, 96)
    assert float((pixels - ours_pixels).abs().mean()) < 0.02  # PIL's vs torchvision's bilinear resize
    assert read_metadata(tmp_path / "hf")["class_names"] == CLASSES


def test_round_trips_through_both_libraries_keep_their_logits(tmp_path):
    """timm -> bigtransfer -> transformers -> bigtransfer -> timm: every hop gives timm's logits."""
    theirs = timm_model(*RELEASED["R50x1"], num_classes=5)
    x = images(32)
    want = _logits(theirs, x)
    save_file({k: v.contiguous() for k, v in theirs.state_dict().items()}, str(tmp_path / "a.safetensors"))
    del theirs
    export(str(tmp_path / "a.safetensors"), tmp_path / "hf", "transformers", check=False)
    hf = _transformers_loads(tmp_path / "hf")
    assert relative_difference(_logits(hf, x), want) <= TOLERANCE
    del hf
    export(str(tmp_path / "hf"), tmp_path / "b.safetensors", "timm", check=False)
    back = _timm_loads(tmp_path / "b.safetensors", "R50x1", 5)
    assert relative_difference(_logits(back, x), want) <= TOLERANCE
    ours = create_model("R50x1", weights=tmp_path / "b.safetensors").eval()
    assert relative_difference(_logits(ours, x), want) <= TOLERANCE


def test_transformers_to_bigtransfer_and_back_keeps_logits_and_labels(tmp_path):
    """A transformers classifier -> bigtransfer .safetensors -> transformers again, labels included."""
    theirs = transformers_model((1, 1, 1, 1), 0.5, num_classes=3)
    theirs.config.id2label, theirs.config.label2id = dict(enumerate(CLASSES)), {n: i for i, n in enumerate(CLASSES)}
    theirs.save_pretrained(tmp_path / "hf")
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "ours.safetensors")]) == 0
    assert read_metadata(tmp_path / "ours.safetensors")["class_names"] == CLASSES
    export(str(tmp_path / "ours.safetensors"), tmp_path / "hf2", "transformers", check=False)
    again = _transformers_loads(tmp_path / "hf2")
    x = images()
    assert relative_difference(_logits(again, x), _logits(theirs, x)) <= TOLERANCE
    assert again.config.id2label == dict(enumerate(CLASSES))


def test_exports_never_replace_what_they_did_not_write(tmp_path, capsys):
    path, _ = _ours(tmp_path)
    target = tmp_path / "mine.safetensors"
    target.write_bytes(b"precious")
    args = ["export", "--model", str(path), "--no-check"]
    assert main([*args, "--format", "timm", "--out", str(target)]) == 2
    assert "pass --overwrite" in capsys.readouterr().err and target.read_bytes() == b"precious"
    assert main([*args, "--format", "timm", "--out", str(target), "--overwrite"]) == 0
    assert read_metadata(target)["format"] == "timm"
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    assert main([*args, "--format", "transformers", "--out", str(folder)]) == 2
    assert "did not write" in capsys.readouterr().err and sorted(p.name for p in folder.iterdir()) == ["notes.txt"]
    assert main([*args, "--format", "transformers", "--out", str(tmp_path / "hf")]) == 0
    assert "wrote" in capsys.readouterr().out
    assert main([*args, "--format", "transformers", "--out", str(tmp_path / "hf")]) == 2
    assert "earlier export; pass --overwrite" in capsys.readouterr().err
    assert main([*args, "--format", "transformers", "--out", str(tmp_path / "hf"), "--overwrite"]) == 0
    assert {p.name for p in (tmp_path / "hf").iterdir()} >= {"config.json", "model.safetensors",
                                                              "preprocessor_config.json"}


def test_export_line_reports_the_check(tmp_path, capsys):
    path, _ = _ours(tmp_path)
    assert main(["export", "--model", str(path), "--format", "transformers", "--out", str(tmp_path / "hf")]) == 0
    line = capsys.readouterr().out.strip()
    assert "loaded by transformers: no missing or unexpected keys" in line and "relative logit difference" in line
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["model_type"] == "bit" and config["global_padding"] is None and config["width_factor"] == 1


def test_export_without_the_library_installed_says_it_was_not_checked(tmp_path, monkeypatch):
    import sys

    path, _ = _ours(tmp_path)
    monkeypatch.setitem(sys.modules, "timm", None)  # `import timm` now fails as if it were absent
    report = export(str(path), tmp_path / "timm.safetensors", "timm")
    assert report["check"] == "not checked: timm is not installed (pip install 'bigtransfer[interop]')"
    assert read_metadata(tmp_path / "timm.safetensors")["format"] == "timm"


def test_kernels_are_scaled_so_the_libraries_eps_computes_ours():
    """Standardising c*w with eps' equals standardising w with eps when c = sqrt(eps'/eps); without
    the scaling, a kernel of small variance comes out visibly different."""
    from bigtransfer.models.interop import eps_matched
    from bigtransfer.models.resnetv2 import standardize_weight

    w = torch.randn(8, 4, 3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 1e-4
    scaled = eps_matched({"k": w, "bias": w}, {"k"}, 1e-10, 1e-8)
    assert torch.equal(scaled["bias"], w) and torch.allclose(scaled["k"], 10 * w)
    ours = standardize_weight(w, 1e-10)
    assert float((standardize_weight(scaled["k"], 1e-8) - ours).abs().max()) < 1e-12
    assert float((standardize_weight(w, 1e-8) - ours).abs().max()) > 0.1


def test_exports_are_exact_in_float64(tmp_path):
    """Our eps-1e-10 model and the library's eps-1e-8 model of the export agree in fp64 up to the
    rounding of the scaled kernels stored in fp32 (each weight x10, rounded once more: ~1e-7)."""
    path, ours = _ours(tmp_path)
    export(str(path), tmp_path / "hf", "transformers", check=False)
    theirs = _transformers_loads(tmp_path / "hf").double()
    x = images().double()
    assert relative_difference(_logits(theirs, x), _logits(ours.double(), x)) < 1e-6
