"""The gallery: one card per shown job, input / restored / reference side by side, its curves.

Element ids are built from positions (`g<section>-<n>`), never from job ids, so any id is safe
and a job shown in two sections still has unique anchors.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from typing import Any

from pipeline.report.media import Thumb


def esc(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


@dataclass(frozen=True)
class Card:
    row: dict  # the job's result row (scan.py SCAN_SCHEMA)
    images: list[tuple[str, Thumb | str]]  # (label, thumbnail or why there is none)
    plot: str | None  # inline SVG made by svg.py (trusted markup), None without a trace
    full_href: str | None  # link to the restored PNG, relative to report.html


def _number(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}g}"


def _metrics(row: dict) -> str:
    stop = row.get("stopped_at")
    reason = row.get("stop_reason")
    items = [
        ("PSNR", "-" if row.get("psnr") is None else f"{row['psnr']:.2f} dB"),
        ("energy", _number(row.get("energy"))),
        ("steps", row.get("iterations")),
        ("kept step", "-" if stop is None else f"{stop}" + (f" ({reason})" if reason else "")),
        ("time", "-" if row.get("seconds") is None else f"{row['seconds']:.1f} s"),
        ("device", row.get("device")),
    ]
    if (row.get("tiles") or 1) > 1:
        items.append(("tiles", row["tiles"]))
    if row.get("notes"):
        items.append(("notes", row["notes"]))
    body = "".join(f"<div><dt>{esc(k)}</dt><dd>{esc(v)}</dd></div>" for k, v in items)
    return f'<dl class="metrics">{body}</dl>'


def _figure(label: str, image: Thumb | str, anchor: str, job_id: str) -> str:
    if isinstance(image, str):
        return (
            f'<figure><div class="missing">{esc(image)}</div>'
            f"<figcaption>{esc(label)}</figcaption></figure>"
        )
    exact = ' class="exact"' if image.original == (image.width, image.height) else ""
    width, height = image.original
    return (
        f'<figure><a href="#{anchor}"><img{exact} src="{image.data_uri}" '
        f'width="{image.width}" height="{image.height}" alt="{esc(label)} of {esc(job_id)}"></a>'
        f"<figcaption>{esc(label)} {width}×{height}</figcaption></figure>"
    )


def _card(card: Card, anchor: str) -> str:
    row = card.row
    figures = "".join(_figure(label, image, anchor, row["id"]) for label, image in card.images)
    plot = card.plot or '<p class="note">no trace recorded</p>'
    full = (
        f'<p class="full"><a href="{esc(card.full_href)}">restored image, full size</a></p>'
        if card.full_href
        else ""
    )
    return (
        f'<article class="job" id="{anchor}"><header><h3>{esc(row["id"])}</h3>'
        f'<span class="task">{esc(row.get("task"))}</span>'
        '<a class="close" href="#_" title="close">×</a></header>'
        f'{_metrics(row)}<div class="images">{figures}</div><div class="plot">{plot}</div>'
        f"{full}</article>"
    )


def render_gallery(sections: list[tuple[str, list[Card]]]) -> str:
    if not sections:
        return '<section id="gallery-0"><h2>Gallery</h2><p class="note">No ok jobs.</p></section>'
    parts = []
    for i, (title, cards) in enumerate(sections):
        body = "".join(_card(card, f"g{i}-{n}") for n, card in enumerate(cards))
        parts.append(
            f'<section id="gallery-{i}" class="gallery"><h2>{esc(title)}</h2>'
            '<p class="note">Click an image to enlarge the job.</p>'
            f'<div class="cards">{body}</div></section>'
        )
    return "".join(parts)
