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
    ExitCode.JOBS_FAILED: "some job failed on its own input or params, or killed or outran "
    "its worker (or `validate` found problems); 0 instead with --ok-on-bad-input when every "
    "failure is the job's own input or params",
    ExitCode.UNUSABLE: "the manifest or an option is unusable: nothing ran (or a local OUT "
    "was refused for a worker on another machine: see --shared-out)",
    ExitCode.INFRASTRUCTURE: "stopped by the infrastructure: storage unreachable, refused or "
    "full, OUT locked by another live run, workers keep failing, no worker within "
    "--worker-wait; or jobs failed for infrastructure reasons on every try. Finished jobs are "
    "kept; a rerun resumes",
    ExitCode.INTERNAL: "an internal error of dippipe (a defect: please report it)",
    ExitCode.INTERRUPTED: "interrupted (Ctrl-C, SIGTERM); a rerun resumes",
}
