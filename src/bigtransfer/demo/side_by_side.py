"""Independent small runs side by side on a CPU: one process per core, one torch thread each.

A model as small as the demo's keeps two torch threads busy only part of the time (the
per-layer work is too small to split well), so two runs in two single-thread processes finish
about twice as fast as the same runs one after the other on two threads. One thread per run
has a second virtue: a run's fp32 sums then come out the same on a 2-core laptop and on a
64-core server with the same instruction sets, so a figure does not depend on the core count.

`pool(jobs)` gives an executor: for one job the runs happen here, in this process, one after
the other (nothing to spawn on a 1-core machine or a GPU); for more, a process pool whose
workers each set their thread count first and stop if this process dies (a killed demo must
not leave runs training in the background, holding their folders' locks).
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Iterator

MAX_AUTO_JOBS = 16  # each process holds its own torch and data: a few hundred MB


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask, e.g. under `taskset` or a container)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # no affinity masks (macOS, Windows)
        return max(1, os.cpu_count() or 1)


def auto_jobs(runs: int) -> int:
    """How many runs to train at once on this CPU: one per usable core, no more than there are."""
    return max(1, min(usable_cores(), MAX_AUTO_JOBS, runs))


class InProcess(cf.Executor):
    """The executor interface, running each call here and now: one job needs no pool."""

    def __init__(self, threads: int | None):
        self._threads = threads
        self._previous: int | None = None

    def __enter__(self):
        if self._threads is not None:
            import torch

            self._previous = torch.get_num_threads()
            torch.set_num_threads(self._threads)
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            import torch

            torch.set_num_threads(self._previous)
        return False

    def submit(self, fn, /, *args, **kwargs) -> cf.Future:
        """Run the call now; its error is raised here, so nothing after a failed run is started."""
        future: cf.Future = cf.Future()
        future.set_result(fn(*args, **kwargs))
        return future


@contextlib.contextmanager
def pool(jobs: int, threads: int | None = 1) -> Iterator[cf.Executor]:
    """An executor for `jobs` runs at once, each computing with `threads` torch threads (None:
    torch's default). Leaving the block early (an error, Ctrl-C) stops the runs in flight the
    way a scheduler would, with SIGTERM: each saves its checkpoint, so a re-run continues."""
    if jobs <= 1:
        with InProcess(threads) as here:
            yield here
        return
    # spawn, not fork: this process may already have started OpenMP threads, which a fork cannot copy
    executor = _Pool(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"),
                     initializer=_start_worker, initargs=(threads, os.getpid()))
    try:
        yield executor
    except BaseException:
        for process in list(getattr(executor, "_processes", {}).values()):
            if process.is_alive():
                process.terminate()
        raise
    finally:
        executor.shutdown(wait=True, cancel_futures=True)


class _Pool(cf.ProcessPoolExecutor):
    def submit(self, fn, /, *args, **kwargs) -> cf.Future:
        return super().submit(_run_job, fn, *args, **kwargs)


PARENT_POLL_S = 1.0
GRACE_S = 120.0  # after SIGTERM, the most a run may take to save its checkpoint before its worker exits
_worker = {"busy": False, "orphaned": False}  # this worker process's state, read by its watchdog thread


def _start_worker(threads: int | None, parent: int) -> None:
    # Ctrl-C reaches every process of the terminal's group; the pool's owner decides what stops
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    threading.Thread(target=_stop_when_orphaned, args=(parent,), daemon=True).start()


def _run_job(fn, /, *args, **kwargs):
    if _worker["orphaned"]:
        os._exit(1)
    _worker["busy"] = True
    try:
        return fn(*args, **kwargs)
    finally:
        _worker["busy"] = False
        if _worker["orphaned"]:
            os._exit(1)


def _stop_when_orphaned(parent: int) -> None:
    """If the process that started this worker dies (killed outright, with no chance to shut the
    pool down), stop: at once if idle; if a run is training, with SIGTERM, which train/loop.py
    treats as Ctrl-C (it saves the checkpoint, then stops), and the worker exits after it."""
    while os.getppid() == parent:
        time.sleep(PARENT_POLL_S)
    _worker["orphaned"] = True
    if not _worker["busy"]:
        os._exit(1)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(GRACE_S)
    os._exit(1)
