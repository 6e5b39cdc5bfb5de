"""Faults injected inside fitting workers, for the reliability tests; the package never imports
this module.

It is a worker hook (see pipeline/worker.py): conftest.py sets
``DIPPIPE_WORKER_HOOK=tests.support.worker_faults:install`` for the whole session, so every
Fitter, in the test process or in a Ray worker, calls :func:`install`. Nothing happens until a
test sets one of the variables below; the scheduler hands ``DIPPIPE_*`` variables to the
workers, so a test sets them in its own process (``monkeypatch.setenv``), also for a Ray that
was started before.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from pipeline.worker import Fitter

# The process running this job exits abruptly, mid-fit, the first time (the marker file, created
# exclusively, records that it happened: once per test, whichever process gets there).
FAULT_KILL_JOB = "DIPPIPE_FAULT_KILL_JOB"
FAULT_MARKER = "DIPPIPE_FAULT_MARKER"
# This job's first fit in each Fitter runs out of (GPU) memory, to exercise the fallback.
FAULT_OOM_JOB = "DIPPIPE_FAULT_OOM_JOB"
# Workers (comma-separated names, e.g. "worker-1", or "*" for all) whose every job raises a
# CUDA error, as a worker with a poisoned CUDA context does; a replacement keeps the name,
# so it fails too, like a bad node.
FAULT_CUDA_WORKERS = "DIPPIPE_FAULT_CUDA_WORKERS"
# Workers (the same form) without credentials: every read of an input raises botocore's
# NoCredentialsError.
FAULT_NO_CREDENTIALS_WORKERS = "DIPPIPE_FAULT_NO_CREDENTIALS_WORKERS"
# Each fault injected by the two variables above leaves a file in this folder; with
# FAULT_HOLD_FOR=n, jobs of the other workers hold at their first report until n are there
# (so the failing worker surely gets jobs, however late it is placed).
FAULT_RECORD_DIR = "DIPPIPE_FAULT_RECORD_DIR"
FAULT_HOLD_FOR = "DIPPIPE_FAULT_HOLD_FOR"
# This job stops making progress (sleeps, no step, no heartbeat) the first time it runs
# (FAULT_STALL_MARKER, created exclusively, records it); later runs go through.
FAULT_STALL_JOB = "DIPPIPE_FAULT_STALL_JOB"
FAULT_STALL_MARKER = "DIPPIPE_FAULT_STALL_MARKER"
# This job runs on, with heartbeats (progress but no end), every time it runs: a job timeout.
FAULT_SLOW_JOB = "DIPPIPE_FAULT_SLOW_JOB"
# This job exits its process abruptly every time it reports progress. The first time (no
# FAULT_CRASH_MARKER yet) it first waits until FAULT_CRASH_CROWD other jobs run in the same
# process; meanwhile those hold at their own reports, so they are in flight when it dies.
FAULT_CRASH_JOB = "DIPPIPE_FAULT_CRASH_JOB"
FAULT_CRASH_MARKER = "DIPPIPE_FAULT_CRASH_MARKER"
FAULT_CRASH_CROWD = "DIPPIPE_FAULT_CRASH_CROWD"
HOLD_SECONDS = 120.0  # longest wait of a fault for its condition (then it goes on)

_FITTERS: list[Fitter] = []  # the Fitters of this process (an actor has one per lane)


def install(fitter: Fitter) -> None:
    """Listen to the fitter's progress reports and inject the faults the variables name."""
    ran_out_of_memory: set[str] = set()
    _FITTERS.append(fitter)
    failing = _named(FAULT_NO_CREDENTIALS_WORKERS, fitter.worker)
    if failing:
        _without_credentials(fitter)
    failing = failing or _named(FAULT_CUDA_WORKERS, fitter.worker)

    def on_step(job_id: str, step: int) -> None:
        _die_once(job_id)
        _crash(job_id)
        if not failing:
            _hold_for_failures()
        if os.environ.get(FAULT_OOM_JOB) == job_id and job_id not in ran_out_of_memory:
            ran_out_of_memory.add(job_id)
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected by a test)")
        if _named(FAULT_CUDA_WORKERS, fitter.worker):
            _record_failure()
            raise RuntimeError("CUDA error: an illegal memory access was encountered (injected)")
        if os.environ.get(FAULT_STALL_JOB) == job_id and _first_time(FAULT_STALL_MARKER):
            time.sleep(HOLD_SECONDS)  # no step, no heartbeat: stalled
        if os.environ.get(FAULT_SLOW_JOB) == job_id:
            deadline = time.monotonic() + HOLD_SECONDS
            while time.monotonic() < deadline:  # alive and reporting, but never done
                time.sleep(0.1)
                fitter.heartbeat()

    fitter.step_listeners.append(on_step)


def _named(variable: str, worker: str) -> bool:
    names = [name.strip() for name in os.environ.get(variable, "").split(",") if name.strip()]
    return "*" in names or worker in names


def _without_credentials(fitter: Fitter) -> None:
    from botocore.exceptions import NoCredentialsError

    def read_bytes(uri: str) -> bytes:
        _record_failure()
        raise NoCredentialsError()

    fitter.storage.read_bytes = read_bytes  # type: ignore[method-assign]


def _record_failure() -> None:
    folder = os.environ.get(FAULT_RECORD_DIR)
    if folder:
        with open(os.path.join(folder, f"{os.getpid()}-{time.monotonic_ns()}"), "w"):
            pass


def _hold_for_failures() -> None:
    folder, wanted = os.environ.get(FAULT_RECORD_DIR), int(os.environ.get(FAULT_HOLD_FOR, "0"))
    deadline = time.monotonic() + HOLD_SECONDS
    while folder and len(os.listdir(folder)) < wanted and time.monotonic() < deadline:
        time.sleep(0.02)


def _first_time(variable: str) -> bool:
    """True once per test (the marker file the variable names, created exclusively; it
    holds the pid of the process that got there: the soak's killer spares it)."""
    marker = os.environ.get(variable)
    if not marker:
        return False
    try:
        handle = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    os.write(handle, str(os.getpid()).encode())
    os.close(handle)
    return True


def _crash(job_id: str) -> None:
    """FAULT_CRASH_JOB: exit the process; other jobs hold while it runs here (see above)."""
    crasher = os.environ.get(FAULT_CRASH_JOB)
    if not crasher:
        return
    deadline = time.monotonic() + HOLD_SECONDS
    if job_id != crasher:
        while _running(crasher) and time.monotonic() < deadline:
            time.sleep(0.02)
        return
    marker = os.environ.get(FAULT_CRASH_MARKER, "")
    if marker and not os.path.exists(marker):
        crowd = int(os.environ.get(FAULT_CRASH_CROWD, "0"))
        while len(_running_others(crasher)) < crowd and time.monotonic() < deadline:
            time.sleep(0.02)
        _first_time(FAULT_CRASH_MARKER)
    os._exit(1)


def _running(job_id: str) -> bool:
    return any(f.progress.get("id") == job_id for f in _FITTERS)


def _running_others(job_id: str) -> list[str]:
    return [f.progress["id"] for f in _FITTERS if f.progress.get("id") not in (None, job_id)]


def _die_once(job_id: str) -> None:
    """Exit the process abruptly the first time the named job runs."""
    marker = os.environ.get(FAULT_MARKER)
    if os.environ.get(FAULT_KILL_JOB) != job_id or not marker:
        return
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return
    os._exit(1)
