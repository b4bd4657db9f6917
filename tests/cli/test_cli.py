"""The `bigtransfer` command line: exit codes, one-line errors, and the model verbs."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from bit_files import authors_arrays
from loopback_bucket import released_npz

from bigtransfer.cli import main
from bigtransfer.models import zoo


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_models_table_and_json(capsys):
    code, out, _ = run(capsys, "models")
    assert code == 0
    assert "BiT-M-R50x1 " in out and "68.3M" in out and "21843" in out
    assert "BiT-M-R50x1-run0-dtd" not in out and "285 VTAB-1k" in out
    code, out, _ = run(capsys, "models", "--all", "--json")
    data = json.loads(out)
    by_name = {m["name"]: m for m in data["models"]}
    assert len(by_name) == 307
    assert round(by_name["BiT-S-R152x4"]["parameters"] / 1e6, 1) == 936.5
    assert by_name["BiT-M-R50x1-run0-dtd"]["head"] == 47 and by_name["BiT-M-R50x1"]["cached"] is False


def test_download_then_models_shows_cached(capsys, bucket):
    bucket.files["BiT-S-R50x1.npz"] = released_npz(50, 1, 1000)
    code, out, _ = run(capsys, "download", "--quiet", "BiT-S-R50x1")
    assert code == 0 and "sha256" in out
    code, out, _ = run(capsys, "download", "BiT-S-R50x1")
    assert code == 0 and "SHA-256 verified" in out
    _, out, _ = run(capsys, "models", "--json")
    assert {m["name"]: m for m in json.loads(out)["models"]}["BiT-S-R50x1"]["cached"] is True


def test_download_detects_a_changed_cached_file(capsys, bucket):
    bucket.files["BiT-S-R50x1.npz"] = released_npz(50, 1, 1000)
    run(capsys, "download", "--quiet", "BiT-S-R50x1")
    zoo.cached_path(zoo.lookup("BiT-S-R50x1")).write_bytes(b"y" * 1000)
    code, _, err = run(capsys, "download", "BiT-S-R50x1")
    assert code == 2 and "SHA-256 differs" in err and "--force" in err


def test_unknown_model_is_exit_2_one_line(capsys):
    code, _, err = run(capsys, "download", "BiT-X-R50x1")
    assert code == 2
    assert err.strip().count("\n") == 0 and "unknown model 'BiT-X-R50x1'" in err


def test_convert_and_info(tmp_path, capsys):
    src = tmp_path / "tiny.npz"
    np.savez(src, **authors_arrays((1, 1, 1, 1), 0.5, num_classes=3))
    dest = tmp_path / "tiny.safetensors"
    code, out, _ = run(capsys, "convert", str(src), str(dest))
    assert code == 0 and dest.is_file()
    code, out, _ = run(capsys, "info", str(dest))
    meta = json.loads(out)
    assert meta["architecture"] == "R14x0.5" and meta["num_classes"] == 3
    assert meta["provenance"]["source"] == "tiny.npz" and len(meta["provenance"]["sha256"]) == 64


def test_info_on_a_pickle_is_refused(tmp_path, capsys):
    bad = tmp_path / "model.pt"
    bad.write_bytes(b"\x80\x04K\x01.")
    code, _, err = run(capsys, "info", str(bad))
    assert code == 2 and "never unpickles" in err


def test_help_lists_verbs_with_examples(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["download", "--help"])
    assert exc.value.code == 0
    assert "examples:" in capsys.readouterr().out


def test_console_script_bad_input_has_no_traceback(tmp_path):
    env = {**os.environ, "BIGTRANSFER_HOME": str(tmp_path)}
    result = subprocess.run([sys.executable, "-m", "bigtransfer.cli", "info", str(tmp_path / "missing.npz")],
                            capture_output=True, text=True, env=env, check=False)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("bigtransfer: error:") and "missing.npz" in result.stderr
