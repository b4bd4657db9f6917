"""bigtransfer push: a finished run as a hub repository folder, and its upload to a loopback hub."""

import json

import numpy as np
import pytest
import torch
from bit_files import UNITS, authors_arrays
from image_data import write_colour_folder
from library_models import images, key_complaints, load_messages, relative_difference

from bigtransfer import create_model
from bigtransfer.cli import main
from bigtransfer.models import zoo
from bigtransfer.models.checkpoint import read_metadata
from bigtransfer.recipes import hyperrule

transformers = pytest.importorskip("transformers", reason="transformers is not installed")
timm = pytest.importorskip("timm", reason="timm is not installed")

REPO = "alice/bit-colours"
CLASSES = ["blue", "green", "red"]
TOP_LEVEL = ["README.md", "config.json", "model.safetensors", "preprocessor_config.json",
             "timm/config.json", "timm/model.safetensors"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A real fine-tuning run from BiT-M-R50x1-ILSVRC2012 (random weights in the authors' layout as
    the cached file) on three colour classes: two steps at 32 px, then the validation images scored."""
    root = tmp_path_factory.mktemp("push")
    data = write_colour_folder(root / "colours", per_class_train=4, per_class_val=2)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BIGTRANSFER_HOME", str(root / "cache"))
        path = zoo.cached_path(zoo.lookup("BiT-M-R50x1-ILSVRC2012"))
        path.parent.mkdir(parents=True)
        np.savez(path, **authors_arrays(UNITS[50], 1, num_classes=1000, seed=3))
        out = root / "run"
        assert main(["finetune", "--data", str(data), "--model", "BiT-M-R50x1-ILSVRC2012", "--steps", "2",
                     "--batch", "6", "--resolution", "32/32", "--no-crop", "--workers", "0", "--quiet",
                     "--out", str(out)]) == 0
        path.unlink()
    return out


def _files(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and
                  not p.name.startswith(".bigtransfer"))


def test_to_folder_writes_a_repository_every_library_loads_without_uploading(run, tmp_path, hub, capsys):
    folder = tmp_path / "repo"
    assert main(["push", str(run), REPO, "--to-folder", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "transformers: loaded by transformers" in out and "timm: loaded by timm" in out and "not uploaded" in out
    assert _files(folder) == TOP_LEVEL and hub.requests == []
    ours = create_model("R50x1", weights=run / "final.safetensors").eval()
    x = images(32)
    with torch.no_grad():
        want = ours(x)
    # push itself loaded both with the documented recipes (the lines above); timm's own hub folder way:
    with load_messages() as messages:
        local = timm.create_model(f"local-dir:{folder / 'timm'}", pretrained=True).eval()
    assert key_complaints(messages) == [] and local.pretrained_cfg["label_names"] == CLASSES
    with torch.no_grad():
        assert relative_difference(local(x), want) <= 1e-4
    assert read_metadata(folder)["class_names"] == CLASSES
    assert json.loads((folder / "config.json").read_text())["id2label"] == dict(zip("012", CLASSES))


def test_model_card_says_what_the_run_did(run, tmp_path):
    folder = tmp_path / "repo"
    assert main(["push", str(run), REPO, "--to-folder", str(folder), "--no-check"]) == 0
    card = (folder / "README.md").read_text()
    config = json.loads((run / "config.json").read_text())
    summary = json.loads((run / "summary.json").read_text())
    assert card.startswith("---\nlibrary_name: transformers\n")
    assert "base_model: timm/resnetv2_50x1_bit.goog_in21k_ft_in1k" in card
    assert hyperrule.describe(hyperrule.Plan.from_dict(config["plan"])) in card
    assert f"| top1 | {summary['final']['top1']:.2%} |" in card
    assert "`BiT-M-R50x1-ILSVRC2012`: BiT-M fine-tuned on ILSVRC-2012" in card
    assert "3 classes, in the head's order: `blue`, `green`, `red`" in card
    assert f"from_pretrained({REPO!r})" in card and f"hf_hub_download({REPO!r}, 'timm/model.safetensors')" in card
    assert "num_classes=3" in card and "times 10" in card


def test_dry_run_writes_the_folder_named_after_the_repository(run, tmp_path, hub, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["push", str(run), REPO, "--dry-run", "--no-check"]) == 0
    assert _files(tmp_path / "bit-colours") == TOP_LEVEL and hub.requests == []
    assert main(["push", str(run), REPO, "--dry-run", "--no-check"]) == 2
    assert "earlier push; pass --overwrite" in capsys.readouterr().err
    assert main(["push", str(run), REPO, "--dry-run", "--no-check", "--overwrite"]) == 0


def test_push_uploads_through_huggingface_hub(run, hub, capsys):
    assert main(["push", str(run), REPO, "--private", "--no-check", "--message", "first"]) == 0
    out = capsys.readouterr().out
    assert f"uploaded 6 files to {REPO}" in out and "/commit/" in out
    assert sorted(hub.repos[REPO]) == TOP_LEVEL  # our marker and lock stay behind
    assert hub.created[0]["name"] == "bit-colours" and hub.created[0]["organization"] == "alice"
    assert hub.created[0].get("visibility") == "private" or hub.created[0].get("private") is True
    assert hub.commits[0]["summary"] == "first"
    card = hub.repos[REPO]["README.md"].decode()
    assert "## Fine-tuning: the BiT-HyperRule plan used" in card


def test_upload_without_credentials_is_one_line_with_the_fix(run, hub, monkeypatch, capsys):
    monkeypatch.delenv("HF_TOKEN")
    assert main(["push", str(run), REPO, "--no-check"]) == 2
    err = capsys.readouterr().err.strip()
    assert "HTTP 401" in err and "hf auth login" in err and err.count("\n") == 0


@pytest.mark.parametrize("argv, message", [
    (["REPO-ONLY"], "REPO 'REPO-ONLY': expected OWNER/NAME"),
    (["a/b/c"], "expected OWNER/NAME"),
])
def test_bad_repository_names(run, capsys, argv, message):
    assert main(["push", str(run), *argv, "--dry-run"]) == 2
    assert message in capsys.readouterr().err


def test_unfinished_runs_and_foreign_folders_are_refused(run, tmp_path, capsys):
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.json").write_text((run / "config.json").read_text())
    assert main(["push", str(unfinished), REPO, "--dry-run"]) == 2
    assert "no final.safetensors; push needs a finished run" in capsys.readouterr().err
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    assert main(["push", str(run), REPO, "--to-folder", str(mine), "--no-check"]) == 2
    assert "did not write" in capsys.readouterr().err and [p.name for p in mine.iterdir()] == ["notes.txt"]


def test_card_for_an_architecture_timm_does_not_register(run):
    from bigtransfer.models.resnetv2 import parse_arch
    from bigtransfer.sharing.modelcard import CardFacts, render

    config = json.loads((run / "config.json").read_text())
    summary = json.loads((run / "summary.json").read_text())
    card = render(CardFacts(REPO, parse_arch("R14x0.5"), CLASSES, 32, config, summary,
                            "finetune", None, 1e-8))
    assert "R14x0.5 is not one, so there is no timm copy here" in card and "timm.create_model" not in card
    assert "already uses timm's and transformers' weight-standardisation epsilon" in card


def test_help_builds_without_importing_the_libraries():
    """`bigtransfer --help` stays instant: no torch, timm, transformers or huggingface_hub at parse time."""
    import subprocess
    import sys

    code = ("import sys; from bigtransfer.cli import build_parser; "
            "build_parser().parse_args(['push', 'RUN', 'a/b', '--dry-run']); "
            "print(sorted(m for m in ('torch', 'timm', 'transformers', 'huggingface_hub') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert result.stdout.strip() == "[]"
