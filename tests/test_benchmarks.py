"""The benchmark scripts and the demo's experiments keep working as the package changes under
them: each one imports (a renamed or removed function fails here, not on the next person to
re-run a figure), and the demo's upstream experiments pre-train end to end on a tiny configuration."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
DEMO_EXPERIMENTS = ROOT / "experiments" / "demo"
# a deliberately plain 35-line script, the baseline of fixed_costs.py: it runs at import
RUNS_AT_IMPORT = {"plain_finetune.py"}
TINY_UPSTREAM = ["upstream_data=glyphs:classes=4,per_class=16", "pretrain_epochs=1", "pretrain_batch=16"]


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], check=False, cwd=cwd, capture_output=True, text=True, timeout=600)


def imports_every_script(folder: Path, tmp_path: Path) -> None:
    scripts = sorted(p.name for p in folder.glob("*.py") if p.name not in RUNS_AT_IMPORT)
    # one process for all of them, with the folder first on the path as `python folder/script.py` has it
    probe = ("import runpy, sys\n"
             f"sys.path.insert(0, {str(folder)!r})\n"
             f"for name in {scripts!r}:\n"
             f"    runpy.run_path({str(folder)!r} + '/' + name, run_name='imported')\n")
    done = run("-c", probe, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]


def test_every_benchmark_script_imports(tmp_path):
    assert len(list(BENCHMARKS.glob("*.py"))) > 10
    imports_every_script(BENCHMARKS, tmp_path)


def test_every_demo_experiment_imports(tmp_path):
    assert len(list(DEMO_EXPERIMENTS.glob("demo_*.py"))) >= 6
    imports_every_script(DEMO_EXPERIMENTS, tmp_path)


def test_demo_upstream_pre_trains(tmp_path):
    done = run(str(DEMO_EXPERIMENTS / "demo_upstream.py"), str(tmp_path / "pre"), *TINY_UPSTREAM, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "pre-trained" in done.stdout and (tmp_path / "pre" / "final.safetensors").exists()


def test_demo_upstream_variants_pre_trains_and_reports(tmp_path):
    variant = ";".join(["tiny", *TINY_UPSTREAM])
    done = run(str(DEMO_EXPERIMENTS / "demo_upstream_variants.py"), "--out", str(tmp_path / "variants"),
               "--variant", variant, "--results", str(tmp_path / "table"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    table = (tmp_path / "table.md").read_text()
    assert "| tiny |" in table and "ridge 1-shot" in table
