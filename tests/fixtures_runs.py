"""Runs that several recipe tests read, built once per test session (once per xdist worker).

Each is read only: a test that continued or changed a shared run would change what the others see.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from bigtransfer.demo.story import FULL, DemoConfig, DemoResult, run_demo

# The demo at a size that runs in seconds: it tests the machinery, not the headline.
TINY = DemoConfig(upstream_data="glyphs:classes=6,per_class=8,test_per_class=2,size=24", upstream_resolution=24,
                  pretrain_epochs=1, pretrain_batch=16, shots=(1, FULL), seeds=(0, 1), finetune_batch=16,
                  finetune_steps=2, finetune_resolution=(28, 24), jobs=1)
# What the shared tiny demo ran with: fp32, so tests that recompute its figures get them to the bit.
TINY_FP32 = replace(TINY, precision="fp32")


@dataclass(frozen=True)
class TinyDemo:
    out: Path  # the demo's folder, as the continuation left it
    result: DemoResult  # the first run: TINY in fp32, one run at a time
    first_summary: dict  # summary.json as that first run wrote it
    continued: DemoResult  # the same folder continued with precision bf16: every run already finished


# Test modules import the function (`from fixtures_runs import tiny_demo_fixture`) and take the
# fixture by its name, `tiny_demo`, so the parameter does not shadow the import.
@pytest.fixture(scope="session", name="tiny_demo")
def tiny_demo_fixture(tmp_path_factory) -> TinyDemo:
    """The tiny demo, run once and then continued in another precision. Read only."""
    root = tmp_path_factory.mktemp("tiny_demo")
    out = root / "demo"
    with pytest.MonkeyPatch.context() as patch:  # the per-test cache isolation does not reach session fixtures
        patch.setenv("BIGTRANSFER_HOME", str(root / "cache"))
        result = run_demo(out, TINY_FP32, progress=False)
        first_summary = json.loads((out / "summary.json").read_text())
        continued = run_demo(out, replace(TINY, precision="bf16"), progress=False)
    return TinyDemo(out, result, first_summary, continued)
