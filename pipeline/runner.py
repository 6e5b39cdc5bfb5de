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
import shutil
import signal
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Any, NoReturn

import pyarrow as pa
import pyarrow.compute as pc
import ray
from rich.console import Console

from pipeline.compaction import RESUME_BUDGET, compact
from pipeline.errors import DippipeError, InfrastructureError
from pipeline.faults import is_infrastructure
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
    OutputWriteError,
    PriorResults,
    ShardWriter,
    drop_failed_rows,
    drop_rows,
    new_run_id,
    read_prior,
    remove_orphan_traces,
)
from pipeline.progress import ProgressView, resolve_log_every
from pipeline.retry import describe
from pipeline.run_metrics import RunMetrics
from pipeline.run_record import RunRecord, redact
from pipeline.scheduler import (
    DEFAULT_STALL_SECONDS,
    DEFAULT_WORKER_INFRA_ERRORS,
    DEFAULT_WORKER_WAIT,
    PoolSpec,
    Scheduler,
)
from pipeline.sink import OutcomeSink
from pipeline.spec import changed_specs, spec_fingerprints
from pipeline.storage import Storage, StorageOptions, is_local_path, join
from pipeline.summary import RunSummary
from pipeline.worker import WorkerConfig

log = logging.getLogger("dippipe")
SPEC_BATCH_ROWS = 65536  # manifest rows read (and checked for changed specs) at once
JOB_BATCH_ROWS = 1024  # of which Job objects made at once


class RunError(DippipeError, RuntimeError):
    """The run cannot start (e.g. more GPUs asked for than the cluster has)."""


@dataclass(frozen=True)
class RunConfig:
    """What to run, how to schedule it, and what each worker does: ``worker`` (OUT, storage,
    device, fits per GPU, ...) is built once by the caller and handed to the workers as is."""

    manifest: str
    worker: WorkerConfig
    gpus: int | None = None  # None: every GPU Ray sees (CPU workers when there is none)
    # CPU workers (gpus == 0) and the Ray CPUs each worker reserves. Both None and no
    # worker.threads: the cluster's CPUs shared among the pending jobs (plan_pool); else None
    # means as many workers as the CPUs hold, and 1 CPU each (GPU workers: 1 CPU).
    workers: int | None = None
    cpus_per_worker: float | None = None
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
    metrics_port: int | None = None  # the embedded local Ray serves Prometheus metrics here
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
    with _storage_errors(work_ran=False):  # no credentials, no permission, storage down
        info = inspect_manifest(storage, config.manifest)  # ManifestError before any work
        lock = OutLock(storage, config.out, stale_seconds=config.stale_lock_seconds,
                       force=config.force_unlock)  # fmt: skip
        with lock:  # OutLockedError when another live run holds OUT (lock.py)
            return _run_locked(config, console, storage, info, lock)


class StartStorageError(InfrastructureError):
    """The storage refused or failed the driver before any work (no credentials, no
    permission, unreachable): exit 3, since a retry elsewhere (another node's role, storage
    back) may succeed where nothing in the manifest would change."""


_LOST = (
    "OUT's lock was taken over by another run: this run's unrecorded results are "
    "dropped, the jobs stay pending for the run that holds OUT"
)


class DriverStorageError(InfrastructureError):
    """The driver lost its storage (credentials expired, permission withdrawn, storage down
    past the retries) after jobs ran: finished jobs are kept, a rerun resumes."""


@contextlib.contextmanager
def _storage_errors(work_ran: bool) -> Iterator[None]:
    """Turn the driver's own storage errors (faults.py: credentials, permissions, a full
    disk, storage unavailable; or any OSError) into one clear error (exit 3): before any work a
    StartStorageError, after it a DriverStorageError."""
    try:
        yield
    except DippipeError:
        raise
    except Exception as error:
        if not (isinstance(error, OSError) or is_infrastructure(error)):
            raise
        if work_ran:
            raise DriverStorageError(f"storage failed: {describe(error)}; finished jobs are "
                                     "kept, rerun to resume") from error  # fmt: skip
        raise StartStorageError(f"cannot use the storage: {describe(error)}; nothing was "
                                "run") from error  # fmt: skip


def _run_locked(
    config: RunConfig, console: Console, storage: Storage, info: ManifestInfo, lock: OutLock
) -> RunSummary:
    summary = RunSummary(manifest_rows=info.num_rows)
    resume = _prepare_out(storage, config, info, summary)
    if config.rerun_changed and (summary.skipped_ok or summary.skipped_failed):
        _rerun_changed(storage, config, info, summary, resume)
    _warn_if_format_changed(storage, config, summary)
    run_json = RunRecord(storage, config, lock.run_id)  # one id: lock, rows, runs/<id>.json
    run_json.write(summary)
    if summary.pending == 0:
        if not config.rerun_changed:  # no job streams past the finished rows: check them here
            batches = iter_batches(storage, info, SPEC_BATCH_ROWS)
            params = config.worker.param_defaults
            _warn_changed(changed_specs(batches, resume.recorded, params).ids, summary)
        log.info("nothing to do: every job of the manifest already has a result in %s", config.out)
        run_json.write(summary, finished=True)
        return summary
    try:
        started, temp_dir = _connect(config)
    except (ConnectionError, TimeoutError) as error:  # not a storage error: say what it is
        raise RunError(
            f"cannot reach the Ray cluster {config.address}: {describe(error)}"
        ) from error
    try:
        with _storage_errors(work_ran=True):
            _schedule(config, storage, info, resume, summary, console, run_json, lock)
    finally:
        if started:
            ray.shutdown()
        if temp_dir:
            shutil.rmtree(temp_dir, ignore_errors=True)
        try:
            if not lock.lost:  # a lost lock's new holder owns run.json
                run_json.write(summary, finished=True)
        except OSError as error:  # e.g. a full disk: must not hide why the run stopped
            log.warning("could not update run.json: %s", error)
    return summary


def _rerun_changed(
    storage: Storage, config: RunConfig, info: ManifestInfo, summary: RunSummary, resume: Resume
) -> None:
    """--rerun-changed: drop the rows of the finished ids (ok or failed) whose spec changed
    since they ran (spec.py) and make them pending again (``resume`` and ``summary``
    updated). One pass over the manifest before the first job; without the flag the same
    check runs as the jobs stream (pending_jobs), and costs the start nothing."""
    changed = changed_specs(iter_batches(storage, info, SPEC_BATCH_ROWS), resume.recorded,
                            config.worker.param_defaults)  # fmt: skip
    if not changed.ids:
        return
    dropped = drop_rows(storage, config.out, pa.array(changed.ids, pa.string()))
    log.info("running again %d job(s) whose spec changed (%d old row(s) removed): %s",
             len(changed.ids), dropped, _some(changed.ids))  # fmt: skip
    mask = resume.finished.to_numpy(zero_copy_only=False).copy()
    mask[changed.rows] = False
    resume.finished = pa.array(mask)
    summary.changed_specs = len(changed.ids)
    resume.count(summary, info.num_rows)


def _some(ids: list[str], shown: int = 5) -> str:
    return ", ".join(ids[:shown]) + (", ..." if len(ids) > shown else "")


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
                    redact(config.out), before, summary.skipped_ok, now)  # fmt: skip


@dataclass
class Resume:
    """What a run resumes from, per manifest row (masks over the manifest, in order): rows
    with an ok result, with a final failure, of which the job's own bad input; ``finished``
    = ok or final failure. ``prior``: what the earlier runs' rows say."""

    prior: PriorResults
    ok: pa.Array
    final: pa.Array
    bad_input: pa.Array
    finished: pa.Array
    recorded: pa.Table  # id and spec of the finished rows' results (spec.py)

    def count(self, summary: RunSummary, rows: int) -> None:
        """The summary's skipped and pending counts, from the masks."""

        def total(mask: pa.Array) -> int:
            return pc.sum(pc.and_(mask, self.finished)).as_py() or 0

        summary.skipped_ok = total(self.ok)
        summary.skipped_failed = total(self.final)
        summary.skipped_failed_bad_input = total(self.bad_input)
        summary.pending = rows - summary.skipped_ok - summary.skipped_failed


def _prepare_out(
    storage: Storage, config: RunConfig, info: ManifestInfo, summary: RunSummary
) -> Resume:
    """Clean up after an interrupted run (orphan traces, an unfinished compaction), compact
    small shards (a bounded amount: the writer does the rest), read what earlier runs
    finished, and drop the rows to be superseded: failed ones with --retry-failed, and always
    those that failed for infrastructure reasons (PriorResults.retryable). One lookup over
    every id: a hash of the earlier ids is built once, not once per batch."""
    orphans = remove_orphan_traces(storage, config.out)
    if orphans:
        log.info("removed %d trace shard(s) left by an interrupted run", orphans)
    done = compact(storage, config.out, "resume-" + new_run_id(), budget=RESUME_BUDGET)
    if done.groups or done.removed:
        log.info("compacted %d results shard(s) into %d (%d row(s)); %d small shard(s) left "
                 "for the run to compact; %d file(s) of an interrupted compaction removed",
                 done.sources, done.groups, done.rows, done.left, done.removed)  # fmt: skip
    prior = read_prior(storage, config.out)
    ids = read_ids(storage, info)  # every part of a folder / glob manifest, in order
    ok = pc.is_in(ids, value_set=prior.ok)
    failed = pc.and_(pc.is_in(ids, value_set=prior.failed), pc.invert(ok))
    retry = failed if config.retry_failed else pc.is_in(ids, value_set=prior.retryable)
    retry_count = pc.sum(retry).as_py() or 0
    if retry_count:
        dropped = drop_failed_rows(storage, config.out, pc.filter(ids, retry))
        why = "failed" if config.retry_failed else "infrastructure-failed"
        log.info("retrying %d %s job(s) (%d old row(s) removed)", retry_count, why, dropped)
    final = pc.and_(failed, pc.invert(retry))
    bad_input = pc.and_(final, pc.is_in(ids, value_set=prior.bad_input))
    finished = pc.or_(ok, final)
    specs = prior.specs  # only the finished ids' (the retried ones' rows are gone)
    recorded = specs.filter(pc.is_in(specs.column("id"), value_set=pc.filter(ids, finished)))
    resume = Resume(prior, ok, final, bad_input, finished, recorded)
    resume.count(summary, info.num_rows)
    return resume


def pending_jobs(
    storage: Storage,
    info: ManifestInfo,
    finished_rows: pa.Array,
    param_defaults: Mapping[str, Any] | None = None,
    recorded: pa.Table | None = None,
    summary: RunSummary | None = None,
) -> Iterator[Job]:
    """Manifest rows without a result yet (``finished_rows`` from _prepare_out), streamed
    batch by batch, each with its spec fingerprint (spec.py) under ``param_defaults``.
    With ``recorded`` (id and spec of the earlier ok rows), finished rows whose spec changed
    since are counted in ``summary.changed_specs`` and named in one warning at the end."""
    row = 0
    changed: list[str] = []
    for batch in iter_batches(storage, info, batch_rows=SPEC_BATCH_ROWS):
        done = finished_rows.slice(row, batch.num_rows)
        if recorded is not None and len(recorded):
            changed += changed_specs([batch.filter(done)], recorded, param_defaults).ids
        todo = pc.indices_nonzero(pc.invert(done))
        for start in range(0, len(todo), JOB_BATCH_ROWS):  # Python objects a slice at a time
            some = todo.slice(start, JOB_BATCH_ROWS)
            pending = batch.take(some)
            specs = spec_fingerprints(pending, param_defaults).to_pylist()
            for index, values, spec in zip(some.to_pylist(), pending.to_pylist(), specs,
                                           strict=True):  # fmt: skip
                yield job_from_row(values, row + index, spec)
        row += batch.num_rows
    _warn_changed(changed, summary)


def _warn_changed(changed: list[str], summary: RunSummary | None) -> None:
    if not changed:
        return
    if summary is not None:
        summary.changed_specs = len(changed)
    log.warning("%d finished job(s) have another spec in the manifest now (task, inputs, "
                "scale, iterations, seed or params): %s; they keep their results; "
                "--rerun-changed runs them again", len(changed), _some(changed))  # fmt: skip


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
        _metrics_export_port=config.metrics_port,
    )
    return True, temp_dir


def _local_cpus(config: RunConfig) -> int | None:
    """Enough logical CPUs for the requested CPU workers (Ray otherwise uses the core count)."""
    if config.workers and not config.gpus:
        return max(1, int(config.workers * (config.cpus_per_worker or 1.0) + 0.999))
    return None


def _placement_check(config: RunConfig) -> Callable[[dict[str, Any]], None] | None:
    """With a local OUT, refuse a worker placed on another machine (its images would land on
    that machine's disk, out of the driver's sight) unless --shared-out says every node sees
    the same path. None when there is nothing to check. A cluster that already has another
    machine is refused here, before any work; one that gains it later (an autoscaler), when
    a worker is placed there."""
    if config.shared_out or not is_local_path(config.out):
        return None
    here = ray.util.get_node_ip_address()

    def refuse(what: str, node: str) -> NoReturn:
        raise RunError(
            f"{what} node {node}, but OUT {config.out} is a local path of this machine "
            f"({here}): use an OUT every node can reach (s3://...), or --shared-out if the "
            "path is shared (NFS...)"
        )

    if ray.is_initialized():
        for node in ray.nodes():
            address = node.get("NodeManagerAddress")
            if node.get("Alive") and address and address != here:
                refuse("the Ray cluster has", address)

    def check(worker: dict[str, Any]) -> None:
        if worker.get("node") not in (None, here):
            refuse(f"{worker.get('worker')} was placed on", str(worker["node"]))

    return check


def plan_pool(config: RunConfig, pending: int) -> PoolSpec:
    """The workers to ask Ray for. CPU workers sized by nobody (no --workers,
    --cpus-per-worker or --threads) on the embedded Ray share its CPUs among the pending
    jobs (spread_cpus): one job on a 4-CPU machine gets a worker of 4 CPUs, on 4 threads."""
    resources = ray.cluster_resources()
    visible = int(resources.get("GPU", 0))
    gpus = visible if config.gpus is None else config.gpus
    if gpus > visible:
        message = f"--gpus {gpus}, but the Ray cluster has {visible} GPU(s)"
        if not config.address:
            raise RunError(message)
        log.warning("%s; the workers wait for the autoscaler", message)
    cpus = config.cpus_per_worker or 1.0
    if gpus > 0:
        return PoolSpec(min(gpus, pending), 1, cpus)
    # Only on the embedded Ray, whose CPUs are this run's alone: on a shared cluster other
    # jobs may hold CPUs, and a worker of many CPUs could find no node with room for it.
    sized = config.workers, config.cpus_per_worker, config.worker.threads
    if config.address is None and sized == (None, None, None):
        nodes = _node_cpus()
        if nodes:  # none: a cluster that waits for its autoscaler (below: one CPU each)
            workers, each = spread_cpus(nodes, pending)
            return PoolSpec(workers, 0, each)
    room = int(resources.get("CPU", 1) // max(cpus, 1e-3))
    workers = config.workers or max(1, room)  # as many as the CPUs hold
    return PoolSpec(min(workers, pending), 0, cpus)


def spread_cpus(node_cpus: list[int], pending: int) -> tuple[int, int]:
    """(workers, whole CPUs each) for ``pending`` jobs on nodes of ``node_cpus`` CPUs:
    one worker per job up to one per CPU, each with the most CPUs that still lets every
    worker be placed (on one node: cpus // workers; never more than a node has)."""
    workers = max(1, min(sum(node_cpus), pending))
    each = 1
    while sum(cpus // (each + 1) for cpus in node_cpus) >= workers:
        each += 1
    return workers, each


def _node_cpus() -> list[int]:
    """Whole CPUs of each live node of the Ray cluster that has any."""
    counts = [int(node.get("Resources", {}).get("CPU", 0)) for node in ray.nodes()
              if node.get("Alive")]  # fmt: skip
    return [count for count in counts if count > 0]


def _schedule(config, storage, info, resume, summary, console, run_json, lock) -> None:
    pool = plan_pool(config, summary.pending)
    writer = ShardWriter(storage, config.out, config.flush_rows, config.flush_seconds,
                         config.flush_bytes, run_id=run_json.run_id)  # fmt: skip
    view = ProgressView(
        console,
        summary.pending,
        enabled=config.show_progress,
        log_every=resolve_log_every(config.log_every, console.is_terminal),
        summary=summary,
    )

    placement = _placement_check(config)  # before any work: RunError, nothing ran
    metrics = RunMetrics()
    sink = OutcomeSink(storage, writer, summary, metrics)

    def on_tick(running: int, live_steps: int) -> None:
        writer.tick()
        view.update(summary, running, live_steps)
        metrics.progress(running, summary.pending - summary.ok - summary.failed - running)

    worker = config.worker
    if worker.threads is None:  # the CPUs each worker reserves, as torch threads
        worker = replace(worker, threads=max(1, int(pool.cpus_per_worker)))
    scheduler = Scheduler(
        pool,
        worker,
        storage,
        sink,
        on_tick,
        config.max_attempts,
        lookahead=max(0, config.lookahead),
        lookahead_passes=config.lookahead_passes,
        job_timeout=config.job_timeout,
        stall_seconds=config.stall_seconds,
        worker_wait=config.worker_wait,
        worker_infra_errors=config.worker_infra_errors,
        on_placed=placement,
        # CPU workers may lend the cores of idle ones to the busy (scheduler.py), unless
        # --threads fixed the count.
        share_idle_cpus=config.worker.threads is None and pool.gpus_per_worker == 0,
    )
    started = time.monotonic()
    previous = signal.getsignal(signal.SIGTERM)
    _install_sigterm()
    try:
        with view:
            run_json.workers = scheduler.start()
            busy_from = time.monotonic()
            recorded = None if config.rerun_changed else resume.recorded
            jobs = pending_jobs(storage, info, resume.finished, config.worker.param_defaults,
                                recorded, summary)  # fmt: skip
            scheduler.run(sink.track(jobs))
            summary.busy_seconds = time.monotonic() - busy_from
    except KeyboardInterrupt:
        summary.interrupted = True
        log.warning("interrupted: keeping the finished jobs; rerun the command to resume")
    finally:
        try:
            if lock.lost or not lock.still_held():  # another run owns OUT now: write nothing
                writer.broken = OutputWriteError(_LOST)
                log.warning("%s", _LOST)
            else:
                with _signals_held():
                    writer.flush()  # raises OutputWriteError if OUT cannot take results
        finally:
            summary.worker_deaths = scheduler.deaths
            summary.infrastructure_retries = scheduler.infra_errors
            summary.timeouts, summary.stalls = scheduler.timeouts, scheduler.stalls
            run_json.workers = list(scheduler.placed)  # replacements too
            summary.seconds = time.monotonic() - started
            try:  # an interrupted run stops at once: no waiting for the workers' counts
                if not summary.interrupted:
                    run_json.packing = scheduler.packing_report()  # never raises
            finally:  # a second Ctrl-C while waiting still stops the workers
                scheduler.stop()
                _restore_sigterm(previous)


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Ignore SIGTERM and Ctrl-C while the last results are written: a stop signals every
    process of the job (Ray's job stop: the entrypoint and its children; a pod: its
    processes), often twice, and a second one must not cut the final flush short."""
    held = {}
    with contextlib.suppress(ValueError):  # not the main thread: nothing to hold
        for number in (signal.SIGTERM, signal.SIGINT):
            held[number] = signal.signal(number, signal.SIG_IGN)
    try:
        yield
    finally:
        for number, handler in held.items():
            signal.signal(number, handler)


def _install_sigterm() -> None:
    """SIGTERM (e.g. Kubernetes) stops like Ctrl-C: flush, then exit."""
    with contextlib.suppress(ValueError):  # not the main thread (e.g. inside a test runner)
        signal.signal(signal.SIGTERM, signal.default_int_handler)


def _restore_sigterm(previous) -> None:
    with contextlib.suppress(ValueError, TypeError):
        signal.signal(signal.SIGTERM, previous)
