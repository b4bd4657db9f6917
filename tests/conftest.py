import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import durations
from loopback_bucket import bucket  # noqa: F401  (shared fixture)
from loopback_hub import hub  # noqa: F401  (shared fixture)

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs one worker per core: each worker computes on one thread (and so do the
    # processes it starts), so two workers do not fight over two cores.
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["MKL_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)


def pytest_addoption(parser):
    parser.addoption("--record-durations", action="store_true",
                     help="merge each test's measured seconds into tests/durations.json (make test-durations)")


def pytest_configure(config):
    if config.getoption("--record-durations") and not os.environ.get("PYTEST_XDIST_WORKER"):
        config.pluginmanager.register(durations.Recorder(), "record-durations")


@pytest.hookimpl(tryfirst=True)  # before `-m` selects by the `slow` marks it adds
def pytest_collection_modifyitems(config, items):
    durations.mark_slow(items)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Every test gets its own empty model cache; nothing touches ~/.cache."""
    monkeypatch.setenv("BIGTRANSFER_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("BIGTRANSFER_BASE_URL", raising=False)
    # huggingface_hub too: its own cache, and offline unless a test serves a loopback hub (`hub`).
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
