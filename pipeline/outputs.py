"""What a run writes under OUT, and how a rerun reads it back.

Layout::

    OUT/images/<shard>/<id>.<png|tif>   shard = first two hex digits of sha256(id): 256 folders
    OUT/results/part-<run>-<n>.parquet   RESULT_SCHEMA, one row per finished job
    OUT/traces/part-<run>-<n>.parquet    TRACE_SCHEMA, one row per recorded step (ok jobs)
    OUT/run.json

Shards are immutable and written atomically. A results shard is the commit record of its jobs:
its traces shard (same name) is written first, so a crash between the two leaves an orphan
trace shard that the next run deletes, and never a trace without its result row.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
import uuid
from collections.abc import Iterable
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
from pipeline.storage import Storage, is_temp_name, join

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
FLUSH_ROWS = 64
FLUSH_BYTES = 64 << 20
FLUSH_SECONDS = 10.0
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
    """Buffers outcomes and writes them as immutable shards every `flush_rows` jobs or
    `flush_seconds`, so a crash loses at most one buffer while a million jobs do not make a
    million files."""

    def __init__(
        self,
        storage: Storage,
        out: str,
        flush_rows: int = FLUSH_ROWS,
        flush_seconds: float = FLUSH_SECONDS,
        flush_bytes: int = FLUSH_BYTES,
        run_id: str | None = None,
    ) -> None:
        self.storage, self.out = storage, out
        self.flush_rows, self.flush_seconds = flush_rows, flush_seconds
        self.flush_bytes = flush_bytes
        self.run_tag = run_id or new_run_id()  # names the shards, stamped on every row
        self._rows: list[dict[str, Any]] = []
        self._traces: list[dict[str, list]] = []
        self._count = 0
        self._last_flush = time.monotonic()
        self.broken: OutputWriteError | None = None

    def add(self, outcome: JobOutcome) -> None:
        row = dict(outcome.row)
        row.setdefault("finished_at", datetime.now(timezone.utc))
        row["run_id"] = self.run_tag
        self._rows.append(row)
        steps = len(outcome.trace["step"])
        trace = {key: outcome.trace.get(key, [None] * steps) for key in TRACE_SCHEMA.names[1:]}
        self._traces.append({"id": [row["id"]] * steps, **trace})
        if len(self._rows) >= self.flush_rows or self._due():
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
        traces = {key: [v for t in self._traces for v in t[key]] for key in TRACE_SCHEMA.names}
        results = pa.Table.from_pylist(self._rows, schema=RESULT_SCHEMA)
        try:
            self.storage.write_parquet(
                join(self.out, "traces", name), pa.table(traces, schema=TRACE_SCHEMA)
            )
            self.storage.write_parquet(join(self.out, "results", name), results)
        except OSError as error:
            self.broken = OutputWriteError(
                f"cannot write results to {printable(self.out)} ({describe(error)}); "
                f"{len(self._rows)} finished job(s) were not recorded and will run again "
                "when the command is rerun"
            )
            raise self.broken from error
        self._rows, self._traces = [], []
        self._count += 1


@dataclass(frozen=True)
class PriorResults:
    """Ids that earlier runs finished, as Arrow arrays (cheap for a million rows)."""

    ok: pa.Array
    failed: pa.Array

    def finished_mask(self, ids: pa.Array, retry_failed: bool) -> pa.Array:
        done = pc.is_in(ids, value_set=self.ok)
        if retry_failed:
            return done
        return pc.or_(done, pc.is_in(ids, value_set=self.failed))


def result_shards(storage: Storage, out: str) -> list[str]:
    return storage.list_files(join(out, "results"), ".parquet")


def read_prior(storage: Storage, out: str) -> PriorResults:
    tables = [storage.read_parquet(u, ["id", "status"]) for u in result_shards(storage, out)]
    if not tables:
        empty = pa.array([], pa.string())
        return PriorResults(empty, empty)
    table = pa.concat_tables(tables)
    ok_mask = pc.equal(table.column("status"), STATUS_OK)
    ok = pc.unique(pc.filter(table.column("id"), ok_mask).combine_chunks())
    failed = pc.unique(pc.filter(table.column("id"), pc.invert(ok_mask)).combine_chunks())
    return PriorResults(ok, failed)


def remove_orphan_traces(storage: Storage, out: str) -> int:
    """Delete trace shards whose results shard was never written (a crash between the two),
    and the hidden temporary files a killed run left on a local OUT (see sweep_temp_files)."""
    sweep_temp_files(out)
    committed = {uri.rsplit("/", 1)[-1] for uri in result_shards(storage, out)}
    orphans = [
        uri
        for uri in storage.list_files(join(out, "traces"), ".parquet")
        if uri.rsplit("/", 1)[-1] not in committed
    ]
    for uri in orphans:
        storage.remove(uri)
    return len(orphans)


def drop_failed_rows(storage: Storage, out: str, ids: Iterable[str] | pa.Array) -> int:
    """Rewrite, atomically, each results shard holding failed rows of `ids` without them.

    Done before those jobs run again, so a crash at any point leaves at most one row per id
    (the job is simply pending again)."""
    value_set = ids if isinstance(ids, pa.Array) else pa.array(list(ids), pa.string())
    dropped = 0
    for uri in result_shards(storage, out):
        table = storage.read_parquet(uri)
        drop = pc.and_(
            pc.is_in(table.column("id"), value_set=value_set),
            pc.not_equal(table.column("status"), STATUS_OK),
        )
        count = pc.sum(drop).as_py() or 0
        if count:
            storage.write_parquet(uri, table.filter(pc.invert(drop)))
            dropped += count
    return dropped


def read_results(storage: Storage, out: str) -> pa.Table:
    shards = result_shards(storage, out)
    if not shards:
        return RESULT_SCHEMA.empty_table()
    tables = [storage.read_parquet(uri) for uri in shards]
    return pa.concat_tables(tables, promote_options="default")


def read_traces(storage: Storage, out: str) -> pa.Table:
    shards = storage.list_files(join(out, "traces"), ".parquet")
    if not shards:
        return TRACE_SCHEMA.empty_table()
    return pa.concat_tables([storage.read_parquet(uri) for uri in shards])


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
