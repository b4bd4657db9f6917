"""Downloads from a mirror or a hub that lies, stalls or never stops (loopback servers, the real clients).

Every case is run through the command line as a user would, with short limits: exit 2 with one
line naming the model, no traceback, done in seconds, nothing recorded in the cache, and every file
beside the caches byte-identical afterwards."""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from pathlib import Path

import pytest
from bit_files import UNITS
from loopback_bucket import released_npz
from lying_http import (
    always_range_from,
    drip,
    endless,
    header_drip,
    range_from,
    redirect,
    reply_with,
    silent,
)

from bigtransfer.cli import main
from bigtransfer.models import hub as hub_source
from bigtransfer.models import zoo
from bigtransfer.models.hub_guard import HubGuard
from bigtransfer.models.released import size_ceiling

NAME, FILE = "BiT-S-R50x1", "BiT-S-R50x1.npz"  # R50x1, 1000 classes, in the authors' bucket
HUB_NAME, REPO = "distill/R50x1_224", "timm/resnetv2_50x1_bit.goog_distilled_in1k"  # R50x1, 1000 classes
LIMITS = ["--stall-timeout", "1", "--deadline", "3"]
# Where the deadline is not what is tested: a reply refused for what it says, an endless body cut at
# what the model can take (170 MB through loopback), or a whole R50x1 file (100 MB) checked once it
# arrived, must not lose a race with 3 s on a busy machine.
ROOMY = ["--stall-timeout", "1", "--deadline", "15"]
TIME_BOUND = 20  # seconds for any case: the deadline is 3 s, the rest is a slow shared machine


def snapshot(folder: Path) -> dict[str, bytes | str]:
    """Every entry under `folder`: a file's bytes, a link's target, or 'dir'."""
    found: dict[str, bytes | str] = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = Path(root) / name
            key = str(path.relative_to(folder))
            if path.is_symlink():
                found[key] = "link:" + os.readlink(path)
            elif path.is_dir():
                found[key] = "dir"
            else:
                found[key] = path.read_bytes()
    return found


@pytest.fixture
def outside(tmp_path):
    """A user's folder beside the caches (what an escaping path would reach): it must not change."""
    folder = tmp_path / "sibling"
    (folder / "inner").mkdir(parents=True)
    (folder / "notes.txt").write_text("the user's own file\n")
    (folder / "inner" / "data.bin").write_bytes(os.urandom(256))
    before = snapshot(folder)
    yield folder
    assert snapshot(folder) == before, "a download wrote outside BIGTRANSFER_HOME / HF_HOME"


def refused(argv, capsys, *fragments) -> str:
    """Run the CLI; it must exit 2 with one `bigtransfer: error:` line holding every fragment, in bounded time."""
    start = time.monotonic()
    code = main(argv)
    elapsed = time.monotonic() - start
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("bigtransfer: error: ") and err.count("\n") == 0, err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, err
    assert elapsed < TIME_BOUND, f"took {elapsed:.1f} s"
    return err


def bucket_left_nothing(keeps_part: bool = False) -> None:
    entry = zoo.lookup(NAME)
    dest = zoo.cached_path(entry)
    assert not dest.exists() and zoo.recorded_sha256(entry) is None
    assert zoo.cached_file(entry) is None
    part = dest.with_name(dest.name + ".part")
    if not keeps_part:
        assert not part.exists()
    else:  # a transient failure keeps what arrived, to resume: never more than the model can take
        assert not part.exists() or part.stat().st_size <= size_ceiling(entry)


@pytest.fixture(scope="module")
def payload():
    return released_npz(50, 1, 1000)


def _part(data: bytes) -> None:
    """What an earlier, interrupted attempt left: the next request asks for the rest (a Range)."""
    part = zoo.cached_path(zoo.lookup(NAME)).with_name(FILE + ".part")
    part.parent.mkdir(parents=True, exist_ok=True)
    part.write_bytes(data)


# --------------------------------------------------------------------------- the bucket
def _timm_file(units, width, num_classes) -> bytes:
    """A timm state dict (zero weights) as the hub would serve it; timm builds it on the meta device."""
    timm = pytest.importorskip("timm")
    torch = pytest.importorskip("torch")
    from safetensors.torch import save

    name = "resnetv2_50x1_bit" if (units, width) == (UNITS[50], 1) else None
    with torch.device("meta"):
        if name:
            model = timm.create_model(name, pretrained=False, num_classes=num_classes)
        else:
            from timm.models.resnetv2 import ResNetV2

            model = ResNetV2(layers=list(units), width_factor=width, stem_type="fixed", num_classes=num_classes)
    return save({k: torch.zeros(v.shape, dtype=v.dtype) for k, v in model.state_dict().items()})


BUCKET_CONTENT = {  # what the bucket serves as BiT-S-R50x1.npz -> what the one line must say
    "text": (lambda: b"<html>not found, but 200 anyway</html>\n" * 25, ["the bucket file is not BiT weights"]),
    "truncated": (lambda: released_npz(50, 1, 1000)[:70_000], ["not BiT weights", "truncated or corrupt"]),
    "wrong architecture": (lambda: released_npz(14, 0.5, 1000),
                           ["the bucket file is R14x0.5 (1000 classes), but BiT-S-R50x1 is R50x1 (1000 classes)"]),
    "wrong head": (lambda: released_npz(50, 1, 10),
                   ["the bucket file is R50x1 (10 classes), but BiT-S-R50x1 is R50x1 (1000 classes)"]),
    "timm layout": (lambda: _timm_file(UNITS[14], 0.5, 1000), ["the bucket file is in the timm layout"]),
}


@pytest.mark.parametrize("case", BUCKET_CONTENT)
def test_bucket_content_that_is_not_the_model_is_refused(bucket, outside, capsys, case):
    make, fragments = BUCKET_CONTENT[case]
    bucket.files[FILE] = make()
    refused(["download", NAME, "--quiet", *LIMITS], capsys, f"{NAME}: ", *fragments)
    bucket_left_nothing()


BUCKET_LIES = {  # reply -> what the one line must say; the .part is removed
    "endless body": (endless, "sent more than the"),
    "declared size beyond the model": (reply_with(200, {"Content-Length": str(10**12)}),
                                       "declares a 1000000000000-byte file"),
    "Content-Length not a number": (reply_with(200, {"Content-Length": "lots"}), "malformed Content-Length"),
    "negative Content-Length": (reply_with(200, {"Content-Length": "-5"}), "malformed Content-Length"),
    "two Content-Lengths": (reply_with(200, [("Content-Length", "10"), ("Content-Length", "20")], b"x" * 10),
                            "malformed Content-Length"),
    "206 without Content-Range": (reply_with(206, {"Content-Length": "10"}, b"x" * 10), "malformed Content-Range"),
    "Content-Range not a range": (reply_with(206, {"Content-Range": "bytes abc", "Content-Length": "3"}, b"abc"),
                                  "malformed Content-Range"),
    "206 of a range beyond the model": (reply_with(206, {"Content-Range": f"bytes 0-{10**12}/*"}),
                                        f"declares a {10**12 + 1}-byte file"),
    "Content-Range backwards": (reply_with(206, {"Content-Range": "bytes 10-5/100"}), "impossible Content-Range"),
    "Content-Range past its total": (reply_with(206, {"Content-Range": "bytes 0-99/50"}),
                                     "impossible Content-Range"),
    "Content-Range against Content-Length": (
        reply_with(206, {"Content-Range": "bytes 0-9/100", "Content-Length": "7"}, b"x" * 7), "disagrees"),
    "No Content status": (reply_with(204, {}), "answered HTTP 204"),
}


@pytest.mark.parametrize("case", BUCKET_LIES)
def test_bucket_replies_that_lie_are_one_line_and_leave_nothing(bucket, outside, capsys, case):
    reply, fragment = BUCKET_LIES[case]
    bucket.lies[FILE] = reply
    refused(["download", NAME, "--quiet", *ROOMY], capsys, f"{NAME}: ", fragment, "nothing was kept")
    bucket_left_nothing()


def test_endless_body_stops_at_what_the_model_can_take(bucket, capsys):
    bucket.lies[FILE] = endless
    ceiling = size_ceiling(zoo.lookup(NAME))
    err = refused(["download", NAME, "--quiet", *ROOMY], capsys)
    assert f"sent more than the {ceiling} bytes a file of this model can take" in err
    assert ceiling < 200 * 2**20  # R50x1 with 1000 classes: 102 MB of float32 weights


BUCKET_SLOW = {  # reply -> what the one line must say; what arrived is kept to resume
    "a byte every 0.3 s": (drip(0.3), "not finished within the 3 s deadline"),
    "headers a byte every 0.3 s": (header_drip(0.3), "not finished within the 3 s deadline"),
    "headers, then silence": (silent(), "no data from"),
}


@pytest.mark.parametrize("case", BUCKET_SLOW)
def test_bucket_that_drips_or_stalls_is_cut_off_in_time(bucket, outside, capsys, case):
    reply, fragment = BUCKET_SLOW[case]
    bucket.lies[FILE] = reply
    refused(["download", NAME, "--quiet", *LIMITS], capsys, f"{NAME}: ", fragment, "run the same command again")
    bucket_left_nothing(keeps_part=True)


def test_resume_against_a_lying_range_reply_is_refused_and_drops_the_part(bucket, outside, capsys, payload):
    _part(payload[:50_000])
    bucket.lies[FILE] = reply_with(206, {"Content-Range": f"bytes 50000-{len(payload) - 1}/{10**12}"})
    refused(["download", NAME, "--quiet", *LIMITS], capsys, "declares a 1000000000000-byte file")
    bucket_left_nothing()


def test_a_range_from_the_wrong_offset_starts_over_without_corrupting_the_file(bucket, payload, capsys):
    _part(payload[:50_000])
    bucket.lies[FILE] = range_from(payload, 12_345)  # a ranged reply, but not from where we asked
    assert main(["download", NAME, "--quiet", *LIMITS]) == 0
    assert zoo.cached_path(zoo.lookup(NAME)).read_bytes() == payload
    assert [r["range"] for r in bucket.requests] == ["bytes=50000-", None]


def test_a_server_that_always_answers_a_wrong_range_is_refused(bucket, outside, payload, capsys):
    _part(payload[:50_000])
    bucket.lies[FILE] = always_range_from(payload, 12_345)
    refused(["download", NAME, "--quiet", *LIMITS], capsys, "answered with bytes from 12345 when asked from 0")
    bucket_left_nothing()


@pytest.mark.parametrize("target", ["self", "file:///etc/passwd"])
def test_redirect_loops_and_file_urls_are_one_line(bucket, outside, capsys, target):
    bucket.lies[FILE] = redirect(f"{bucket.url}/{FILE}" if target == "self" else target)
    refused(["download", NAME, "--quiet", *LIMITS], capsys, FILE, "HTTP 302")
    bucket_left_nothing()


def test_a_cached_file_that_is_not_the_model_is_not_reported_as_verified(bucket, capsys):
    """What older versions saved from a lying mirror: its SHA-256 matches its record, yet it is no model."""
    entry = zoo.lookup(NAME)
    dest = zoo.cached_path(entry)
    dest.parent.mkdir(parents=True)
    dest.write_bytes(b"x" * 1000)
    dest.with_name(FILE + ".sha256").write_text(f"{hashlib.sha256(b'x' * 1000).hexdigest()}  {FILE}\n")
    err = refused(["download", NAME, "--quiet"], capsys, "not BiT weights", f"download --force {NAME}")
    assert "verified" not in err


@pytest.mark.parametrize("flag, value", [("--deadline", "0"), ("--stall-timeout", "-1"), ("--deadline", "soon"),
                                         ("--stall-timeout", "nan"), ("--deadline", "inf")])
def test_limit_flags_are_checked(capsys, flag, value):
    refused(["download", NAME, flag, value], capsys, flag)


def test_limits_come_from_the_environment(bucket, monkeypatch, capsys):
    bucket.lies[FILE] = silent()
    monkeypatch.setenv("BIGTRANSFER_DOWNLOAD_STALL_TIMEOUT", "1")
    refused(["download", NAME, "--quiet"], capsys, "for 1 s", "--stall-timeout")
    monkeypatch.setenv("BIGTRANSFER_DOWNLOAD_DEADLINE", "a while")
    refused(["download", NAME, "--quiet"], capsys, "BIGTRANSFER_DOWNLOAD_DEADLINE: expected a number of seconds")


# --------------------------------------------------------------------------- the hub
@pytest.fixture(scope="module")
def timm_r50x1():
    """A file that is the distilled R50x1 as the hub holds it (timm's layout, 1000 classes, zero weights)."""
    return _timm_file(UNITS[50], 1, 1000)


def workers_end() -> None:
    """A download abandoned at its deadline stops at its next request or read (here within a few seconds),
    and no hook of ours stays on huggingface_hub's shared HTTP client."""
    from huggingface_hub.utils import get_session

    for thread in threading.enumerate():
        if thread.name == f"download {HUB_NAME}":
            thread.join(15)
            assert not thread.is_alive(), "the abandoned download is still running"
    hooks = get_session().event_hooks
    assert not [h for h in hooks["request"] + hooks["response"] if isinstance(getattr(h, "__self__", None), HubGuard)]


def hub_left_nothing(hf_home: Path | None) -> None:
    """Nothing recorded; with `hf_home`, no partial blob left in huggingface_hub's cache either."""
    workers_end()
    assert hub_source.cached_file(HUB_NAME) is None and not hub_source.record_path(HUB_NAME).exists()
    assert zoo.cached_file(zoo.lookup(HUB_NAME)) is None
    if hf_home is not None:
        assert not list(hf_home.rglob("*.incomplete"))


ESCAPE = "../../../../sibling/planted"  # from HF_HOME/hub/models--timm--.../blobs/ to the user's folder

HUB_METADATA_LIES = {  # what the metadata (HEAD) reply says -> the one line
    "ETag with ..": ({"ETag": f'"{ESCAPE}"'}, "the hub's ETag"),
    "X-Linked-Etag with ..": ({"X-Linked-Etag": ESCAPE}, "the hub's ETag"),
    "ETag with a slash": ({"ETag": '"' + "a" * 32 + "/" + "b" * 31 + '"'}, "is not a git or SHA-256 hash"),
    "commit with ..": ({"X-Repo-Commit": "../../../../sibling"}, "the hub's commit hash"),
    "commit with a slash": ({"X-Repo-Commit": "0123456789/abcdef0123456789abcdef0123456"}, "not 40 hex digits"),
    "declared size beyond the model": ({"X-Linked-Size": str(10**13)}, "declares a 10000000000000-byte file"),
    "size not a number": ({"Content-Length": "12abc"}, "Content-Length"),  # the HTTP library's own refusal
    "linked size not a number": ({"X-Linked-Size": "1e9"}, "malformed X-Linked-Size"),
}


@pytest.mark.parametrize("case", HUB_METADATA_LIES)
def test_hub_metadata_that_lies_is_refused_before_anything_is_written(hub, outside, tmp_path, capsys, case):
    headers, fragment = HUB_METADATA_LIES[case]
    hub.repos[REPO] = {"model.safetensors": b"x" * 1000}
    hub.head_headers[(REPO, "model.safetensors")] = headers
    refused(["download", HUB_NAME, "--source", "hub", "--quiet", *LIMITS], capsys, f"{HUB_NAME}: ", fragment)
    hub_left_nothing(tmp_path / "hf_home")
    assert not any(method == "GET" for method, *_ in hub.requests)  # refused before the download began


def test_a_missing_file_whose_reply_names_a_hostile_commit_writes_nothing(hub, outside, tmp_path, capsys):
    """huggingface_hub records a missing file under .no_exist/<the reply's commit>/: a path too."""
    hub.repos[REPO] = {}
    hub.commit = ESCAPE
    refused(["download", HUB_NAME, "--source", "hub", "--quiet", *LIMITS], capsys, "the hub's commit hash")
    hub_left_nothing(tmp_path / "hf_home")


HUB_BODY_LIES = {  # what the download (GET) reply does -> the one line
    "endless body": (endless, "sent more than the 1000 bytes of the file"),
    "a longer body than declared": (reply_with(200, {"Content-Length": "5000"}, b"x" * 5000),
                                    "sent a 5000-byte body, more than the 1000 bytes"),
    "206 with a broken Content-Range": (reply_with(206, {"Content-Range": "bytes 0-x/1000"}, b"x" * 1000),
                                        "malformed Content-Range"),
}


@pytest.mark.parametrize("case", HUB_BODY_LIES)
def test_hub_bodies_that_lie_are_cut_off(hub, outside, tmp_path, capsys, case):
    reply, fragment = HUB_BODY_LIES[case]
    hub.repos[REPO] = {"model.safetensors": b"x" * 1000}
    hub.lies[("GET", REPO, "model.safetensors")] = reply
    refused(["download", HUB_NAME, "--source", "hub", "--quiet", *LIMITS], capsys, f"{HUB_NAME}: ", fragment)
    hub_left_nothing(tmp_path / "hf_home")


def test_a_hub_body_with_a_malformed_length_is_one_line(hub, outside, capsys):
    """The HTTP library refuses it; huggingface_hub 1.0 gives up at once (keeping an empty partial blob
    to resume), later versions retry (quietly) until the deadline."""
    hub.repos[REPO] = {"model.safetensors": b"x" * 1000}
    hub.lies[("GET", REPO, "model.safetensors")] = reply_with(200, {"Content-Length": "zz"}, b"x")
    err = refused(["download", HUB_NAME, "--source", "hub", "--quiet", *LIMITS], capsys, f"{HUB_NAME}: ")
    assert "bad Content-Length" in err or "3 s deadline" in err, err
    hub_left_nothing(None)


@pytest.mark.parametrize("reply, fragment", [(drip(0.3, declared=1000), "not finished within the 3 s deadline"),
                                             (silent(declared=1000), "no data from the hub for 1 s")])
def test_a_hub_that_drips_or_stalls_is_cut_off_in_time(hub, outside, capsys, reply, fragment):
    hub.repos[REPO] = {"model.safetensors": b"x" * 1000}
    hub.lies[("GET", REPO, "model.safetensors")] = reply
    refused(["download", HUB_NAME, "--source", "hub", "--quiet", *LIMITS], capsys, f"{HUB_NAME}: ", fragment)
    workers_end()
    assert hub_source.cached_file(HUB_NAME) is None


HUB_CONTENT = {  # what the hub serves as model.safetensors -> the one line
    "text": (lambda: b"{\"error\": \"rate limited\"}\n" * 40, "the hub file is not BiT weights"),
    "the authors' npz": (lambda: released_npz(50, 1, 1000), "the hub file is in the authors layout, not timm"),
}


@pytest.mark.parametrize("case", HUB_CONTENT)
def test_hub_content_that_is_not_the_model_is_refused(hub, outside, capsys, case):
    make, fragment = HUB_CONTENT[case]
    hub.repos[REPO] = {"model.safetensors": make()}
    refused(["download", HUB_NAME, "--source", "hub", "--quiet", *ROOMY], capsys, f"{HUB_NAME}: ", fragment)
    assert hub_source.cached_file(HUB_NAME) is None and not hub_source.record_path(HUB_NAME).exists()


def test_a_hub_file_with_the_wrong_head_is_refused(hub, outside, capsys):
    hub.repos[REPO] = {"model.safetensors": _timm_file(UNITS[50], 1, 10)}
    refused(["download", HUB_NAME, "--source", "hub", "--quiet", *ROOMY], capsys,
            "the hub file is R50x1 (10 classes), but distill/R50x1_224 is R50x1 (1000 classes)")
    assert hub_source.cached_file(HUB_NAME) is None


def test_a_hub_reply_offering_xet_is_fetched_over_http_within_the_limits(hub, outside, timm_r50x1, tmp_path, capsys):
    """The Xet client would fetch outside our limits: its headers are dropped and the file comes over HTTP."""
    hub.repos[REPO] = {"model.safetensors": timm_r50x1}
    hub.head_headers[(REPO, "model.safetensors")] = {"X-Xet-Hash": "f" * 64, "X-Xet-Refresh-Route": "/api/xet"}
    assert main(["download", HUB_NAME, "--source", "hub", "--quiet", *ROOMY]) == 0
    workers_end()
    record = json.loads(hub_source.record_path(HUB_NAME).read_text())
    assert record["sha256"] == hashlib.sha256(timm_r50x1).hexdigest()
    assert Path(record["path"]).resolve().is_relative_to((tmp_path / "hf_home").resolve())
    assert ("GET", f"{REPO}/resolve/main/model.safetensors", "Bearer hf_loopback_test_token") in hub.requests


@pytest.mark.parametrize("method", ["HEAD", "GET"])
def test_a_hub_redirect_loop_is_one_line(hub, outside, capsys, method):
    """The HTTP client gives up after 20 redirects; under huggingface_hub 1.0 a HEAD's relative
    redirects were still being followed at the 3 s deadline, which ended them."""
    hub.repos[REPO] = {"model.safetensors": b"x" * 1000}
    hub.lies[(method, REPO, "model.safetensors")] = redirect(f"/{REPO}/resolve/main/model.safetensors")
    err = refused(["download", HUB_NAME, "--source", "hub", "--quiet", *LIMITS], capsys, f"{HUB_NAME}: ")
    assert "redirects" in err or "3 s deadline" in err, err
    hub_left_nothing(None)
