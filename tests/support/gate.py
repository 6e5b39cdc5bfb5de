"""A worker hook (see pipeline/worker.py) that holds one job until the test opens a gate:
``DIPPIPE_GATE_JOB`` names the job, ``DIPPIPE_GATE_FILE`` the file whose existence opens the
gate. Lets a test look at a run while it is certainly still running (no timing guesses)."""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipeline.worker import Fitter

GATE_JOB, GATE_FILE = "DIPPIPE_GATE_JOB", "DIPPIPE_GATE_FILE"
GATE_LIMIT_SECONDS = 300.0  # a test that never opens the gate still ends


def install(fitter: Fitter) -> None:
    def on_step(job_id: str, step: int) -> None:
        if job_id != os.environ.get(GATE_JOB):
            return
        deadline = time.monotonic() + GATE_LIMIT_SECONDS
        while not os.path.exists(os.environ[GATE_FILE]) and time.monotonic() < deadline:
            time.sleep(0.05)

    fitter.step_listeners.append(on_step)
