"""A run's counts, the exit code they mean (exit_codes.py), and the tables printed at the end."""

from __future__ import annotations

from dataclasses import dataclass, field

from rich.table import Table
from rich.text import Text

from pipeline.exit_codes import ExitCode
from pipeline.outputs import KIND_INFRA, KIND_JOB, STATUS_OK
from pipeline.safetext import printable

MAX_ERRORS_SHOWN = 20


@dataclass
class RunSummary:
    """Counts of one `dippipe run`. Failures are counted by their ``error_kind``
    (outputs.py): a job's own bad input or params, or the infrastructure's."""

    manifest_rows: int = 0
    pending: int = 0
    skipped_ok: int = 0
    skipped_failed: int = 0
    skipped_failed_bad_input: int = 0  # of skipped_failed: the job's own input or params
    changed_specs: int = 0  # finished ids whose spec changed since (spec.py)
    ok: int = 0
    failed: int = 0
    failed_bad_input: int = 0  # of failed: the job's own input or params (KIND_JOB)
    failed_infrastructure: int = 0  # of failed: infrastructure on every try (KIND_INFRA)
    worker_deaths: int = 0
    infrastructure_retries: int = 0  # jobs sent back to the queue after an infrastructure error
    timeouts: int = 0  # jobs stopped at --job-timeout (their worker replaced)
    stalls: int = 0  # workers replaced after --stall-seconds without progress
    steps: int = 0
    seconds: float = 0.0  # from starting the workers to the last result
    busy_seconds: float = 0.0  # from the first job handed out to the last result
    interrupted: bool = False
    errors: list[tuple[str, str]] = field(default_factory=list)

    def exit_code(self, ok_on_bad_input: bool = False) -> ExitCode:
        """What the run's outcome means for its caller (exit_codes.py). ``ok_on_bad_input``:
        failures of the jobs' own inputs alone do not make the run fail."""
        if self.interrupted:
            return ExitCode.INTERRUPTED
        if self.failed_infrastructure:
            return ExitCode.INFRASTRUCTURE
        failed = self.failed + self.skipped_failed
        if ok_on_bad_input:
            failed -= self.failed_bad_input + self.skipped_failed_bad_input
        return ExitCode.JOBS_FAILED if failed else ExitCode.OK

    def record(self, row: dict) -> None:
        """Count one committed results row."""
        if row.get("status") == STATUS_OK:
            self.ok += 1
            self.steps += row.get("iterations") or 0
            return
        self.failed += 1
        kind = row.get("error_kind")
        self.failed_bad_input += kind == KIND_JOB
        self.failed_infrastructure += kind == KIND_INFRA
        if len(self.errors) < MAX_ERRORS_SHOWN:
            self.errors.append((row["id"], row.get("error") or ""))

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "errors"}


def summary_table(summary: RunSummary, out: str) -> Table:
    table = Table(title=f"dippipe run -> {out}", show_header=True)
    table.add_column("what")
    table.add_column("count", justify="right")
    rows = [
        ("manifest rows", summary.manifest_rows),
        ("already ok (skipped)", summary.skipped_ok),
        ("failed earlier (skipped; --retry-failed reruns them)", summary.skipped_failed),
        ("ran: ok", summary.ok),
        ("ran: failed", summary.failed),
        ("  of which the job's own input or params", summary.failed_bad_input),
        ("  of which infrastructure (a plain rerun retries them)", summary.failed_infrastructure),
        ("infrastructure errors retried", summary.infrastructure_retries),
        ("jobs past --job-timeout", summary.timeouts),
        ("workers stalled (--stall-seconds)", summary.stalls),
        ("worker processes replaced", summary.worker_deaths),
    ]
    if summary.changed_specs:
        rows.append(("finished ids whose spec changed", summary.changed_specs))
    for name, value in rows:
        table.add_row(name, str(value))
    ran = summary.ok + summary.failed
    if ran:
        table.add_row("seconds (wall)", f"{summary.seconds:.1f}")
        table.add_row("jobs per minute", f"{60 * ran / max(summary.seconds, 1e-6):.2f}")
        table.add_row("steps per second", f"{summary.steps / max(summary.seconds, 1e-6):.1f}")
    return table


def errors_table(summary: RunSummary) -> Table:
    table = Table(title="failed jobs (first 20)", show_header=True)
    table.add_column("id")
    table.add_column("error", overflow="fold")
    for job_id, error in summary.errors:  # Text: never read as markup; escapes made visible
        table.add_row(Text(printable(job_id)), Text(printable(error, 2000)))
    return table
