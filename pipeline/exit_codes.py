"""The exit codes of `dippipe run` (and the other commands), one table for people and
orchestrators: README "Exit codes" prints the same table, and a test keeps the two equal.

An orchestrator should retry only ``INFRASTRUCTURE`` (and ``INTERRUPTED``): a rerun resumes,
and nothing else gets better by running the same command again.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    JOBS_FAILED = 1
    UNUSABLE = 2
    INFRASTRUCTURE = 3
    INTERNAL = 4
    INTERRUPTED = 130


MEANINGS = {
    ExitCode.OK: "every job of the manifest has an ok result",
    ExitCode.JOBS_FAILED: "some job failed on its own input or params "
    "(or `validate` found problems); 0 instead with --ok-on-bad-input",
    ExitCode.UNUSABLE: "the manifest, an option or OUT is unusable, or OUT is locked by a "
    "live run: nothing ran",
    ExitCode.INFRASTRUCTURE: "stopped by the infrastructure (workers keep failing, no worker "
    "within --worker-wait, OUT cannot take results); a rerun resumes",
    ExitCode.INTERNAL: "an internal error of dippipe (a defect: please report it)",
    ExitCode.INTERRUPTED: "interrupted (Ctrl-C, SIGTERM); a rerun resumes",
}
