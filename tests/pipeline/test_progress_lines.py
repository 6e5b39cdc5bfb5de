"""Plain progress lines for logs that are not a terminal (a pod's log): at most one per
interval, the bar's counts, an ETA; a fake clock, never sleeping."""

from __future__ import annotations

import logging

import pytest
from rich.console import Console
from typer.testing import CliRunner

import pipeline.cli as cli
from pipeline.progress import (
    DEFAULT_LOG_EVERY,
    ProgressLines,
    ProgressView,
    RunSummary,
    format_duration,
    format_rate,
    resolve_log_every,
)


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def quiet_console() -> Console:
    return Console(stderr=True, quiet=True)


def progress_records(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("progress:")]


def test_lines_only_at_the_interval_with_the_runs_figures(caplog):
    clock = FakeClock()
    lines = ProgressLines(total=50_000, interval=60, clock=clock)
    summary = RunSummary(pending=50_000)
    emitted = []
    with caplog.at_level(logging.INFO, logger="dippipe"):
        for tick in range(1, 241):  # two minutes of the scheduler's 0.5 s ticks
            clock.now = 1000.0 + tick * 0.5
            summary.ok, summary.failed = tick, tick // 40
            summary.steps = 100 * summary.ok
            line = lines.update(summary, running=8, live_steps=20)
            if line:
                emitted.append((clock.now, line, summary.ok, summary.failed))
    assert [when for when, *_ in emitted] == [1060.0, 1120.0]
    assert progress_records(caplog) == [line for _, line, *_ in emitted]
    when, line, ok, failed = emitted[0]
    elapsed = when - 1000.0
    done = ok + failed
    jobs_rate = done / elapsed
    steps_rate = (100 * ok + 20) / elapsed
    eta = format_duration((50_000 - done) / jobs_rate)
    assert line == (
        f"progress: {done:,}/50,000 done ({failed} failed), 8 running, "
        f"{50_000 - done - 8:,} pending, {jobs_rate:.2f} jobs/s, {steps_rate:.0f} steps/s, "
        f"ETA {eta}"
    )
    assert line == (
        "progress: 123/50,000 done (3 failed), 8 running, 49,869 pending, 2.05 jobs/s, "
        "200 steps/s, ETA 6h45m"
    )


def test_a_late_tick_does_not_bring_a_burst_of_lines():
    clock = FakeClock(0.0)
    lines = ProgressLines(total=10, interval=30, clock=clock)
    summary = RunSummary(pending=10)
    clock.now = 300.0  # the driver stalled for ten intervals
    assert lines.update(summary, 0, 0) is not None
    assert lines.update(summary, 0, 0) is None
    clock.now = 329.9
    assert lines.update(summary, 0, 0) is None
    clock.now = 330.0
    assert lines.update(summary, 0, 0) is not None
    assert lines.lines == 2


def test_no_lines_when_the_interval_is_zero(caplog):
    clock = FakeClock()
    lines = ProgressLines(total=5, interval=0, clock=clock)
    summary = RunSummary(pending=5, ok=2)
    with caplog.at_level(logging.DEBUG, logger="dippipe"):
        for step in range(1000):
            clock.now += 60.0 * step
            assert lines.update(summary, 1, 0) is None
        assert lines.final(summary) is None
    assert progress_records(caplog) == []
    assert lines.lines == 0


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (7.4, "7s"),
        (59.6, "1m00s"),
        (245, "4m05s"),
        (3599, "59m59s"),
        (3600, "1h00m"),
        (33 * 3600 + 2 * 60 + 30, "33h02m"),
        (250 * 3600 + 59 * 60, "250h59m"),
        (-5, "0s"),
    ],
)
def test_eta_format(seconds, text):
    assert format_duration(seconds) == text


@pytest.mark.parametrize("seconds", [0, 1, 59, 61, 3601, 86_399, 123_456])
def test_eta_format_closed_form(seconds):
    h, m, s = seconds // 3600, seconds // 60 % 60, seconds % 60
    expected = f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")
    assert format_duration(seconds) == expected


def test_rates_and_unknown_eta():
    assert [format_rate(x) for x in (0.4123, 12.345, 612.4, 12_345.6)] == [
        "0.41",
        "12.3",
        "612",
        "12,346",
    ]
    clock = FakeClock(0.0)
    lines = ProgressLines(total=4, interval=1, clock=clock)
    clock.now = 2.0
    assert lines.update(RunSummary(pending=4), 4, 0).endswith("ETA -")  # nothing done yet
    clock.now = 4.0
    done = RunSummary(pending=4, ok=3, failed=1, steps=40)
    assert lines.update(done, 0, 0) == (
        "progress: 4/4 done (1 failed), 0 running, 0 pending, 1.00 jobs/s, 10.0 steps/s, ETA 0s"
    )


def test_default_interval_only_where_the_bar_cannot_draw():
    assert resolve_log_every(None, is_terminal=False) == DEFAULT_LOG_EVERY == 60
    assert resolve_log_every(None, is_terminal=True) == 0
    assert resolve_log_every(0, is_terminal=False) == 0
    assert resolve_log_every(5, is_terminal=True) == 5


def test_view_with_the_bar_off_logs_lines_and_a_final_one(caplog):
    clock = FakeClock(0.0)
    summary = RunSummary(pending=10)
    view = ProgressView(
        quiet_console(), 10, enabled=False, log_every=10, clock=clock, summary=summary
    )
    with caplog.at_level(logging.INFO, logger="dippipe"), view:
        for tick in range(1, 61):  # 30 s at 0.5 s
            clock.now = tick * 0.5
            summary.ok = tick // 6
            summary.steps = 50 * summary.ok
            view.update(summary, 1, 0)
    records = progress_records(caplog)
    assert len(records) == 4  # at 10, 20, 30 s, and the final line
    assert records[0].startswith(
        "progress: 3/10 done (0 failed), 1 running, 6 pending, 0.30 jobs/s"
    )
    assert records[-1] == (
        "progress: finished: 10/10 done (0 failed), 0 not run, 0.33 jobs/s, 16.7 steps/s, "
        "30s elapsed"
    )


def test_view_says_interrupted_and_is_silent_when_off(caplog):
    clock = FakeClock(0.0)
    summary = RunSummary(pending=10, ok=4)
    interrupted = ProgressView(
        quiet_console(), 10, enabled=False, log_every=60, clock=clock, summary=summary
    )
    off = ProgressView(
        quiet_console(), 10, enabled=False, log_every=0, clock=clock, summary=summary
    )
    with caplog.at_level(logging.INFO, logger="dippipe"):
        with pytest.raises(KeyboardInterrupt), interrupted:
            clock.now = 8.0
            raise KeyboardInterrupt
        with off:
            clock.now = 1e6
    assert progress_records(caplog) == [
        "progress: interrupted: 4/10 done (0 failed), 6 not run, 0.50 jobs/s, 0.00 steps/s, "
        "8s elapsed"
    ]


@pytest.mark.parametrize(
    ("args", "expected"), [([], None), (["--log-every", "15"], 15.0), (["--log-every", "0"], 0.0)]
)
def test_log_every_flag_reaches_the_run_config(tmp_path, monkeypatch, args, expected):
    seen = []

    def fake_run(config, console):
        seen.append(config)
        return RunSummary()

    monkeypatch.setattr(cli, "run", fake_run)
    result = CliRunner().invoke(
        cli.app, ["run", str(tmp_path / "none.parquet"), "--out", str(tmp_path / "out"), *args]
    )
    assert result.exit_code == 0, result.output
    assert [config.log_every for config in seen] == [expected]


def test_negative_log_every_is_refused(tmp_path):
    result = CliRunner().invoke(
        cli.app, ["run", str(tmp_path / "none.parquet"), "--out", "x", "--log-every", "-1"]
    )
    assert result.exit_code == 2


def test_logs_off_a_terminal_are_one_plain_line_per_record(capsys, monkeypatch):
    """In a pod's log (stderr not a terminal), a long line stays one line: grep finds it."""
    import logging

    from pipeline import cli

    logger = logging.getLogger("dippipe")
    monkeypatch.setattr(logger, "handlers", list(logger.handlers))
    monkeypatch.setattr(logger, "propagate", logger.propagate)
    monkeypatch.setattr(logger, "level", logger.level)
    assert not cli.console.is_terminal  # pytest captures stderr
    cli._setup_logging(quiet=False)
    message = "progress: " + "x" * 300
    logger.info(message)
    lines = [line for line in capsys.readouterr().err.splitlines() if "progress:" in line]
    assert len(lines) == 1 and lines[0].endswith(message) and " INFO " in lines[0]
