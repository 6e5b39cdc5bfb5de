"""One streaming pass over OUT/results for the report: totals, and the few jobs to show.

Results are read shard by shard (the live ones, a few read ahead in parallel: see outputs.py),
batch by batch, with a column projection (never the columns the report does not use). Per
batch, counts and sums are added up and every ranking keeps only its top-k rows, so a
100,000-job run costs a few hundred kept rows plus one float per PSNR (exact medians), never
the whole table. Each kept row remembers its results shard: its trace lives in the traces shard
of the same name (see outputs.py).
"""

from __future__ import annotations

import collections
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.outputs import RESULT_SCHEMA, STATUS_OK, iter_result_shards
from pipeline.storage import Storage

# `output` gives only the restored image's file name (PNG or TIFF): the folder is found by
# OUT's layout, so a moved OUT still works.
COLUMNS = (
    *("id", "task", "status", "error", "output", "iterations", "energy", "psnr", "seconds"),
    *("device", "attempts", "stopped_at", "stop_reason", "finished_at", "notes", "tiles"),
)
SCAN_SCHEMA = pa.schema([RESULT_SCHEMA.field(name) for name in COLUMNS]).append(
    pa.field("shard", pa.string())
)
BATCH_ROWS = 8192
MAX_ERROR_GROUPS = 200  # distinct error kinds kept; the rest are counted as "other"


@dataclass
class TaskStats:
    ok: int = 0
    failed: int = 0
    device_seconds: float = 0.0
    psnrs: list[np.ndarray] = field(default_factory=list)

    @property
    def median_psnr(self) -> float | None:
        values = np.concatenate(self.psnrs) if self.psnrs else np.empty(0)
        values = values[np.isfinite(values)]
        return float(np.median(values)) if values.size else None


@dataclass
class RunStats:
    """Totals over every result row, built batch by batch."""

    max_failures: int = 500
    ok: int = 0
    failed: int = 0
    steps: int = 0
    first_start: float | None = None  # epoch seconds: earliest finished_at - seconds
    last_end: float | None = None
    device_seconds: collections.Counter = field(default_factory=collections.Counter)
    tasks: dict[str, TaskStats] = field(default_factory=dict)
    stop_reasons: collections.Counter = field(default_factory=collections.Counter)
    error_kinds: collections.Counter = field(default_factory=collections.Counter)
    failures: list[dict] = field(default_factory=list)  # the first `max_failures` failed rows

    def add(self, table: pa.Table) -> None:
        ok = pc.fill_null(pc.equal(table.column("status"), STATUS_OK), False)
        n_ok = pc.sum(ok).as_py() or 0
        self.ok += n_ok
        self.failed += table.num_rows - n_ok
        self.steps += pc.sum(pc.filter(table.column("iterations"), ok)).as_py() or 0
        self.stop_reasons.update(pc.filter(table.column("stop_reason"), ok).drop_null().to_pylist())
        self._add_tasks(table, ok)
        self._add_devices(table)
        self._add_times(table)
        self._add_failures(table.filter(pc.invert(ok)))

    def _add_tasks(self, table: pa.Table, ok: pa.Array) -> None:
        tasks = pc.fill_null(table.column("task"), "?")
        seconds = pc.fill_null(table.column("seconds"), 0.0)
        for task in pc.unique(tasks).to_pylist():
            mine = pc.equal(tasks, task)
            stats = self.tasks.setdefault(task, TaskStats())
            n_ok = pc.sum(pc.and_(mine, ok)).as_py() or 0
            stats.ok += n_ok
            stats.failed += (pc.sum(mine).as_py() or 0) - n_ok
            stats.device_seconds += pc.sum(pc.filter(seconds, mine)).as_py() or 0.0
            psnr = pc.filter(table.column("psnr"), pc.and_(mine, ok)).drop_null()
            if len(psnr):
                stats.psnrs.append(psnr.to_numpy(zero_copy_only=False))

    def _add_devices(self, table: pa.Table) -> None:
        # "cuda:3" and "cuda" are the same kind of device for device-hours.
        devices = pc.fill_null(table.column("device"), "none").to_pylist()
        seconds = pc.fill_null(table.column("seconds"), 0.0).to_pylist()
        for device, spent in zip(devices, seconds, strict=True):
            self.device_seconds[device.split(":", 1)[0]] += spent

    def _add_times(self, table: pa.Table) -> None:
        ends = table.column("finished_at").cast(pa.int64()).to_numpy(zero_copy_only=False)
        seconds = pc.fill_null(table.column("seconds"), 0.0).to_numpy(zero_copy_only=False)
        ends = np.asarray(ends, dtype=np.float64) / 1000.0  # ms since the epoch; nulls -> NaN
        known = np.isfinite(ends)
        if not known.any():
            return
        first = float(np.min(ends[known] - seconds[known]))
        last = float(np.max(ends[known]))
        self.first_start = first if self.first_start is None else min(self.first_start, first)
        self.last_end = last if self.last_end is None else max(self.last_end, last)

    def _add_failures(self, failed: pa.Table) -> None:
        for error in failed.column("error").to_pylist():
            self.error_kinds[_error_kind(error)] += 1
        room = self.max_failures - len(self.failures)
        if room > 0 and failed.num_rows:
            columns = ["id", "task", "error", "attempts", "seconds", "device"]
            self.failures.extend(failed.select(columns).slice(0, room).to_pylist())


def _error_kind(error: str | None) -> str:
    """What an error says before its details: 'image not found: /a/b.png' -> 'image not found'.

    Paths and sizes make nearly every message unique; the kind is what groups them usefully."""
    if not error:
        return "(no message)"
    return error.split(":", 1)[0].strip()[:120] or "(no message)"


def iter_results(storage: Storage, out: str, batch_rows: int = BATCH_ROWS) -> Iterator[pa.Table]:
    """Every result row as SCAN_SCHEMA tables of at most `batch_rows` rows."""
    for shard, table in iter_result_shards(storage, out, COLUMNS):
        for batch in table.to_batches(max_chunksize=batch_rows):
            yield _conform(pa.Table.from_batches([batch], schema=table.schema), shard)


def _conform(table: pa.Table, shard: str) -> pa.Table:
    """Older shards may lack the columns beyond the contract: they become nulls."""
    present = set(table.column_names)
    columns = [
        table.column(f.name).cast(f.type) if f.name in present else pa.nulls(table.num_rows, f.type)
        for f in SCAN_SCHEMA
        if f.name != "shard"
    ]
    columns.append(pa.array([shard] * table.num_rows, pa.string()))
    return pa.Table.from_arrays(columns, schema=SCAN_SCHEMA)
