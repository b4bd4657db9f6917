"""The benchmark scripts and the demo's experiments keep working as the package changes under
them: each one imports (a renamed or removed function fails here, not on the next person to
re-run a figure), and the demo's upstream experiments pre-train end to end on a tiny configuration."""

from __future__ import annotations

import runpy
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
DEMO_EXPERIMENTS = ROOT / "experiments" / "demo"
# a deliberately plain 35-line script, the baseline of fixed_costs.py: it runs at import
RUNS_AT_IMPORT = {"plain_finetune.py"}
TINY_UPSTREAM = ["upstream_data=glyphs:classes=4,per_class=16", "pretrain_epochs=1", "pretrain_batch=16"]


# Imports each script given as FOLDER/NAME with its folder first on the path, as `python
# folder/script.py` has it; a script that fails is named with its traceback and the rest still run.
IMPORT_PROBE = """
import runpy, sys, traceback
for path in sys.argv[1:]:
    folder = path.rsplit("/", 1)[0]
    sys.path.insert(0, folder)
    try:
        runpy.run_path(path, run_name="imported")
    except BaseException:
        print("failed", path, traceback.format_exc(), file=sys.stderr, flush=True)
    sys.path.remove(folder)
print("probe done", flush=True)
"""


def scripts_of(folder: Path) -> list[str]:
    return [str(folder / p.name) for p in sorted(folder.glob("*.py")) if p.name not in RUNS_AT_IMPORT]


@pytest.fixture(scope="module")
def imported(tmp_path_factory) -> subprocess.CompletedProcess:
    """Every benchmark script and every demo experiment imported, in one process (one interpreter
    start-up for both folders)."""
    return subprocess.run([sys.executable, "-c", IMPORT_PROBE, *scripts_of(BENCHMARKS), *scripts_of(DEMO_EXPERIMENTS)],
                          check=False, cwd=tmp_path_factory.mktemp("imports"), capture_output=True, text=True,
                          timeout=600)


def failures_in(done: subprocess.CompletedProcess, folder: Path) -> list[str]:
    """The probe's failure reports for `folder`'s scripts (all of them if the probe did not finish)."""
    assert "probe done" in done.stdout, done.stderr[-3000:]
    return [part for part in done.stderr.split("failed ")[1:] if part.startswith(f"{folder}/")]


def test_every_benchmark_script_imports(imported):
    assert len(list(BENCHMARKS.glob("*.py"))) > 10
    assert not failures_in(imported, BENCHMARKS), failures_in(imported, BENCHMARKS)[0][-3000:]


def test_every_demo_experiment_imports(imported):
    assert len(list(DEMO_EXPERIMENTS.glob("demo_*.py"))) >= 6
    assert not failures_in(imported, DEMO_EXPERIMENTS), failures_in(imported, DEMO_EXPERIMENTS)[0][-3000:]


def run_script(script: Path, *args: str, monkeypatch) -> None:
    """`python script ARGS...`, in this process: the script's own `__main__` block, its argv."""
    monkeypatch.setattr(sys, "argv", [str(script), *args])
    monkeypatch.setattr(sys, "path", list(sys.path))  # the script puts its folders first; undone after
    runpy.run_path(str(script), run_name="__main__")


def test_demo_upstream_pre_trains(tmp_path, monkeypatch, capsys):
    run_script(DEMO_EXPERIMENTS / "demo_upstream.py", str(tmp_path / "pre"), *TINY_UPSTREAM, monkeypatch=monkeypatch)
    assert "pre-trained" in capsys.readouterr().out and (tmp_path / "pre" / "final.safetensors").exists()


def test_demo_upstream_variants_pre_trains_and_reports(tmp_path, monkeypatch):
    variant = ";".join(["tiny", *TINY_UPSTREAM])
    run_script(DEMO_EXPERIMENTS / "demo_upstream_variants.py", "--out", str(tmp_path / "variants"),
               "--variant", variant, "--results", str(tmp_path / "table"), monkeypatch=monkeypatch)
    table = (tmp_path / "table.md").read_text()
    assert "| tiny |" in table and "ridge 1-shot" in table
