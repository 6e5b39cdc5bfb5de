"""report.html from a ReportModel: the page, the summary and the failed jobs.

Every value that comes from the run (ids, errors, URIs, run.json) goes through `esc`: an error
message is arbitrary text and must never become markup. The gallery cards are in cards.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from pipeline.report.cards import Card, esc, render_gallery
from pipeline.report.scan import RunStats
from pipeline.report.style import CSS

MAX_ERROR_KINDS = 20
OPEN_FAILURES = 20  # more failed jobs than this: their list starts folded


@dataclass(frozen=True)
class ReportModel:
    out: str
    generated_at: str
    stats: RunStats
    run_info: dict | None
    sections: list[tuple[str, list[Card]]]
    notes: list[str] = field(default_factory=list)


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


def device_time(seconds: float) -> str:
    """Hours for real runs; minutes or seconds for the small ones that would read 0.00 h."""
    if seconds >= 360:
        return f"{seconds / 3600:.2f} h"
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.1f} s"


def timestamp(value: str | None) -> str:
    """run.json's ISO times without microseconds."""
    if not value:
        return "(unfinished)"
    try:
        return datetime.fromisoformat(value).strftime("%Y-%m-%d %H:%M:%S %Z").strip()
    except ValueError:
        return value


def render_page(model: ReportModel) -> str:
    stats = model.stats
    links = [("summary", "Summary"), ("failed", f"Failed jobs ({stats.failed})")]
    links += [(f"gallery-{i}", title) for i, (title, _) in enumerate(model.sections)]
    nav = "".join(f'<a href="#{anchor}">{esc(text)}</a>' for anchor, text in links)
    notes = "".join(f'<p class="warning">{esc(note)}</p>' for note in model.notes)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>dippipe report: {esc(model.out)}</title><style>{CSS}</style></head><body>"
        f'<header class="top"><h1>dippipe report</h1><p>{esc(model.out)}</p>'
        f"<p>generated {esc(model.generated_at)}</p></header><nav>{nav}</nav><main>{notes}"
        f"{_summary(model)}{_failures(stats)}{render_gallery(model.sections)}"
        "</main></body></html>\n"
    )


def _tile(label: str, value: str, kind: str = "") -> str:
    return f'<div class="tile {kind}"><dt>{esc(label)}</dt><dd>{esc(value)}</dd></div>'


def _summary(model: ReportModel) -> str:
    s = model.stats
    wall = None if s.first_start is None or s.last_end is None else s.last_end - s.first_start
    # Jobs that failed before getting a device ("none") held no device: not device time.
    device_hours = ", ".join(
        f"{kind} {device_time(seconds)}"
        for kind, seconds in sorted(s.device_seconds.items())
        if kind != "none"
    )
    tiles = (
        _tile("jobs", f"{s.ok + s.failed:,}")
        + _tile("ok", f"{s.ok:,}", "ok")
        + _tile("failed", f"{s.failed:,}", "bad" if s.failed else "")
        + _tile("wall time, jobs (h:mm:ss)", duration(wall))
        + _tile("device time", device_hours or "-")
        + _tile("steps", f"{s.steps:,}")
    )
    reasons = ", ".join(f"{esc(k)}: {v:,}" for k, v in s.stop_reasons.most_common())
    return (
        f'<section id="summary"><h2>Summary</h2><dl class="tiles">{tiles}</dl>'
        f"{_task_table(s)}"
        + (f'<p class="note">stop reasons of ok jobs: {reasons}</p>' if reasons else "")
        + f"{_run_info(model.run_info)}</section>"
    )


def _task_table(stats: RunStats) -> str:
    rows = []
    for task, t in sorted(stats.tasks.items()):
        median = t.median_psnr
        rows.append(
            f"<tr><td>{esc(task)}</td><td class='num'>{t.ok:,}</td>"
            f"<td class='num'>{t.failed:,}</td>"
            f"<td class='num'>{'-' if median is None else f'{median:.2f}'}</td>"
            f"<td class='num'>{device_time(t.device_seconds)}</td></tr>"
        )
    return (
        '<table class="tasks"><thead><tr><th>task</th><th>ok</th><th>failed</th>'
        "<th>median PSNR (dB)</th><th>device time</th></tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table>"
    )


def _run_info(info: dict | None) -> str:
    if not info:
        return '<p class="note">run.json: missing or unreadable.</p>'
    config = info.get("config") or {}
    versions = info.get("versions") or {}
    items = {
        "manifest": config.get("manifest"),
        "last run": (
            f"{timestamp(info.get('started_at'))} to {timestamp(info.get('finished_at'))}"
            if info.get("started_at")
            else None
        ),
        "host": info.get("host"),
        "workers": len(info.get("workers") or []),
        "versions": ", ".join(f"{k} {v}" for k, v in versions.items() if v),
    }
    body = "".join(f"<dt>{esc(k)}</dt><dd>{esc(v) or '-'}</dd>" for k, v in items.items())
    return f'<h3>Last run (run.json)</h3><dl class="run">{body}</dl>'


def _failures(stats: RunStats) -> str:
    if not stats.failed:
        return '<section id="failed"><h2>Failed jobs</h2><p class="note">None.</p></section>'
    kinds = "".join(
        f"<tr><td class='error'>{esc(kind)}</td><td class='num'>{count:,}</td></tr>"
        for kind, count in stats.error_kinds.most_common(MAX_ERROR_KINDS)
    )
    rows = "".join(
        f"<tr><td>{esc(f['id'])}</td><td>{esc(f['task'])}</td>"
        f"<td class='num'>{esc(f['attempts'])}</td><td class='error'>{esc(f['error'])}</td></tr>"
        for f in stats.failures
    )
    shown = len(stats.failures)
    listed = f"first {shown:,} of {stats.failed:,}" if shown < stats.failed else f"all {shown:,}"
    # A long list is folded (<details>, no script) so the gallery stays within reach.
    opened = " open" if shown <= OPEN_FAILURES else ""
    return (
        f'<section id="failed"><h2>Failed jobs ({stats.failed:,})</h2>'
        '<table class="error-kinds"><thead><tr><th>error</th><th>jobs</th></tr></thead>'
        f"<tbody>{kinds}</tbody></table><details{opened}><summary>failed jobs one by one "
        f"({listed})</summary>"
        '<table class="failed"><thead><tr><th>id</th><th>task</th><th>attempts</th>'
        f"<th>error</th></tr></thead><tbody>{rows}</tbody></table></details></section>"
    )
