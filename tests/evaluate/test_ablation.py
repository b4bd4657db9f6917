"""The normalisation ablation: four upstream models, their transfer, the 2x2 tables and report."""

import json

import pytest

from bigtransfer import BigTransferError
from bigtransfer.evaluate.ablation import AblationOptions, run_ablation
from bigtransfer.models import checkpoint
from bigtransfer.report.protocols import rebuild


def tiny(out, **kw):
    return AblationOptions(
        out=out, upstream="glyphs:classes=4,per_class=12,test_per_class=4,size=16", arch="R[1,1,1,1]x0.5",
        upstream_resolution=16, upstream_batch=16, upstream_epochs=1, shots=(1, 2), repeats=1,
        finetune_batch=10, finetune_steps=3, finetune_resolution=(20, 16), workers=0, precision="fp32",
        progress=False, **kw)


def test_ablation_trains_each_normalisation_and_builds_both_tables(tmp_path):
    out = tmp_path / "abl"
    results = run_ablation(tiny(out))
    assert set(results["upstream_top1"]) == {"bn", "bn_ws", "gn", "gn_ws"}
    assert all(0 <= v <= 1 for v in results["upstream_top1"].values())
    for norm in ("bn", "bn_ws", "gn", "gn_ws"):  # each model really has its normalisation
        assert checkpoint.summarize(out / "upstream" / norm / "final.safetensors").norm == norm
        sweep = json.loads((out / "transfer" / "digits" / norm / "protocol.json").read_text())
        assert sweep["finetune"]["model"] == str(out / "upstream" / norm)
    assert set(results["transfer_top1"]["digits"]["gn_ws"]) == {"1", "2"}
    low, high = results["transfer_range"]["digits"]["bn"]["2"]
    assert low <= results["transfer_top1"]["digits"]["bn"]["2"] <= high
    html = (out / "report.html").read_text()
    assert "Table 4" in html and "Table 5" in html and "+ Weight Standardization" in html
    assert html.count('src="data:image/png;base64,') == 1
    rows = (out / "results.csv").read_text().splitlines()
    assert rows[0] == "table,task,norm,examples_per_class,top1" and len(rows) == 1 + 4 + 8
    (out / "report.html").unlink()
    rebuild(out)
    assert (out / "report.html").is_file()


def test_unknown_normalisation_is_refused(tmp_path):
    with pytest.raises(BigTransferError, match="unknown normalisation 'ln'"):
        run_ablation(tiny(tmp_path / "abl", norms=("gn", "ln")))
