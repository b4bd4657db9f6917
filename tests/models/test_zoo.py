"""Released-model registry, cache, and downloads (against a loopback HTTP server)."""

import hashlib

import numpy as np
import pytest
from bit_files import UNITS, authors_arrays
from loopback_bucket import released_npz

from bigtransfer import BigTransferError, create_model
from bigtransfer.models import zoo
from bigtransfer.models.transfer import Limits


@pytest.fixture(scope="module")
def payload():
    """What the bucket serves for BiT-S-R50x1: the authors' layout, R50x1, 1000 classes."""
    return released_npz(50, 1, 1000)


def test_registry_covers_the_release():
    names = {e.name for e in zoo.known_models(include_vtab=True)}
    assert len(names) == 6 * 3 + 5 * 3 * 19 + 4
    assert {"BiT-S-R152x4", "BiT-M-R152x2", "BiT-M-R101x3-ILSVRC2012", "distill/R50x1_224"} <= names
    assert "BiT-M-R152x2-run0-dtd" not in names  # the release has no VTAB runs for R152x2
    entry = zoo.lookup("vtab/BiT-M-R50x1-run2-clevr-count.npz")
    assert (entry.arch_name, entry.num_classes, entry.relpath) == ("R50x1", 8, "vtab/BiT-M-R50x1-run2-clevr-count.npz")
    assert zoo.lookup("BiT-M-R50x1").num_classes == 21843
    assert zoo.lookup("BiT-S-R50x1").num_classes == 1000
    assert zoo.lookup("R50x1") is None


def test_released_name_without_cache_says_which_command_to_run():
    with pytest.raises(BigTransferError, match=r"not in the cache .*; fetch it with: bigtransfer download BiT-M-R50x1$"):
        create_model("BiT-M-R50x1")


def test_released_name_uses_the_cached_file():
    path = zoo.cached_path(zoo.lookup("BiT-S-R50x1"))
    path.parent.mkdir(parents=True)
    arrays = authors_arrays(UNITS[50], 1, num_classes=1000, seed=9)
    np.savez(path, **arrays)
    model = create_model("BiT-S-R50x1", num_classes=5)
    assert model.config.num_classes == 5
    np.testing.assert_array_equal(
        model.root.conv.weight.detach().numpy(),
        arrays["resnet/root_block/standardized_conv2d/kernel"].transpose(3, 2, 0, 1),
    )


def test_download_writes_file_and_sha256(bucket, payload):
    bucket.files["BiT-S-R50x1.npz"] = payload
    entry = zoo.lookup("BiT-S-R50x1")
    path = zoo.download(entry, progress=False)
    assert path == zoo.cache_dir() / "BiT-S-R50x1.npz"
    assert path.read_bytes() == payload
    assert zoo.recorded_sha256(entry) == hashlib.sha256(payload).hexdigest()
    assert zoo.verify(entry)
    assert not list(path.parent.glob("*.part"))


def test_download_resumes_a_broken_transfer(bucket):
    data = released_npz(50, 1, 47)  # BiT-M-R50x1-run0-dtd: R50x1, 47 classes
    bucket.files["vtab/BiT-M-R50x1-run0-dtd.npz"] = data
    bucket.drop_after = 100_000
    entry = zoo.lookup("BiT-M-R50x1-run0-dtd")
    with pytest.raises(BigTransferError, match="run the same command again to resume"):
        zoo.download(entry, progress=False)
    part = zoo.cached_path(entry).with_name("BiT-M-R50x1-run0-dtd.npz.part")
    assert part.stat().st_size == 100_000
    assert not zoo.cached_path(entry).exists()  # nothing half-written under the real name
    path = zoo.download(entry, progress=False)
    assert bucket.requests[-1]["range"] == "bytes=100000-"
    assert path.read_bytes() == data and zoo.verify(entry)


def test_download_restarts_when_server_ignores_range(bucket, payload):
    bucket.files["BiT-S-R50x1.npz"] = payload
    bucket.honour_range = False
    entry = zoo.lookup("BiT-S-R50x1")
    part = zoo.cached_path(entry).with_name("BiT-S-R50x1.npz.part")
    part.parent.mkdir(parents=True)
    part.write_bytes(b"stale bytes from an older attempt")
    assert zoo.download(entry, progress=False).read_bytes() == payload


def test_download_of_complete_part_file(bucket, payload):
    bucket.files["BiT-S-R50x1.npz"] = payload
    entry = zoo.lookup("BiT-S-R50x1")
    part = zoo.cached_path(entry).with_name("BiT-S-R50x1.npz.part")
    part.parent.mkdir(parents=True)
    part.write_bytes(payload + b"extra")  # longer than the file: server answers 416
    assert zoo.download(entry, progress=False).read_bytes() == payload


def test_download_404_is_a_clear_error(bucket):
    with pytest.raises(BigTransferError, match=r"could not download .*BiT-S-R50x1.npz: HTTP 404"):
        zoo.download(zoo.lookup("BiT-S-R50x1"), progress=False)


def test_unreachable_server_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("BIGTRANSFER_BASE_URL", "http://127.0.0.1:9/bit_models")  # discard port: closed
    with pytest.raises(BigTransferError, match="could not reach .*BIGTRANSFER_BASE_URL"):
        zoo.download(zoo.lookup("BiT-S-R50x1"), progress=False, limits=Limits(stall_timeout=5))


def test_cache_dir_follows_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("BIGTRANSFER_HOME", str(tmp_path / "elsewhere"))
    assert zoo.cached_path(zoo.lookup("distill/R50x1_160")) == tmp_path / "elsewhere" / "distill" / "R50x1_160.npz"
