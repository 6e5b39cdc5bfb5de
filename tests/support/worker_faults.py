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


def install(fitter: Fitter) -> None:
    """Listen to the fitter's progress reports and inject the faults the variables name."""
    ran_out_of_memory: set[str] = set()

    def on_step(job_id: str, step: int) -> None:
        _die_once(job_id)
        if os.environ.get(FAULT_OOM_JOB) == job_id and job_id not in ran_out_of_memory:
            ran_out_of_memory.add(job_id)
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected by a test)")

    fitter.step_listeners.append(on_step)


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
