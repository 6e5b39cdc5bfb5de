"""What the driver shows: a live progress bar while jobs run, a summary table at the end.

Where stderr is not a terminal (a pod's log, a batch system's file) the bar does not draw;
``ProgressLines`` then logs one plain progress line every ``--log-every`` seconds instead.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from pipeline.summary import RunSummary

DEFAULT_LOG_EVERY = 60.0  # seconds between progress lines when stderr is not a terminal

Clock = Callable[[], float]


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
