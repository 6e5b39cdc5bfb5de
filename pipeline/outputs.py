"""What a run writes under OUT, and how a rerun reads it back.

Layout::

    OUT/images/<shard>/<id>.<png|tif>          shard = first two hex digits of sha256(id)
    OUT/results/part-<run>-<n>.parquet          RESULT_SCHEMA, one row per finished job
    OUT/traces/part-<run>-<n>.parquet           TRACE_SCHEMA, one row per recorded step
    OUT/results/compact-<tag>-<n>.parquet       many small shards compacted into one; its
    OUT/traces/compact-<tag>-<n>.parquet        schema metadata lists the shards it replaces
    OUT/run.json

Shards are immutable and written atomically. A results shard is the commit record of its jobs:
its traces shard (same name) is written first, so a crash between the two leaves an orphan
trace shard that the next run deletes, and never a trace without its result row. A traces
shard is read only when its results shard is live.

Small shards are compacted into large ones (compaction.py): the compacted results shard is the
commit point, and every reader ignores the shards it replaces until they are deleted
(shards.py), so each row is read exactly once whatever state a crash left. Many shards are read
in parallel (shards.parallel_map).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.errors import InfrastructureError
from pipeline.ids import is_safe_id
from pipeline.retry import describe
from pipeline.safetext import printable
from pipeline.shards import (
    SUFFIX,
    live_shards,
    name_of,
    parallel_map,
    read_live,
    read_shard,
    remove_all,
    results_folder,
    traces_folder,
    workers_for,
)
from pipeline.storage import Storage, is_temp_name, join

log = logging.getLogger("dippipe")

RESULT_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string()),
        pa.field("task", pa.string()),
        pa.field("status", pa.string()),
        pa.field("error", pa.string()),
        pa.field("output", pa.string()),
        pa.field("iterations", pa.int32()),
        pa.field("energy", pa.float64()),
        pa.field("psnr", pa.float64()),
        pa.field("seconds", pa.float64()),
        pa.field("seed", pa.int64()),
        pa.field("device", pa.string()),
        pa.field("attempts", pa.int32()),
        # Beyond the contract: how the fit stopped and where it ran.
        pa.field("stopped_at", pa.int32()),
        pa.field("stop_reason", pa.string()),
        pa.field("worker", pa.string()),
        pa.field("node", pa.string()),
        pa.field("finished_at", pa.timestamp("ms", tz="UTC")),
        # What happened to the user's data on the way (image rotated upright, colours
        # converted with the embedded profile, metadata the output format cannot hold),
        # "; "-separated; null when nothing did. Never dropped silently.
        pa.field("notes", pa.string()),
        pa.field("tiles", pa.int32()),  # fits the image was cut into (1: fitted whole)
        # The worker process's peak resident memory so far, in bytes (sizes pods and
        # machines: it bounds what its jobs needed); null where the OS does not say.
        pa.field("peak_rss", pa.int64()),
        # Why a failed job failed (ERROR_KINDS); null for ok rows and rows of older runs.
        pa.field("error_kind", pa.string()),
        # The run that wrote the row (OUT/runs/<run_id>.json) and a fingerprint of the job's
        # spec as it ran (spec.py): a rerun finds ids whose spec changed since.
        pa.field("run_id", pa.string()),
        pa.field("spec", pa.string()),
    ]
)
TRACE_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string()),
        pa.field("step", pa.int32()),
        pa.field("energy", pa.float64()),
        pa.field("psnr", pa.float64()),
        # Beyond the contract: the stopping rule's statistic (windowed output variance).
        pa.field("stop_stat", pa.float64()),
    ]
)
# A results shard is written at FLUSH_ROWS jobs, FLUSH_BYTES of buffered results and traces
# (a fit records every step: ~30 bytes each, so 2,000 steps make ~60 KB a job), or after
# FLUSH_SECONDS, whichever comes first. A crash loses at most that one buffer, whose jobs
# simply run again: 2 minutes of the cluster's work at worst. At 0.3-1 job/s a flush then
# carries 40-120 jobs instead of a handful: 1M jobs make 8-25k shards, not 100k+, and the
# writer's compaction (compaction.py) folds them into a few hundred as the run goes. The byte
# bound keeps the driver's buffer and each shard small whatever the traces' length.
FLUSH_ROWS = 2000
FLUSH_BYTES = 32 << 20
FLUSH_SECONDS = 120.0
STATUS_OK = "ok"
STATUS_FAILED = "failed"
# error_kind of a failed row. "job": its own input or params (bad file, bad value), final;
# "died": its worker process died (killed, out of memory) each time it ran it alone;
# "timeout": it ran past --job-timeout each try; "infrastructure": workers failed on it for
# reasons outside the job (CUDA, credentials, storage, lost objects) on every try: a plain
# rerun runs it again (PriorResults.retryable).
KIND_JOB, KIND_DIED, KIND_TIMEOUT, KIND_INFRA = "job", "died", "timeout", "infrastructure"
ERROR_KINDS = (KIND_JOB, KIND_DIED, KIND_TIMEOUT, KIND_INFRA)


def shard_of(job_id: str) -> str:
    return hashlib.sha256(job_id.encode()).hexdigest()[:2]


IMAGE_EXTENSIONS = ("png", "tif")


def image_uri(out: str, job_id: str, extension: str = "png") -> str:
    """Where a job's image goes (``extension``: "png" or "tif"). The id rule is checked
    again here, where an id becomes a path, so no caller can write outside OUT/images
    whatever it skipped."""
    if not is_safe_id(job_id):
        raise ValueError(f"unsafe job id {job_id!a}: not used as a file name")
    if extension not in IMAGE_EXTENSIONS:
        raise ValueError(f"unknown image extension {extension!r}; expected {IMAGE_EXTENSIONS}")
    return join(out, "images", shard_of(job_id), f"{job_id}.{extension}")


@dataclass
class JobOutcome:
    """What a worker sends back for one job: its result row and its trace (ok jobs only)."""

    row: dict[str, Any]
    trace: dict[str, list] = field(
        default_factory=lambda: {"step": [], "energy": [], "psnr": [], "stop_stat": []}
    )
    files: dict[str, bytes] = field(default_factory=dict)  # for the driver to write (memory://)

    @property
    def ok(self) -> bool:
        return self.row["status"] == STATUS_OK


def new_run_id() -> str:
    """A run's id: when it started (UTC, sorts in time order) and 6 random hex digits."""
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + "-" + uuid.uuid4().hex[:6]


class OutputWriteError(InfrastructureError):
    """Results cannot be written to OUT (full disk, no permission, storage down): the run
    stops, since every further job would be lost too."""


class ShardWriter:
    """Buffers outcomes and writes them as immutable shards at `flush_rows` jobs, `flush_bytes`
    of buffered rows and traces, or `flush_seconds`, so a crash loses at most one buffer while
    a million jobs do not make a million files. Every `compact_every` flushes (0: never) it
    compacts small shards (compaction.py), a bounded amount at a time."""

    def __init__(
        self,
        storage: Storage,
        out: str,
        flush_rows: int = FLUSH_ROWS,
        flush_seconds: float = FLUSH_SECONDS,
        flush_bytes: int = FLUSH_BYTES,
        run_id: str | None = None,
        compact_every: int | None = None,  # None: compaction.COMPACT_EVERY
    ) -> None:
        self.storage, self.out = storage, out
        self.flush_rows, self.flush_seconds = flush_rows, flush_seconds
        self.flush_bytes = flush_bytes
        self.compact_every = compact_every
        self.run_tag = run_id or new_run_id()  # names the shards, stamped on every row
        self._rows: list[dict[str, Any]] = []
        self._traces: list[pa.RecordBatch] = []
        self._bytes = 0  # estimate of the buffer as Arrow data
        self._count = 0
        self._compactions = 0
        self._since_compaction = 0
        self._flushed_bytes = 0  # since the last compaction (Arrow size: above what is stored)
        self._last_flush = time.monotonic()
        self.broken: OutputWriteError | None = None

    def add(self, outcome: JobOutcome) -> None:
        row = dict(outcome.row)
        row.setdefault("finished_at", datetime.now(timezone.utc))
        row["run_id"] = self.run_tag
        steps = len(outcome.trace["step"])
        trace = {key: outcome.trace.get(key, [None] * steps) for key in TRACE_SCHEMA.names[1:]}
        # Arrow now, not at the flush: a Python list of floats takes ~4x the memory.
        batch = pa.record_batch({"id": [row["id"]] * steps, **trace}, schema=TRACE_SCHEMA)
        self._rows.append(row)
        self._traces.append(batch)
        self._bytes += batch.nbytes + _row_bytes(row)
        if len(self._rows) >= self.flush_rows or self._bytes >= self.flush_bytes or self._due():
            self.flush()

    def _due(self) -> bool:
        return time.monotonic() - self._last_flush >= self.flush_seconds

    def tick(self) -> None:
        """Called while waiting, so a slow run still flushes on time."""
        if self._rows and self._due():
            self.flush()

    def flush(self) -> None:
        """Write the buffer as one traces shard, then its results shard (the commit record).

        A storage error (after the storage layer's retries) raises OutputWriteError and leaves
        this writer broken: the buffered jobs have no row, so a rerun does them again."""
        if self.broken is not None:
            raise self.broken
        self._last_flush = time.monotonic()
        if not self._rows:
            return
        name = f"part-{self.run_tag}-{self._count:05d}.parquet"
        traces = pa.Table.from_batches(self._traces, schema=TRACE_SCHEMA)
        results = pa.Table.from_pylist(self._rows, schema=RESULT_SCHEMA)
        try:
            self.storage.write_parquet(join(self.out, "traces", name), traces)
            self.storage.write_parquet(join(self.out, "results", name), results)
        except OSError as error:
            self.broken = OutputWriteError(
                f"cannot write results to {printable(self.out)} ({describe(error)}); "
                f"{len(self._rows)} finished job(s) were not recorded and will run again "
                "when the command is rerun"
            )
            raise self.broken from error
        self._flushed_bytes += self._bytes
        self._rows, self._traces, self._bytes = [], [], 0
        self._count += 1
        self._since_compaction += 1
        self._maybe_compact()

    def _maybe_compact(self) -> None:
        """Compact small shards every `compact_every` flushes. A failure is only logged: the
        shards stay readable as they are, and the next compaction (or run) resumes it."""
        from pipeline import compaction  # it imports this module's schemas

        every = compaction.COMPACT_EVERY if self.compact_every is None else self.compact_every
        if every <= 0 or self._since_compaction < every:
            return
        budget = max(compaction.RUN_BUDGET, self._flushed_bytes)
        self._since_compaction, self._flushed_bytes = 0, 0
        self._compactions += 1
        tag = f"{self.run_tag}-{self._compactions:04d}"
        try:
            done = compaction.compact(self.storage, self.out, tag, budget=budget)
        except (OSError, pa.ArrowException) as error:
            log.warning("compacting the results shards failed (%s); left for later",
                        describe(error))  # fmt: skip
            return
        log.info("compacted %d results shard(s) into %d", done.sources, done.groups)


def _row_bytes(row: dict[str, Any]) -> int:
    """About what a result row takes as Arrow data: 8 bytes a value, plus its text."""
    return sum(len(v) + 8 if isinstance(v, str) else 8 for v in row.values())


SPECS_SCHEMA = pa.schema([pa.field("id", pa.string()), pa.field("spec", pa.string())])


@dataclass(frozen=True)
class PriorResults:
    """Ids that earlier runs finished, as Arrow arrays (cheap for a million rows).

    ``retryable``: failed ids whose failed rows all say KIND_INFRA and that have no ok row: a
    plain rerun runs them again (rows of older runs, without error_kind, are plain failures).
    ``bad_input``: failed ids whose failed rows all say KIND_JOB (their own input or params).
    ``specs``: id and spec of every row that recorded a spec (spec.py), ok or failed."""

    ok: pa.Array
    failed: pa.Array
    retryable: pa.Array = field(default_factory=lambda: pa.array([], pa.string()))
    bad_input: pa.Array = field(default_factory=lambda: pa.array([], pa.string()))
    specs: pa.Table = field(default_factory=lambda: SPECS_SCHEMA.empty_table())

    def finished_mask(self, ids: pa.Array, retry_failed: bool) -> pa.Array:
        done = pc.is_in(ids, value_set=self.ok)
        if retry_failed:
            return done
        final = pc.and_(
            pc.is_in(ids, value_set=self.failed),
            pc.invert(pc.is_in(ids, value_set=self.retryable)),
        )
        return pc.or_(done, final)


def result_shards(storage: Storage, out: str) -> list[str]:
    """URIs of the live results shards (not those a compacted shard replaces)."""
    return live_shards(storage, out)[0]


PRIOR_COLUMNS = ("id", "status", "error_kind", "spec")


def read_prior(storage: Storage, out: str) -> PriorResults:
    tables = [_with_columns(t, PRIOR_COLUMNS) for _, t in read_live(storage, out, PRIOR_COLUMNS)]
    if not tables:
        return PriorResults(pa.array([], pa.string()), pa.array([], pa.string()))
    table = pa.concat_tables(tables)
    ids = table.column("id")
    is_ok = pc.fill_null(pc.equal(table.column("status"), STATUS_OK), False)
    is_infra = pc.fill_null(pc.equal(table.column("error_kind"), KIND_INFRA), False)
    ok = pc.unique(pc.filter(ids, is_ok).combine_chunks())
    failed = pc.unique(pc.filter(ids, pc.invert(is_ok)).combine_chunks())
    final = pc.filter(ids, pc.and_(pc.invert(is_ok), pc.invert(is_infra))).combine_chunks()
    infra = pc.unique(pc.filter(ids, pc.and_(pc.invert(is_ok), is_infra)).combine_chunks())
    keep = pc.invert(pc.or_(pc.is_in(infra, value_set=ok), pc.is_in(infra, value_set=final)))
    is_job = pc.fill_null(pc.equal(table.column("error_kind"), KIND_JOB), False)
    other = pc.filter(ids, pc.and_(pc.invert(is_ok), pc.invert(is_job))).combine_chunks()
    bad = pc.unique(pc.filter(ids, pc.and_(pc.invert(is_ok), is_job)).combine_chunks())
    bad = pc.filter(bad, pc.invert(pc.or_(pc.is_in(bad, value_set=ok),
                                          pc.is_in(bad, value_set=other))))  # fmt: skip
    specs = table.select(["id", "spec"]).filter(pc.is_valid(table.column("spec")))
    return PriorResults(ok, failed, pc.filter(infra, keep), bad, specs)


def _with_columns(table: pa.Table, names: tuple[str, ...]) -> pa.Table:
    """`names` of RESULT_SCHEMA, in order; a column an older shard lacks is nulls."""
    fields = [RESULT_SCHEMA.field(n) for n in names]
    return pa.table(
        [
            table.column(f.name).cast(f.type)
            if f.name in table.column_names
            else pa.nulls(len(table), f.type)
            for f in fields
        ],
        schema=pa.schema(fields),
    )


def remove_orphan_traces(storage: Storage, out: str) -> int:
    """Delete trace shards whose results shard was never written (a crash between the two),
    and the hidden temporary files a killed run left on a local OUT (see sweep_temp_files).
    Traces of replaced shards are compaction's to delete (compaction.remove_replaced)."""
    sweep_temp_files(out)
    committed = {name_of(u) for u in storage.list_files(results_folder(out), SUFFIX)}
    orphans = [
        uri
        for uri in storage.list_files(traces_folder(out), SUFFIX)
        if name_of(uri) not in committed
    ]
    return remove_all(storage, orphans)


def drop_failed_rows(storage: Storage, out: str, ids: Iterable[str] | pa.Array) -> int:
    """Rewrite, atomically, each live results shard holding failed rows of `ids` without them
    (keeping its schema metadata: a compacted shard still names what it replaces).

    Done before those jobs run again, so a crash at any point leaves at most one row per id
    (the job is simply pending again)."""
    return _drop(storage, out, ids, failed_only=True)


def drop_rows(storage: Storage, out: str, ids: Iterable[str] | pa.Array) -> int:
    """drop_failed_rows for every row of `ids`, ok ones too (e.g. to rerun them). Their trace
    rows stay in the traces shards but are no longer read: a trace row counts only while its
    id has a row in the results shard of the same name (read_traces, compaction)."""
    return _drop(storage, out, ids, failed_only=False)


def _drop(storage: Storage, out: str, ids: Iterable[str] | pa.Array, failed_only: bool) -> int:
    value_set = ids if isinstance(ids, pa.Array) else pa.array(list(ids), pa.string())

    def matches(table: pa.Table) -> pa.Array:
        mine = pc.is_in(table.column("id"), value_set=value_set)
        if not failed_only:
            return mine
        return pc.and_(mine, pc.fill_null(pc.not_equal(table.column("status"), STATUS_OK), True))

    live = read_live(storage, out, ["id", "status"])
    if not live:
        return 0
    # One lookup over every live row (the id set hashed once), then split by shard.
    mask = matches(pa.concat_tables([_with_columns(t, ("id", "status")) for _, t in live]))
    dropped, offset = 0, 0
    for name, table in live:
        hit = pc.any(mask.slice(offset, len(table))).as_py()
        offset += len(table)
        if not hit:
            continue
        uri = join(results_folder(out), name)
        table = read_shard(storage, uri)
        drop = matches(table)
        dropped += pc.sum(drop).as_py() or 0
        storage.write_parquet(uri, table.filter(pc.invert(drop)))
    return dropped


def read_columns(storage: Storage, out: str, columns: Iterable[str]) -> pa.Table:
    """`columns` (of RESULT_SCHEMA) of every live result row, read in parallel; a column that
    shards of older versions lack is null there."""
    names = tuple(columns)
    tables = [_with_columns(t, names) for _, t in read_live(storage, out, names)]
    if not tables:
        return pa.schema([RESULT_SCHEMA.field(n) for n in names]).empty_table()
    return pa.concat_tables(tables)


def read_results(storage: Storage, out: str) -> pa.Table:
    tables = [table for _, table in read_live(storage, out)]
    if not tables:
        return RESULT_SCHEMA.empty_table()
    return pa.concat_tables(tables, promote_options="default")


def iter_result_shards(
    storage: Storage, out: str, columns: Iterable[str] | None = None
) -> Iterator[tuple[str, pa.Table]]:
    """(shard name, table) of each live results shard, streamed: a few shards are read ahead
    in parallel, never all of them at once."""
    columns = None if columns is None else list(columns)
    uris = result_shards(storage, out)
    tables = parallel_map(lambda u: read_shard(storage, u, columns), uris, workers_for(out))
    for uri, table in zip(uris, tables, strict=True):
        yield name_of(uri), table.replace_schema_metadata(None)


def read_traces(storage: Storage, out: str) -> pa.Table:
    """Every trace row whose id has a row in the live results shard of the same name (not
    those of orphans, of replaced shards, nor of dropped rows)."""
    live = {name: table.column("id") for name, table in read_live(storage, out, ["id"])}
    shards = [u for u in storage.list_files(traces_folder(out), SUFFIX) if name_of(u) in live]
    if not shards:
        return TRACE_SCHEMA.empty_table()

    def read(uri: str) -> pa.Table:
        table = read_shard(storage, uri).replace_schema_metadata(None)
        return table.filter(pc.is_in(table.column("id"), value_set=live[name_of(uri)]))

    tables = parallel_map(read, shards, workers_for(out))
    return pa.concat_tables(tables, promote_options="default")


def sweep_temp_files(out: str) -> int:
    """Remove '.<name>.<hex>.tmp' files that a run killed mid-write left in a local OUT.

    Only called with the OUT lock held, so no live writer owns them. Object stores have none:
    their writes are single PUTs."""
    if "://" in out and not out.startswith("file://"):
        return 0
    root = Path(out.removeprefix("file://"))
    folders = [root / "results", root / "traces", root]
    images = root / "images"
    if images.is_dir():
        folders += [p for p in images.iterdir() if p.is_dir()]
    removed = 0
    for folder in folders:
        if not folder.is_dir():
            continue
        for entry in os.scandir(folder):
            if entry.is_file(follow_symlinks=False) and is_temp_name(entry.name):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(entry.path)
                    removed += 1
    return removed
