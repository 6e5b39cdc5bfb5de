"""What the driver shows: a live progress bar while jobs run, a summary table at the end.

Where stderr is not a terminal (a pod's log, a batch system's file) the bar does not draw;
``ProgressLines`` then logs one plain progress line every ``--log-every`` seconds instead.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
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
DEFAULT_LOG_EVERY = 60.0  # seconds between progress lines when stderr is not a terminal

Clock = Callable[[], float]


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


def resolve_log_every(setting: float | None, is_terminal: bool) -> float:
    """Seconds between progress lines: ``setting`` when given (0 = off), else
    DEFAULT_LOG_EVERY when stderr is not a terminal (the bar cannot draw there), else off."""
    if setting is not None:
        return max(0.0, setting)
    return 0.0 if is_terminal else DEFAULT_LOG_EVERY


def format_duration(seconds: float) -> str:
    """``33h02m`` from an hour up, ``4m05s`` from a minute up, else ``7s`` (rounded to whole
    seconds; hours are not folded into days)."""
    total = max(0, round(seconds))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def format_rate(value: float) -> str:
    """Two decimals below 10, one below 100, none from 100 up (thousands separated)."""
    if value < 10:
        return f"{value:.2f}"
    if value < 100:
        return f"{value:.1f}"
    return f"{value:,.0f}"


class ProgressLines:
    """Plain-text progress through the "dippipe" logger at INFO, at most one line per
    ``interval`` seconds (0 = never), plus one final line from ``final``. Fed the same counts
    as the Rich bar; ``clock`` is injectable so tests need no sleeping."""

    def __init__(
        self,
        total: int,
        interval: float,
        clock: Clock = time.monotonic,
        logger: logging.Logger | None = None,
        started: float | None = None,
    ) -> None:
        self.total = total
        self.interval = max(0.0, interval)
        self.clock = clock
        self.log = logger or logging.getLogger("dippipe")
        self.started = clock() if started is None else started
        self.next_due = self.started + self.interval
        self.lines = 0

    @property
    def enabled(self) -> bool:
        return self.interval > 0

    def update(self, summary: RunSummary, running: int, live_steps: int) -> str | None:
        """Log (and return) a progress line when one is due; else None."""
        if not self.enabled:
            return None
        now = self.clock()
        if now < self.next_due:
            return None
        self.next_due = now + self.interval
        line = self.line(summary, running, live_steps, now)
        self.log.info("%s", line)
        self.lines += 1
        return line

    def line(self, summary: RunSummary, running: int, live_steps: int, now: float) -> str:
        elapsed = max(now - self.started, 1e-6)
        done = summary.ok + summary.failed
        pending = max(0, self.total - done - running)
        jobs_rate = done / elapsed
        steps_rate = (summary.steps + live_steps) / elapsed
        remaining = max(0, self.total - done)
        if remaining == 0:
            eta = "0s"
        elif jobs_rate > 0 and math.isfinite(remaining / jobs_rate):
            eta = format_duration(remaining / jobs_rate)
        else:
            eta = "-"
        return (
            f"progress: {done:,}/{self.total:,} done ({summary.failed:,} failed), "
            f"{running:,} running, {pending:,} pending, {format_rate(jobs_rate)} jobs/s, "
            f"{format_rate(steps_rate)} steps/s, ETA {eta}"
        )

    def final(self, summary: RunSummary, interrupted: bool = False) -> str | None:
        """The closing line (when lines are on): what ran, rates over the whole run."""
        if not self.enabled:
            return None
        now = self.clock()
        elapsed = max(now - self.started, 1e-6)
        done = summary.ok + summary.failed
        word = "interrupted" if (interrupted or summary.interrupted) else "finished"
        line = (
            f"progress: {word}: {done:,}/{self.total:,} done ({summary.failed:,} failed), "
            f"{max(0, self.total - done):,} not run, {format_rate(done / elapsed)} jobs/s, "
            f"{format_rate(summary.steps / elapsed)} steps/s, {format_duration(elapsed)} elapsed"
        )
        self.log.info("%s", line)
        self.lines += 1
        return line


class ProgressView:
    """A Rich bar: done / failed / running, steps per second (finished + live steps), ETA;
    and, with ``log_every`` > 0, plain progress lines in the log (ProgressLines)."""

    def __init__(
        self,
        console: Console,
        total: int,
        enabled: bool = True,
        log_every: float = 0.0,
        clock: Clock = time.monotonic,
        summary: RunSummary | None = None,
    ) -> None:
        self.clock = clock
        self.started = clock()
        self.lines = ProgressLines(total, log_every, clock=clock, started=self.started)
        self.summary = summary  # for the final line; else the last one given to update
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
        if self.summary is not None:  # the runner marks an interrupted run only after this
            self.lines.final(self.summary, interrupted=isinstance(exc[1], KeyboardInterrupt))

    def update(self, summary: RunSummary, running: int, live_steps: int) -> None:
        self.summary = summary
        self.lines.update(summary, running, live_steps)
        elapsed = max(self.clock() - self.started, 1e-6)
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
