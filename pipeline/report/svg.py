"""Per-job curves as small inline SVG: energy (log scale) and PSNR against step, stop marked.

Hand-written SVG instead of matplotlib: no dependency, no font cache, ~2 KB per plot, crisp at
any zoom, and no process-global plotting state in a library. Long traces are reduced to the
minimum and maximum of each of a few hundred buckets, so a divergence spike stays visible.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass

import numpy as np

from pipeline.report.data import Trace

WIDTH, HEIGHT = 380, 170
LEFT, RIGHT, TOP, BOTTOM = 52, 46, 32, 30
BUCKETS = 200
ENERGY_COLOUR, PSNR_COLOUR, STOP_COLOUR = "#1f6fb4", "#e07b00", "#c0392b"


@dataclass(frozen=True)
class _Axis:
    """A linear map from data [lo, hi] to pixels [p0, p1]."""

    lo: float
    hi: float
    p0: float
    p1: float

    def __call__(self, values: np.ndarray | float) -> np.ndarray:
        scale = (self.p1 - self.p0) / (self.hi - self.lo or 1.0)
        return self.p0 + (np.asarray(values, dtype=np.float64) - self.lo) * scale


def envelope(values: np.ndarray, buckets: int = BUCKETS) -> np.ndarray:
    """Indices to draw: every point of a short series, else each bucket's min and max."""
    n = len(values)
    if n <= 2 * buckets:
        return np.arange(n)
    keep = {0, n - 1}
    for chunk in np.array_split(np.arange(n), buckets):
        finite = chunk[np.isfinite(values[chunk])]
        if finite.size:
            keep.update((finite[np.argmin(values[finite])], finite[np.argmax(values[finite])]))
    return np.array(sorted(keep))


def _polyline(x: np.ndarray, y: np.ndarray, colour: str) -> str:
    ok = np.isfinite(x) & np.isfinite(y)
    points = " ".join(f"{a:.1f},{b:.1f}" for a, b in zip(x[ok], y[ok], strict=True))
    return f'<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{points}"/>'


def _value_axis(values: np.ndarray, allow_log: bool) -> tuple[np.ndarray, bool, _Axis]:
    """(values to plot, log scale?, axis): log10 when allowed and every value is positive."""
    finite = values[np.isfinite(values)]
    log_scale = allow_log and bool(finite.size) and bool((finite > 0).all())
    shown = np.log10(np.where(values > 0, values, np.nan)) if log_scale else values
    lo, hi = (float(np.nanmin(shown)), float(np.nanmax(shown))) if finite.size else (0.0, 1.0)
    pad = (hi - lo) * 0.05 or abs(lo) * 0.05 or 1.0
    return shown, log_scale, _Axis(lo - pad, hi + pad, HEIGHT - BOTTOM, TOP)


def _text(x: float, y: float, label: str, colour: str = "#333", anchor: str = "start") -> str:
    return (
        f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}" fill="{colour}">'
        f"{html.escape(label)}</text>"
    )


def nice_ticks(lo: float, hi: float, count: int = 4) -> np.ndarray:
    """Round values inside [lo, hi], 1, 2 or 5 times a power of ten apart."""
    if not hi > lo:
        return np.array([lo])
    raw = (hi - lo) / count
    magnitude = 10.0 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    return np.arange(math.ceil(lo / step) * step, hi + step * 1e-9, step)


def _tick_values(axis: _Axis, log_scale: bool) -> list[tuple[float, str]]:
    """(position in plotted units, label): whole decades on a log axis spanning one or more."""
    if not log_scale:
        return [(v, f"{v:.4g}") for v in nice_ticks(axis.lo, axis.hi)]
    if axis.hi - axis.lo >= 1:
        step = max(1, math.ceil((axis.hi - axis.lo) / 4))
        return [
            (e, f"{10.0**e:g}") for e in range(math.ceil(axis.lo), math.floor(axis.hi) + 1, step)
        ]
    values = nice_ticks(10**axis.lo, 10**axis.hi)
    return [(math.log10(v), f"{v:.4g}") for v in values if v > 0]


def _y_ticks(axis: _Axis, x: float, anchor: str, log_scale: bool, colour: str) -> str:
    return "".join(
        _text(x, float(axis(position)) + 3, label, colour, anchor)
        for position, label in _tick_values(axis, log_scale)
    )


def _x_ticks(axis: _Axis) -> str:
    values = sorted({round(v) for v in np.linspace(axis.lo, axis.hi, 3)})
    y = HEIGHT - BOTTOM + 12
    ticks = "".join(_text(float(axis(v)), y, str(v), anchor="middle") for v in values)
    return ticks + _text((LEFT + WIDTH - RIGHT) / 2, HEIGHT - 3, "step", anchor="middle")


def _layer(steps: np.ndarray, values: np.ndarray, x_axis: _Axis, right: bool) -> str:
    """One curve with its own y axis: energy on the left (log), PSNR on the right (linear)."""
    colour = PSNR_COLOUR if right else ENERGY_COLOUR
    keep = envelope(values)
    shown, log_scale, y_axis = _value_axis(values, allow_log=not right)
    x_label, anchor = (WIDTH - RIGHT + 4, "start") if right else (LEFT - 4, "end")
    name = "PSNR (dB)" if right else "energy" + (" (log)" if log_scale else "")
    return (
        _polyline(x_axis(steps[keep]), y_axis(shown[keep]), colour)
        + _y_ticks(y_axis, x_label, anchor, log_scale, colour)
        + _text(WIDTH - RIGHT if right else LEFT, 12, name, colour, "end" if right else "start")
    )


def _stop_marker(x_axis: _Axis, stopped_at: int | None, reason: str | None) -> str:
    if stopped_at is None:
        return ""
    x = float(x_axis(stopped_at))
    label = f"kept step {stopped_at}" + (f" ({reason})" if reason else "")
    right_half = x > (LEFT + WIDTH - RIGHT) / 2
    line = (
        f'<line class="stop" x1="{x:.1f}" x2="{x:.1f}" y1="{TOP}" y2="{HEIGHT - BOTTOM}" '
        f'stroke="{STOP_COLOUR}" stroke-dasharray="4 3"/>'
    )
    # Above the frame, under the axis names: inside it the label would cross the curves.
    x_text, anchor = (x - 3, "end") if right_half else (x + 3, "start")
    return line + _text(x_text, TOP - 6, label, STOP_COLOUR, anchor)


def curve_svg(trace: Trace, stopped_at: int | None = None, reason: str | None = None) -> str:
    """The plot of one job against steps done (trace index + 1), the unit of `stopped_at` and
    `iterations` in the results, so the marker sits where the kept image was made."""
    steps = trace.steps.astype(np.float64) + 1.0
    first, last = (float(steps[0]), float(steps[-1])) if steps.size else (0.0, 1.0)
    x_axis = _Axis(first, max(last, first + 1.0), LEFT, WIDTH - RIGHT)
    body = [
        f'<rect x="{LEFT}" y="{TOP}" width="{WIDTH - LEFT - RIGHT}" '
        f'height="{HEIGHT - TOP - BOTTOM}" fill="#fff" stroke="#ccc"/>',
        _layer(steps, trace.energy, x_axis, right=False),
    ]
    if trace.psnr is not None:
        body.append(_layer(steps, trace.psnr, x_axis, right=True))
    body += [_stop_marker(x_axis, stopped_at, reason), _x_ticks(x_axis)]
    title = "energy" + (" and PSNR" if trace.psnr is not None else "") + " per step"
    return (
        f'<svg class="curve" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {HEIGHT}" '
        f'width="{WIDTH}" height="{HEIGHT}" role="img" font-size="10" font-family="sans-serif">'
        f"<title>{title}</title>{''.join(body)}</svg>"
    )
