"""Building OUT/report.html, one self-contained file, written where OUT is.

Steps, each streaming (see the modules): one pass over the results (scan: totals and the
ranked few jobs the gallery shows, pick), then for those jobs only their manifest rows,
traces and images (data, media), then the page (html, cards, svg, style). Memory and
time grow with the gallery size, not with the run, apart from one pass over the results'
projected columns.
"""

from __future__ import annotations

import webbrowser
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from rich.console import Console

from pipeline.errors import DippipeError
from pipeline.outputs import image_uri, shard_of
from pipeline.report.cards import Card
from pipeline.report.data import read_inputs, read_run_info, read_traces
from pipeline.report.html import ReportModel, render_page
from pipeline.report.media import Thumb, load_thumbnails
from pipeline.report.pick import SORT_MODES, GalleryPicker, Section
from pipeline.report.scan import RunStats, iter_results
from pipeline.report.svg import curve_svg
from pipeline.storage import Storage, join, protocol_of

REPORT_NAME = "report.html"


class ReportError(DippipeError, RuntimeError):
    """Nothing to report (no results and no run.json: probably not a run's OUT)."""


@dataclass(frozen=True)
class ReportOptions:
    gallery: int = 48  # jobs shown at most, over all gallery sections
    sort: str = "psnr"  # "psnr" (PSNR with a reference, energy without) or "energy"
    thumb: int = 256  # longest edge of embedded images; smaller images are embedded exactly
    max_failures: int = 500  # failed jobs listed one by one (all are counted)

    def __post_init__(self) -> None:
        if self.sort not in SORT_MODES:
            raise ValueError(f"sort must be one of {', '.join(SORT_MODES)}, got {self.sort!r}")
        if self.gallery < 0 or self.thumb < 16 or self.max_failures < 0:
            raise ValueError("gallery and max_failures must be >= 0 and thumb >= 16 pixels")


@dataclass(frozen=True)
class ReportResult:
    uri: str
    jobs: int
    failed: int
    shown: int


def scan_results(
    storage: Storage, out: str, options: ReportOptions
) -> tuple[RunStats, list[Section]]:
    """One pass over OUT/results: (RunStats, gallery sections)."""
    stats = RunStats(max_failures=options.max_failures)
    picker = GalleryPicker(options.sort, options.gallery)
    for table in iter_results(storage, out):
        stats.add(table)
        picker.add(table)
    return stats, picker.sections()


def _manifest_inputs(
    storage: Storage, run_info: dict | None, ids: list[str], notes: list[str]
) -> dict[str, dict]:
    """id -> manifest URIs of the shown jobs; a note instead when the manifest is unreachable."""
    manifest = ((run_info or {}).get("config") or {}).get("manifest")
    if not ids:
        return {}
    if not manifest:
        notes.append("run.json names no manifest: inputs and references are not shown.")
        return {}
    try:
        return read_inputs(storage, manifest, ids)
    except (OSError, ValueError) as error:  # pyarrow's errors are ValueError / OSError
        notes.append(f"manifest {manifest} unreadable ({error}): inputs are not shown.")
        return {}


def _restored_extension(row: dict) -> str:
    """The restored image's extension, from the row's `output` (PNG or TIFF; PNG for rows
    written before outputs could be TIFF); its folder comes from OUT's layout."""
    name = (row.get("output") or "").rsplit("/", 1)[-1]
    return "tif" if name == f"{row['id']}.tif" else "png"


def _image_slots(out: str, row: dict, inputs: dict | None) -> list[tuple[str, str | None, str]]:
    """(label, URI or None, why it is missing) for input / restored / reference."""
    missing_input = "manifest unavailable" if inputs is None else "no input URI"
    reference = None if inputs is None else inputs.get("reference")
    return [
        ("input", None if inputs is None else inputs.get("image"), missing_input),
        ("restored", image_uri(out, row["id"], _restored_extension(row)), ""),
        ("reference", reference, "no reference" if inputs is not None else missing_input),
    ]


def _cards(
    storage: Storage,
    out: str,
    rows: list[dict],
    options: ReportOptions,
    run_info: dict | None,
    notes: list[str],
) -> dict[str, Card]:
    """Card per shown job id (inputs, traces and thumbnails fetched for these jobs only)."""
    ids = list(dict.fromkeys(row["id"] for row in rows))
    inputs = _manifest_inputs(storage, run_info, ids, notes)
    traces = read_traces(storage, out, {row["id"]: row["shard"] for row in rows})
    slots = {row["id"]: _image_slots(out, row, inputs.get(row["id"])) for row in rows}
    uris = [uri for job in slots.values() for _, uri, _ in job if uri]
    thumbs = load_thumbnails(storage, uris, options.thumb)
    cards = {}
    for row in rows:
        images: list[tuple[str, Thumb | str]] = [
            (label, thumbs[uri] if uri else why) for label, uri, why in slots[row["id"]]
        ]
        trace = traces.get(row["id"])
        plot = curve_svg(trace, row.get("stopped_at"), row.get("stop_reason")) if trace else None
        href = f"images/{shard_of(row['id'])}/{row['id']}.{_restored_extension(row)}"
        cards[row["id"]] = Card(row, images, plot, href)
    return cards


def build_report(storage: Storage, out: str, options: ReportOptions | None = None) -> ReportResult:
    """Write OUT/report.html and say what it holds."""
    options = options or ReportOptions()
    stats, sections = scan_results(storage, out, options)
    rows = [row for section in sections for row in section.rows]
    notes: list[str] = []
    run_info = read_run_info(storage, out)
    if stats.ok + stats.failed == 0:
        if run_info is None:
            raise ReportError(f"nothing to report: no results and no run.json under {out}")
        notes.append("no results yet: the run has not finished any job.")
    cards = _cards(storage, out, rows, options, run_info, notes)
    model = ReportModel(
        out=out,
        generated_at=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        stats=stats,
        run_info=run_info,
        sections=[(s.title, [cards[row["id"]] for row in s.rows]) for s in sections],
        notes=notes,
    )
    uri = join(out, REPORT_NAME)
    storage.write_bytes(uri, render_page(model).encode("utf-8"))
    return ReportResult(uri, stats.ok + stats.failed, stats.failed, len(set(cards)))


def open_in_browser(uri: str) -> bool:
    """Open a local report; a remote one has no file:// URL, so the caller says where it is."""
    if protocol_of(uri) != "file":
        return False
    path = Path(uri.removeprefix("file://")).resolve()
    return webbrowser.open(path.as_uri())


def run_report(
    storage: Storage, out: str, options: ReportOptions, open_browser: bool, console: Console
) -> None:
    """What `dippipe report` does after parsing its flags."""
    result = build_report(storage, out, options)
    console.print(
        f"wrote {result.uri}: {result.jobs:,} jobs ({result.failed:,} failed), "
        f"{result.shown} in the gallery"
    )
    if open_browser and not open_in_browser(result.uri):
        console.print(f"{result.uri} is not on this machine; download it to open it.")
