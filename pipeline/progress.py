"""What the driver shows: a live progress bar while jobs run, a summary table at the end."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from pipeline.safetext import printable

MAX_ERRORS_SHOWN = 20


@dataclass
class RunSummary:
    """Counts of one `dippipe run`; `exit_code` is non-zero when any manifest job failed."""

    manifest_rows: int = 0
    pending: int = 0
    skipped_ok: int = 0
    skipped_failed: int = 0
    ok: int = 0
    failed: int = 0
    worker_deaths: int = 0
    steps: int = 0
    seconds: float = 0.0  # from starting the workers to the last result
    busy_seconds: float = 0.0  # from the first job handed out to the last result
    interrupted: bool = False
    errors: list[tuple[str, str]] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        if self.interrupted:
            return 130
        return 1 if (self.failed or self.skipped_failed) else 0

    def record(self, job_id: str, ok: bool, iterations: int | None, error: str | None) -> None:
        if ok:
            self.ok += 1
            self.steps += iterations or 0
        else:
            self.failed += 1
            if len(self.errors) < MAX_ERRORS_SHOWN:
                self.errors.append((job_id, error or ""))

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "errors"}


class ProgressView:
    """A Rich bar: done / failed / running, steps per second (finished + live steps), ETA."""

    def __init__(self, console: Console, total: int, enabled: bool = True) -> None:
        self.started = time.monotonic()
        self.progress = Progress(
            TextColumn("[bold]restoring"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn(
                "[green]{task.fields[ok]} ok[/] [red]{task.fields[failed]} failed[/] "
                "[cyan]{task.fields[running]} running[/] {task.fields[rate]} steps/s"
            ),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=console,
            disable=not enabled,
            transient=False,
        )
        self.task = self.progress.add_task("run", total=total, ok=0, failed=0, running=0, rate="-")

    def __enter__(self) -> ProgressView:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def update(self, summary: RunSummary, running: int, live_steps: int) -> None:
        elapsed = max(time.monotonic() - self.started, 1e-6)
        rate = (summary.steps + live_steps) / elapsed
        self.progress.update(
            self.task,
            completed=summary.ok + summary.failed,
            ok=summary.ok,
            failed=summary.failed,
            running=running,
            rate=f"{rate:.1f}",
        )


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
        ("worker processes replaced", summary.worker_deaths),
    ]
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
