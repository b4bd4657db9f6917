"""Runs side by side (demo/side_by_side.py): one process and one thread per run, errors carried
back, and no worker left behind when the process that started them is killed outright."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from bigtransfer.demo import side_by_side
from bigtransfer.errors import BigTransferError


def where_and_how() -> tuple[int, int]:
    return os.getpid(), torch.get_num_threads()


def refuse(text: str) -> None:
    raise BigTransferError(text)


def test_a_pool_runs_each_job_in_a_worker_with_one_thread():
    with side_by_side.pool(2, threads=1) as executor:
        seen = [executor.submit(where_and_how).result() for _ in range(4)]
    assert all(pid != os.getpid() for pid, _ in seen) and {threads for _, threads in seen} == {1}


def test_one_job_runs_here_with_the_threads_asked_and_restores_them():
    before = torch.get_num_threads()
    with side_by_side.pool(1, threads=1) as executor:
        assert executor.submit(where_and_how).result() == (os.getpid(), 1)
    assert torch.get_num_threads() == before


def test_a_job_error_reaches_the_caller_as_itself():
    with side_by_side.pool(2) as executor:
        future = executor.submit(refuse, "--data x: no such folder")
        with pytest.raises(BigTransferError, match="no such folder"):
            future.result()
    with side_by_side.pool(1) as executor, pytest.raises(BigTransferError, match="no such folder"):
        executor.submit(refuse, "--data x: no such folder")


def test_auto_jobs_is_one_per_usable_core_and_no_more_than_the_runs():
    cores = side_by_side.usable_cores()
    assert side_by_side.auto_jobs(1) == 1
    assert side_by_side.auto_jobs(1000) == min(cores, side_by_side.MAX_AUTO_JOBS)


# A parent that starts two workers, one training (it saves on SIGTERM, as train/loop.py does),
# one idle, then waits to be killed.
PARENT = textwrap.dedent("""
    import os, signal, sys, time
    from pathlib import Path
    from bigtransfer.demo import side_by_side

    def train_until_stopped(folder):
        def save_and_stop(signum, frame):
            raise KeyboardInterrupt
        signal.signal(signal.SIGTERM, save_and_stop)
        Path(folder, f"worker{os.getpid()}").write_text("training")
        try:
            time.sleep(600)
        except KeyboardInterrupt:
            Path(folder, "saved").write_text(str(os.getpid()))
            raise

    def note_pid(folder):
        Path(folder, f"worker{os.getpid()}").write_text("idle")

    if __name__ == "__main__":
        with side_by_side.pool(2) as executor:
            executor.submit(train_until_stopped, sys.argv[1])
            executor.submit(note_pid, sys.argv[1])
            time.sleep(600)
""")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]


@pytest.mark.skipif(not Path("/proc").exists(), reason="reads process states from /proc")
def test_workers_of_a_killed_parent_save_and_exit(tmp_path):
    script = tmp_path / "parent.py"  # a file, not -c: spawned workers import the jobs from it
    script.write_text(PARENT)
    folder = tmp_path / "seen"
    folder.mkdir()
    parent = subprocess.Popen([sys.executable, str(script), str(folder)])
    try:
        deadline = time.monotonic() + 120
        while len(list(folder.glob("worker*"))) < 2:
            assert time.monotonic() < deadline and parent.poll() is None, "the workers never started"
            time.sleep(0.2)
        workers = [int(p.name.removeprefix("worker")) for p in folder.glob("worker*")]
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait()
    deadline = time.monotonic() + 30  # far less than GRACE_S: they stop on their own, not on the timer
    while any(alive(pid) for pid in workers):
        assert time.monotonic() < deadline, f"workers still running after their parent died: {workers}"
        time.sleep(0.2)
    assert (folder / "saved").exists(), "the training worker was not given the chance to save"


def test_a_stop_signal_during_an_update_waits_until_the_update_is_whole():
    """The loop's guard (train/loop.py): a signal mid-update raises only once the step is counted,
    so a checkpoint never holds half an update; anywhere else it stops at once."""
    from bigtransfer.train.loop import UpdateGuard

    guard, applied = UpdateGuard(), []
    with pytest.raises(KeyboardInterrupt), guard.update():
        applied.append("momentum")
        guard.handle(signal.SIGTERM, None)  # arrives here: must not cut the update short
        applied.append("weights and step count")
    assert applied == ["momentum", "weights and step count"]
    with pytest.raises(KeyboardInterrupt):
        UpdateGuard().handle(signal.SIGINT, None)
