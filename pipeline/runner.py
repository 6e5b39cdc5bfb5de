"""`dippipe run`: check the manifest, resume from OUT, start Ray, schedule, record.

Order matters for safety: every manifest-level problem is found before Ray starts or anything
is written; earlier results are read next, so finished jobs are skipped without starting Ray at
all; results are written in shards as jobs finish, and flushed on Ctrl-C / SIGTERM too.
The scheduling itself (actors, retries, progress) is in scheduler.py.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from importlib import metadata

import pyarrow as pa
import pyarrow.compute as pc
import ray
from rich.console import Console

from pipeline.errors import DippipeError
from pipeline.lock import DEFAULT_STALE_SECONDS, OutLock
from pipeline.lookahead import DEFAULT_DEPTH
from pipeline.manifest import (
    Job,
    ManifestInfo,
    inspect_manifest,
    iter_batches,
    job_from_row,
    read_ids,
)
from pipeline.outputs import (
    FLUSH_BYTES,
    FLUSH_ROWS,
    FLUSH_SECONDS,
    JobOutcome,
    ShardWriter,
    drop_failed_rows,
    read_prior,
    remove_orphan_traces,
)
from pipeline.progress import ProgressView, RunSummary, resolve_log_every
from pipeline.scheduler import (
    DEFAULT_STALL_SECONDS,
    DEFAULT_WORKER_INFRA_ERRORS,
    DEFAULT_WORKER_WAIT,
    PoolSpec,
    Scheduler,
)
from pipeline.storage import Storage, StorageOptions, join
from pipeline.worker import WorkerConfig

log = logging.getLogger("dippipe")
VERSIONED = (
    *("dippipe", "torch", "ray", "pyarrow", "fsspec", "s3fs", "pillow", "numpy"),
    *("tifffile", "imagecodecs"),
)


class RunError(DippipeError, RuntimeError):
    """The run cannot start (e.g. more GPUs asked for than the cluster has)."""


@dataclass(frozen=True)
class RunConfig:
    """What to run, how to schedule it, and what each worker does: ``worker`` (OUT, storage,
    device, fits per GPU, ...) is built once by the caller and handed to the workers as is."""

    manifest: str
    worker: WorkerConfig
    gpus: int | None = None  # None: every GPU Ray sees (CPU workers when there is none)
    workers: int | None = None  # CPU workers when gpus == 0; None: one per cpus_per_worker
    cpus_per_worker: float = 1.0
    address: str | None = None  # None: embedded local Ray; "auto" or "ray://host:10001"
    retry_failed: bool = False
    max_attempts: int = 3
    # Results shards (outputs.ShardWriter): flushed at this many jobs, buffered trace bytes,
    # or seconds, whichever comes first; small shards are compacted (outputs.py).
    flush_rows: int = FLUSH_ROWS
    flush_bytes: int = FLUSH_BYTES
    flush_seconds: float = FLUSH_SECONDS
    # Timeouts (scheduler.py), None = none: a job's wall-clock limit; no step progress for
    # this long = a stalled worker (killed, replaced, the job retried); no worker placed for
    # this long (at the start, or after losing them all) = the run stops.
    job_timeout: float | None = None
    stall_seconds: float | None = DEFAULT_STALL_SECONDS
    worker_wait: float | None = DEFAULT_WORKER_WAIT
    # A worker with this many infrastructure errors in a row (scheduler.py) is replaced.
    worker_infra_errors: int = DEFAULT_WORKER_INFRA_ERRORS
    shared_out: bool = False  # a local OUT is a path every node of the cluster shares
    rerun_changed: bool = False  # rerun finished jobs whose spec changed (else: warn)
    show_progress: bool = True
    # Seconds between plain progress lines in the log; None: 60 when stderr is not a
    # terminal (the bar draws nothing there), else off; 0 = off (progress.py ProgressLines).
    log_every: float | None = None
    force_unlock: bool = False  # take OUT's lock even from a run that looks alive
    stale_lock_seconds: float = DEFAULT_STALE_SECONDS  # a lock this long without heartbeat is
    # taken over (lock.py)
    # Size-aware feeding of workers that pack (lookahead.py): jobs buffered per lane, 0 = off
    # (manifest order); passes before the oldest buffered job is taken (None: buffer size).
    lookahead: int = DEFAULT_DEPTH
    lookahead_passes: int | None = None

    @property
    def out(self) -> str:
        return self.worker.out

    @property
    def storage(self) -> StorageOptions:
        return self.worker.storage


def run(config: RunConfig, console: Console | None = None) -> RunSummary:
    """Run every pending job of the manifest; returns the counts (see RunSummary.exit_code)."""
    console = console or Console(stderr=True)
    storage = Storage(config.storage)
    info = inspect_manifest(storage, config.manifest)  # raises ManifestError before any work
    lock = OutLock(
        storage, config.out, stale_seconds=config.stale_lock_seconds, force=config.force_unlock
    )
    with lock:  # OutLockedError when another live run holds OUT (lock.py)
        return _run_locked(config, console, storage, info)


def _run_locked(config: RunConfig, console: Console, storage: Storage, info) -> RunSummary:
    summary = RunSummary(manifest_rows=info.num_rows)
    finished = _prepare_out(storage, config, info, summary)
    _warn_if_format_changed(storage, config, summary)
    run_json = _RunRecord(storage, config)
    run_json.write(summary)
    if summary.pending == 0:
        log.info("nothing to do: every job of the manifest already has a result in %s", config.out)
        run_json.write(summary, finished=True)
        return summary
    started, temp_dir = _connect(config)
    try:
        _schedule(config, storage, info, finished, summary, console, run_json)
    finally:
        if started:
            ray.shutdown()
        if temp_dir:
            shutil.rmtree(temp_dir, ignore_errors=True)
        try:
            run_json.write(summary, finished=True)
        except OSError as error:  # e.g. a full disk: must not hide why the run stopped
            log.warning("could not update run.json: %s", error)
    return summary


def _warn_if_format_changed(storage: Storage, config: RunConfig, summary: RunSummary) -> None:
    """A rerun with another --format writes only the jobs it runs in the new format: say so
    before run.json, which recorded the old one, is overwritten."""
    if not summary.skipped_ok:
        return
    try:
        earlier = json.loads(storage.read_bytes(join(config.out, "run.json")))
        before = earlier["config"]["output_format"]
    except (OSError, ValueError, KeyError, TypeError):  # none, unreadable, or older than --format
        return
    if before != config.worker.output_format:
        now = config.worker.output_format
        log.warning("an earlier run on %s wrote images with --format %s; its %d finished "
                    "job(s) keep them, the jobs run now are written with --format %s",
                    _redact(config.out), before, summary.skipped_ok, now)  # fmt: skip


def _prepare_out(storage: Storage, config: RunConfig, info: ManifestInfo, summary: RunSummary):
    """Read what earlier runs finished; with --retry-failed, drop the rows to be superseded.
    Returns, per manifest row, whether it already has its final result (one lookup over
    every id: a hash of the earlier ids is built once, not once per batch)."""
    orphans = remove_orphan_traces(storage, config.out)
    if orphans:
        log.info("removed %d trace shard(s) left by an interrupted run", orphans)
    prior = read_prior(storage, config.out)
    ids = read_ids(storage, info)  # every part of a folder / glob manifest, in order
    ok = pc.is_in(ids, value_set=prior.ok)
    failed = pc.and_(pc.is_in(ids, value_set=prior.failed), pc.invert(ok))
    summary.skipped_ok = pc.sum(ok).as_py() or 0
    failed_count = pc.sum(failed).as_py() or 0
    if config.retry_failed and failed_count:
        dropped = drop_failed_rows(storage, config.out, pc.filter(ids, failed))
        log.info("retrying %d failed job(s) (%d old row(s) removed)", failed_count, dropped)
    else:
        summary.skipped_failed = failed_count
    summary.pending = info.num_rows - summary.skipped_ok - summary.skipped_failed
    return ok if config.retry_failed else pc.or_(ok, failed)


def pending_jobs(storage: Storage, info: ManifestInfo, finished_rows: pa.Array) -> Iterator[Job]:
    """Manifest rows without a result yet (``finished_rows`` from _prepare_out), streamed
    batch by batch."""
    row = 0
    for batch in iter_batches(storage, info, batch_rows=1024):
        done = finished_rows.slice(row, batch.num_rows)
        for values, finished in zip(batch.to_pylist(), done.to_pylist(), strict=True):
            if not finished:
                yield job_from_row(values, row)
            row += 1


def _connect(config: RunConfig) -> tuple[bool, str | None]:
    """Join the given cluster or start an embedded one: (we connected, our temp dir)."""
    if ray.is_initialized():  # e.g. a caller (or a test) already holds a Ray session
        return False, None
    if config.address:
        ray.init(address=config.address, logging_level=logging.WARNING)
        return True, None
    # A short private temp dir: Ray's socket paths must stay under 108 characters.
    temp_dir = tempfile.mkdtemp(prefix="dpr-", dir="/tmp")
    ray.init(
        address="local",
        _temp_dir=temp_dir,
        include_dashboard=False,
        logging_level=logging.WARNING,
        num_cpus=_local_cpus(config),
    )
    return True, temp_dir


def _local_cpus(config: RunConfig) -> int | None:
    """Enough logical CPUs for the requested CPU workers (Ray otherwise uses the core count)."""
    if config.workers and not config.gpus:
        return max(1, int(config.workers * config.cpus_per_worker + 0.999))
    return None


def plan_pool(config: RunConfig, pending: int) -> PoolSpec:
    resources = ray.cluster_resources()
    visible = int(resources.get("GPU", 0))
    gpus = visible if config.gpus is None else config.gpus
    if gpus > visible:
        message = f"--gpus {gpus}, but the Ray cluster has {visible} GPU(s)"
        if not config.address:
            raise RunError(message)
        log.warning("%s; the workers wait for the autoscaler", message)
    if gpus > 0:
        return PoolSpec(min(gpus, pending), 1, config.cpus_per_worker)
    room = int(resources.get("CPU", 1) // max(config.cpus_per_worker, 1e-3))
    workers = config.workers or max(1, room)  # as many as the CPUs hold
    return PoolSpec(min(workers, pending), 0, config.cpus_per_worker)


def _schedule(config, storage, info, finished, summary, console, run_json) -> None:
    pool = plan_pool(config, summary.pending)
    writer = ShardWriter(
        storage, config.out, config.flush_rows, config.flush_seconds, config.flush_bytes
    )
    view = ProgressView(
        console,
        summary.pending,
        enabled=config.show_progress,
        log_every=resolve_log_every(config.log_every, console.is_terminal),
        summary=summary,
    )

    def on_outcome(outcome: JobOutcome) -> None:
        for uri, data in outcome.files.items():  # memory:// outputs of a worker process
            storage.write_bytes(uri, data)
        writer.add(outcome)
        row = outcome.row
        summary.record(row["id"], outcome.ok, row.get("iterations"), row.get("error"))
        where = f"{row.get('worker')} on node {row.get('node')}"
        if outcome.ok:
            log.info("job %s ok on %s in %.1f s", row["id"], where, row.get("seconds") or 0.0)
        else:
            log.warning("job %s failed on %s: %s", row["id"], where, row.get("error"))

    def on_tick(running: int, live_steps: int) -> None:
        writer.tick()
        view.update(summary, running, live_steps)

    worker = config.worker
    if worker.threads is None:  # the CPUs each worker reserves, as torch threads
        worker = replace(worker, threads=max(1, int(config.cpus_per_worker)))
    scheduler = Scheduler(
        pool,
        worker,
        storage,
        on_outcome,
        on_tick,
        config.max_attempts,
        lookahead=max(0, config.lookahead),
        lookahead_passes=config.lookahead_passes,
        job_timeout=config.job_timeout,
        stall_seconds=config.stall_seconds,
        worker_wait=config.worker_wait,
        worker_infra_errors=config.worker_infra_errors,
    )
    started = time.monotonic()
    previous = signal.getsignal(signal.SIGTERM)
    _install_sigterm()
    try:
        with view:
            run_json.workers = scheduler.start()
            busy_from = time.monotonic()
            scheduler.run(pending_jobs(storage, info, finished))
            summary.busy_seconds = time.monotonic() - busy_from
    except KeyboardInterrupt:
        summary.interrupted = True
        log.warning("interrupted: keeping the finished jobs; rerun the command to resume")
    finally:
        try:
            writer.flush()  # raises OutputWriteError if OUT cannot take results
        finally:
            summary.worker_deaths = scheduler.deaths
            summary.seconds = time.monotonic() - started
            try:  # an interrupted run stops at once: no waiting for the workers' counts
                if not summary.interrupted:
                    run_json.packing = scheduler.packing_report()  # never raises
            finally:  # a second Ctrl-C while waiting still stops the workers
                scheduler.stop()
                _restore_sigterm(previous)


def _install_sigterm() -> None:
    """SIGTERM (e.g. Kubernetes) stops like Ctrl-C: flush, then exit."""
    with contextlib.suppress(ValueError):  # not the main thread (e.g. inside a test runner)
        signal.signal(signal.SIGTERM, signal.default_int_handler)


def _restore_sigterm(previous) -> None:
    with contextlib.suppress(ValueError, TypeError):
        signal.signal(signal.SIGTERM, previous)


class _RunRecord:
    """OUT/run.json: configuration, versions, workers and counts. Never credentials.

    ``packing`` (null when no worker packs fits, e.g. one lane each, or the run was
    interrupted): ``mean_occupancy``, the
    share of pack slots that held a fit over every packed step of every worker (1.0 = packs
    always full), ``mean_fits`` per step, ``steps``, ``workers``, ``lanes``, and
    ``lookahead`` (null when off): buffer size, fairness bound, picks, matched picks, picks
    forced by the fairness bound, header reads, unknown keys, mean seconds per header read.
    Gathered when the scheduling ends (packing.summarize, lookahead.py)."""

    def __init__(self, storage: Storage, config: RunConfig) -> None:
        self.storage, self.config = storage, config
        self.started = datetime.now(timezone.utc).isoformat()
        self.workers: list[dict] = []
        self.packing: dict | None = None

    def write(self, summary: RunSummary, finished: bool = False) -> None:
        record = {
            "started_at": self.started,
            "finished_at": datetime.now(timezone.utc).isoformat() if finished else None,
            "host": socket.gethostname(),
            "python": sys.version.split()[0],
            "versions": _versions(),
            "config": _recorded_config(self.config),
            "workers": self.workers,
            "summary": summary.as_dict(),
            "packing": self.packing,
        }
        data = json.dumps(record, indent=2, default=str).encode()
        self.storage.write_bytes(join(self.config.out, "run.json"), data)


def _recorded_config(config: RunConfig) -> dict:
    """The run's settings and its workers' in one flat object, as scripts read them
    (``config.manifest``, ``config.storage``...): no credentials, not even in a URI."""
    recorded = asdict(config)
    recorded.update(recorded.pop("worker"))
    recorded["storage"] = config.storage.public()
    recorded["manifest"], recorded["out"] = _redact(config.manifest), _redact(config.out)
    return recorded


def _redact(uri: str) -> str:
    """Drop any user:password@ from a URI before it is recorded."""
    return re.sub(r"://[^/@]*@", "://", uri)


def _versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in VERSIONED:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions
