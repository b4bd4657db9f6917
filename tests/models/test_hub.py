"""The Hugging Face hub as a source, through huggingface_hub's own client and a loopback hub."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from library_models import images, relative_difference, timm_model
from loopback_bucket import released_npz
from loopback_hub import online
from safetensors.torch import save

from bigtransfer import BigTransferError, create_model
from bigtransfer.cli import main
from bigtransfer.models import hub as hub_source
from bigtransfer.models import zoo

pytest.importorskip("huggingface_hub", reason="huggingface_hub is not installed (pip install 'bigtransfer[hub]')")

DISTILLED = "distill/R50x1_224"  # timm/resnetv2_50x1_bit.goog_distilled_in1k: R50x1, 1000 classes
REPO = "timm/resnetv2_50x1_bit.goog_distilled_in1k"


@pytest.fixture(scope="module")
def distilled_bytes():
    """What the hub would serve for the distilled R50x1: a timm state dict (random weights)."""
    model = timm_model((3, 4, 6, 3), 1, num_classes=1000)
    x = images(32)
    with torch.no_grad():
        logits = model(x)
    return save({k: v.contiguous() for k, v in model.state_dict().items()}), x, logits


def test_table_names_only_repositories_timm_registers():
    timm = pytest.importorskip("timm")
    registered = set(timm.list_pretrained("resnetv2_*_bit*"))
    for name, copy in hub_source.HUB_COPIES.items():
        assert copy.repo_id.removeprefix("timm/") in registered, name
        entry = zoo.lookup(name)
        cfg = timm.models.get_pretrained_cfg(copy.repo_id.removeprefix("timm/"))
        assert cfg.hf_hub_id == copy.repo_id and cfg.num_classes == entry.num_classes, name  # timm's own registry
        assert copy.repo_id.split("/")[1].startswith(f"resnetv2_{entry.arch_name[1:]}_bit."), name
    assert hub_source.hub_copy("BiT-S-R50x1") is None  # the hub has no BiT-S


def test_download_from_the_hub_records_sha256_and_is_used(hub, distilled_bytes, capsys):
    data, x, logits = distilled_bytes
    hub.repos[REPO] = {"model.safetensors": data}
    assert main(["download", DISTILLED, "--source", "hub", "--quiet"]) == 0
    out = capsys.readouterr().out
    digest = hashlib.sha256(data).hexdigest()
    assert f"sha256 {digest}" in out and "from the hub" in out
    record = json.loads(hub_source.record_path(DISTILLED).read_text())
    assert record["sha256"] == digest and record["repo_id"] == REPO
    path = Path(record["path"])
    assert str(path).startswith(os.environ["HF_HOME"]) and path.read_bytes() == data  # huggingface_hub's cache
    assert any(r[:2] == ("HEAD", f"{REPO}/resolve/main/model.safetensors") for r in hub.requests)
    model = create_model(DISTILLED).eval()  # the released name now finds the hub file
    with torch.no_grad():
        assert relative_difference(model(x), logits) <= 1e-4
    assert main(["download", DISTILLED, "--source", "hub"]) == 0
    again = capsys.readouterr().out
    assert "already present" in again and "SHA-256 verified" in again


def test_models_lists_which_source_has_each_model(hub, distilled_bytes, capsys):
    hub.repos[REPO] = {"model.safetensors": distilled_bytes[0]}
    assert main(["models", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)["models"]}
    assert rows["BiT-S-R50x1"]["sources"] == ["bucket"] and rows["BiT-S-R50x1"]["hub_repo"] is None
    assert rows["BiT-M-R152x4"]["sources"] == ["bucket", "hub"]
    assert rows["BiT-M-R152x4"]["hub_repo"] == "timm/resnetv2_152x4_bit.goog_in21k"
    assert rows[DISTILLED]["cached"] is False and rows[DISTILLED]["cached_from"] is None
    assert main(["download", DISTILLED, "--source", "hub", "--quiet"]) == 0
    capsys.readouterr()
    assert main(["models", "--json"]) == 0
    row = next(r for r in json.loads(capsys.readouterr().out)["models"] if r["name"] == DISTILLED)
    assert row["cached"] is True and row["cached_from"] == "hub"
    assert main(["models"]) == 0
    line = next(r for r in capsys.readouterr().out.splitlines() if r.startswith(DISTILLED))
    assert line.split()[4:6] == ["hub", "bucket+hub"]


def test_auto_tries_the_bucket_first_then_the_hub(hub, bucket, distilled_bytes, capsys):
    hub.repos[REPO] = {"model.safetensors": distilled_bytes[0]}
    assert main(["download", DISTILLED, "--source", "auto", "--quiet"]) == 0  # the bucket has nothing: 404
    out = capsys.readouterr().out
    assert "authors' bucket: could not download" in out and "from the hub" in out
    assert bucket.requests and bucket.requests[0]["path"] == "/bit_models/distill/R50x1_224.npz"
    bucket.files["BiT-S-R50x1.npz"] = released_npz(50, 1, 1000)
    assert main(["download", "BiT-S-R50x1", "--source", "auto", "--quiet"]) == 0
    assert zoo.cached_path(zoo.lookup("BiT-S-R50x1")).read_bytes() == released_npz(50, 1, 1000)


def test_a_hub_file_that_is_not_the_released_model_is_refused(hub, capsys):
    small = timm_model((1, 1, 1, 1), 0.5, num_classes=1000)
    hub.repos[REPO] = {"model.safetensors": save({k: v.contiguous() for k, v in small.state_dict().items()})}
    assert main(["download", DISTILLED, "--source", "hub", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "the hub file is R14x0.5 (1000 classes), but distill/R50x1_224 is R50x1" in err
    assert hub_source.cached_file(DISTILLED) is None


def test_a_file_whose_content_differs_from_the_hubs_etag_is_refused(hub, distilled_bytes, capsys):
    hub.repos[REPO] = {"model.safetensors": distilled_bytes[0]}
    hub.etags[(REPO, "model.safetensors")] = "f" * 64
    assert main(["download", DISTILLED, "--source", "hub", "--quiet"]) == 2
    assert "differs from the hub's ffff" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["download", "BiT-Q-R50x1", "--source", "hub"], "unknown model 'BiT-Q-R50x1'"),
    (["download", "BiT-S-R50x1", "--source", "hub"], "BiT-S-R50x1 has no copy on the Hugging Face hub"),
    (["download", "BiT-M-R50x1", "--source", "hub"], "the hub has no such repository"),
])
def test_bad_hub_names_are_one_line_exit_2(hub, capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and err.count("\n") == 0 and err.startswith("bigtransfer: error: ")


def test_offline_mode_uses_the_cache_and_never_the_network(hub, distilled_bytes, monkeypatch, capsys):
    hub.repos[REPO] = {"model.safetensors": distilled_bytes[0]}
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    online(monkeypatch, False)
    assert main(["download", DISTILLED, "--source", "hub", "--quiet"]) == 2
    assert "HF_HUB_OFFLINE is set" in capsys.readouterr().err and hub.requests == []
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    online(monkeypatch, True)
    assert main(["download", DISTILLED, "--source", "hub", "--quiet"]) == 0
    hub_source.record_path(DISTILLED).unlink()  # forget our record: the hub cache still has the file
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    online(monkeypatch, False)
    hub.requests.clear()
    assert main(["download", DISTILLED, "--source", "hub", "--quiet"]) == 0
    assert hub.requests == [] and hub_source.cached_file(DISTILLED) is not None


def test_unreachable_hub_is_a_clear_error(monkeypatch, tmp_path, capsys):
    """huggingface_hub retries a refused connection five times with back-off (its policy, kept);
    the sleeps are skipped here. Then one line says what failed."""
    import huggingface_hub.utils._http as hf_http

    monkeypatch.setattr(hf_http.time, "sleep", lambda seconds: None)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: connection refused
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    online(monkeypatch, True)
    assert main(["download", DISTILLED, "--source", "hub", "--quiet"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("bigtransfer: error: could not reach http://127.0.0.1:9/")


def test_the_command_line_follows_the_hub_environment_in_a_fresh_process(hub, distilled_bytes, tmp_path):
    """What a user runs: HF_ENDPOINT and HF_HOME set in the shell, read by huggingface_hub at import."""
    hub.repos[REPO] = {"model.safetensors": distilled_bytes[0]}
    env = {**os.environ, "HF_HOME": str(tmp_path / "elsewhere"), "HF_HUB_OFFLINE": "0",
           "PYTHONPATH": os.pathsep.join(sys.path)}
    result = subprocess.run([sys.executable, "-m", "bigtransfer", "download", DISTILLED, "--source", "hub",
                             "--quiet"], env=env, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    assert list((tmp_path / "elsewhere" / "hub").glob("models--timm--*/snapshots/*/model.safetensors"))


def test_released_name_missing_from_every_cache_names_both_sources():
    with pytest.raises(BigTransferError, match=r"the Hugging Face hub has it too \(timm/resnetv2_50x1_bit.goog_in21k"):
        create_model("BiT-M-R50x1")
    with pytest.raises(BigTransferError) as err:
        create_model("BiT-S-R50x1")
    assert "hub" not in str(err.value)
