"""Feeding jobs to long-lived Ray actors, one per GPU (or per CPU share), with recovery.

Why this design and not a ready-made one:
- ``ray.util.ActorPool`` re-raises an actor's death and stops the whole run, and Ray Data's
  ``map_batches`` puts a small manifest into one block (one actor does all the work). We need
  per-job failure isolation and recovery from a dead worker, so the driver drives the actors
  (actor.py) itself with plain public Ray calls (``ray.wait`` / ``ray.get`` / ``ray.kill``).
- Each lane of an actor holds at most one job (one lane per actor unless it packs several
  fits per GPU: ``--fits-per-gpu``), so at most ``workers x lanes`` jobs are in flight. When a
  lane answers, the next job is pulled from a lazy iterator over the manifest: the driver never
  holds more than one Parquet batch of rows, and the next job starts within one round trip
  (milliseconds, against fits of seconds to minutes). With several lanes per actor the driver
  looks ahead instead: a bounded buffer of the next jobs, keyed by image size from their
  headers, from which a free lane gets a job that fits its actor's current pack
  (lookahead.py: the key, the picking rule, the fairness bound, the knobs).
- Jobs start on the workers that are placed; the others join when Ray places them (an
  autoscaler adding GPU nodes). No worker placed for ``worker_wait`` s stops the run. The
  actors by slot, their placement and replacement are pool.py's.
- Faults (faults.py says which errors are which). A job's own error comes back as a
  ``failed`` row and is committed. An infrastructure error (CUDA, credentials, storage,
  lost objects) comes back as an outcome of that kind and is never committed on first sight:
  the job goes back to the queue, preferably to another worker, and the error counts against
  the worker (``worker_infra_errors`` in a row retire it: killed and replaced). A job that met
  infrastructure errors on ``max_attempts`` different workers, while other jobs ended ok, is
  recorded failed (``error_kind`` "infrastructure"; a plain rerun retries it). Who is
  charged, here and below, is recovery.py's rule.
- A dead process surfaces as ``RayActorError``; a job past ``job_timeout``, or on an actor
  none of whose lanes made progress for ``stall_seconds``, gets its worker killed
  (health.py). Either way every job in flight on that actor needs a new home, and only a
  job that ran *alone* there is charged an attempt (the ``attempts`` column, up to
  ``max_attempts``, then failed as "died" or "timeout"). The jobs in flight at a death of a
  multi-lane actor are *suspects*: requeued uncharged, each then runs alone on an actor (no
  other job is sent to it meanwhile, and busy actors drain while a suspect waits), so the
  next death names the culprit. For a timeout or stall the
  overdue job is the suspect and the others are requeued as they were.
- Losing workers in a row, on every worker, with no job ending ok, stops the run
  (``WorkersKeepDying``, health.py) instead of spinning; a loss charged to the job that ran
  alone there is not counted (its attempts bound it).
- Actors also answer ``progress()`` from a separate concurrency group while they fit, so the
  bar shows live steps per second, the stall check sees steps and heartbeats, and
  ``packing()`` (their pack occupancy, gathered once at the end for run.json).
- CPU workers without ``--threads`` lend their cores at the tail of a run: once no job is
  left to start, the busy workers of a node share the CPUs that the run's workers reserve
  there (``_threads_for``), so the last job of a run is not left on one thread while the
  others' cores idle. Never more threads on a node than the CPUs Ray reserved for the run
  there; a job retried meanwhile takes its worker's share back (the busy ones lower their
  count at their next progress report). A fit's last bits depend on its thread count, so
  runs that must match bit for bit set ``--threads``.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import ray

from pipeline.actor import lanes_for, worker_hook_env
from pipeline.errors import WorkersKeepDying
from pipeline.faults import classify
from pipeline.health import PoolHealth, WorkerWait, overdue_on_actor
from pipeline.lookahead import DEFAULT_DEPTH, UNKNOWN, Entry, KeyReader, Lookahead
from pipeline.manifest import Job
from pipeline.outputs import KIND_DIED, KIND_INFRA, KIND_TIMEOUT, JobOutcome
from pipeline.packing import summarize
from pipeline.pool import DEATH_ERRORS, Pool, PoolSpec, Worker, first_line
from pipeline.recovery import Fail, Recovery
from pipeline.storage import Storage, is_process_local
from pipeline.worker import WorkerConfig, failed_outcome

__all__ = ["PoolSpec", "Scheduler", "WorkersKeepDying", "lanes_for", "worker_hook_env"]
log = logging.getLogger("dippipe")
PROGRESS_POLL_SECONDS = 1.0
WAIT_SECONDS = 0.5  # longest wait for a job to end before the loop looks around again
READ_WAIT_SECONDS = 0.02  # the same while a free lane waits for a header being read
PACKING_STATS_SECONDS = 10.0  # how long the end of a run waits for the actors' occupancy
# How long a job failed by the infrastructure on some slots waits for another slot's actor
# to be placed (a replacement takes seconds; a new node from an autoscaler, minutes).
SLOT_WAIT_SECONDS = 300.0

# Half an hour: a fit of a large image takes minutes; reading a huge input reports heartbeats.
DEFAULT_STALL_SECONDS = 1800.0  # no step progress this long: the worker is stalled
# Half an hour: long enough for an autoscaler to add a GPU node (cold start of a big image).
DEFAULT_WORKER_WAIT = 1800.0  # no worker placed this long: the run stops
# Three: one odd error is forgiven; a worker failing job after job is replaced in milliseconds.
DEFAULT_WORKER_INFRA_ERRORS = 3  # infrastructure errors in a row that retire a worker


@dataclass
class Lane:
    """One lane of one placed actor: the unit that holds at most one job."""

    name: str
    actor: Any
    index: int = 0  # which of its actor's lanes
    job: Job | None = None
    attempt: int = 0
    ref: Any = None
    live_step: int = 0
    node: str | None = None  # its actor's node (describe())
    sent_to: Any = None  # the actor the job went to
    entry: Entry | None = None  # the job's look-ahead entry (its key), when it came from one
    sent: int = 0  # when the job was sent (a counter): the actor's last one sets its key
    started: float = 0.0  # when the job was sent (monotonic): job_timeout
    moved: float = 0.0  # when it last showed progress: stall_seconds
    seen: Any = None  # its last (step, heartbeat) polled

    @property
    def slot(self) -> str:
        """The worker slot (worker-3), which its replacements keep."""
        return self.name.split("/")[0]


@dataclass
class Scheduler:
    pool: PoolSpec
    worker_config: WorkerConfig
    storage: Storage
    on_outcome: Callable[[JobOutcome], None]
    on_tick: Callable[[int, int], None]  # (running jobs, live steps)
    max_attempts: int = 3
    # Look-ahead (lookahead.py): buffered jobs per lane, 0 = off (manifest order); the fairness
    # bound (None: the buffer's size); threads reading image headers.
    lookahead: int = DEFAULT_DEPTH
    lookahead_passes: int | None = None
    header_readers: int = 4
    # Timeouts and fault limits: RunConfig's fields of the same names (runner.py).
    job_timeout: float | None = None
    stall_seconds: float | None = DEFAULT_STALL_SECONDS
    worker_wait: float | None = DEFAULT_WORKER_WAIT
    worker_infra_errors: int = DEFAULT_WORKER_INFRA_ERRORS
    # Called with each worker's describe() when it is placed (start or replacement); what it
    # raises stops the run (runner.py refuses a local OUT on another node).
    on_placed: Callable[[dict[str, Any]], None] | None = None
    # CPU workers whose thread count may follow the load (no --threads): see _threads_for.
    share_idle_cpus: bool = False
    lanes: list[Lane] = field(default_factory=list)  # of placed actors only
    retry: deque = field(default_factory=deque)  # (job, attempt) to send again
    placed: list[dict[str, Any]] = field(default_factory=list)  # describe() of every actor
    # Counts for the run's summary (and `deaths`, below): infrastructure errors retried,
    # jobs stopped for --job-timeout or stall_seconds.
    infra_errors: int = 0
    timeouts: int = 0
    stalls: int = 0
    buffer: Lookahead | None = None  # set when the first actor with several lanes is placed
    _reader: KeyReader | None = None
    _retry_entries: dict = field(default_factory=dict)  # job id -> its entry, while retried
    _sent: int = 0
    _tail: bool = False  # no job left to start: only those running, none queued
    _threads: dict = field(default_factory=dict)  # id(actor) -> the threads it was last given
    _lane_waits_for_read: bool = False
    _polls: dict = field(default_factory=dict)
    _last_poll: float = 0.0
    _health: PoolHealth = field(init=False)
    _actors: Pool = field(init=False)  # the actors by slot, placed or not (pool.py)
    _recovery: Recovery = field(init=False)  # suspects, and jobs' infrastructure errors

    def __post_init__(self) -> None:
        self._recovery = Recovery(self.max_attempts)
        self._health = PoolHealth(self.pool.workers, self.max_attempts)
        wait = WorkerWait(self.worker_wait)
        self._actors = Pool(self.pool, self.worker_config, self._health, wait)

    @property
    def deaths(self) -> int:
        """Worker processes replaced: died, retired after infrastructure errors, or killed
        for a timeout or stall."""
        return self._actors.replaced

    def start(self) -> list[dict[str, Any]]:
        """Ask for every actor; return once at least one is placed (their describe()), or
        raise NoWorkersError after worker_wait s. The others join run() when placed."""
        for i in range(self.pool.workers):
            self._actors.request(f"worker-{i}")
        while not self.lanes:
            self._check_placed(WAIT_SECONDS)
        return list(self.placed)

    def _check_placed(self, wait: float = 0.0) -> None:
        """Give lanes to the actors placed since the last look (pool.py), waiting up to
        ``wait`` s for one."""
        for worker, info in self._actors.placed(wait, bool(self.lanes)):
            if self.on_placed is not None:
                self.on_placed(info)
            self.placed.append(info)
            count = info["lanes"]
            self.lanes += [
                Lane(worker.slot if count == 1 else f"{worker.slot}/{k}", worker.actor, k,
                     node=info["node"])
                for k in range(count)
            ]  # fmt: skip
            log.info("%s ready on node %s (pid %s, gpus %s, %s lane(s), %s thread(s))",
                     worker.slot, info["node"], info["pid"], info["gpus"], count,
                     info.get("threads"))  # fmt: skip
            if self.lookahead > 0 and count > 1 and self.buffer is None:
                capacity = self.lookahead * count * self.pool.workers
                self.buffer = Lookahead(capacity, self.lookahead_passes)
                self._reader = KeyReader(self.storage, self.worker_config, self.header_readers)
                log.info("look-ahead: %d buffered job(s), keyed by image size", capacity)

    def stop(self) -> None:
        if self._reader is not None:
            self._reader.close()
        self._actors.stop()

    def running(self) -> int:
        return sum(lane.job is not None for lane in self.lanes)

    def run(self, jobs: Iterator[Job]) -> None:
        """Feed every job to a free lane until all have an outcome."""
        exhausted = False
        while True:
            self._check_placed()
            self._check_overdue()
            exhausted = self._fill(jobs, exhausted)
            self._share_cpus(exhausted and not self.retry and not self.buffer)
            busy = {lane.ref: lane for lane in self.lanes if lane.job is not None}
            if not busy:
                if exhausted and not self.retry and not self.buffer:
                    return
                self._check_placed(WAIT_SECONDS)  # e.g. every worker lost: wait for one
                continue
            ready, rest = ray.wait(list(busy), num_returns=1, timeout=self._wait_seconds())
            if ready and rest:  # collect everything else that is already done
                more, _ = ray.wait(rest, num_returns=len(rest), timeout=0)
                ready += more
            for ref in ready:
                if busy[ref].ref is ref:  # not handed elsewhere by a loss just collected
                    self._collect(busy[ref])
            self._poll_progress()

    def _fill(self, jobs: Iterator[Job], exhausted: bool) -> bool:
        if self.buffer is not None:
            return self._fill_sized(jobs, exhausted, self.buffer)
        for lane in self._lanes_for_new_jobs():
            if exhausted:
                continue
            job = next(jobs, None)
            if job is None:
                exhausted = True
                continue
            self._submit(lane, job, 1)
        return exhausted

    def _fill_sized(self, jobs: Iterator[Job], exhausted: bool, buffer: Lookahead) -> bool:
        """_fill with look-ahead: retries first, then the buffered job that fits the lane's
        actor (Lookahead.pick); the buffer is topped up from the stream as jobs leave it."""
        exhausted = self._top_up(jobs, exhausted, buffer)
        self._lane_waits_for_read = False
        for lane in self._lanes_for_new_jobs():
            entry = buffer.pick(self._actor_key(lane.actor))
            if entry is None:
                self._lane_waits_for_read = bool(buffer)
                continue
            self._submit(lane, entry.job, 1, entry)
            exhausted = self._top_up(jobs, exhausted, buffer)
        return exhausted

    def _lanes_for_new_jobs(self) -> Iterator[Lane]:
        """Free lanes, each first given a job waiting for a retry if one may run there; the
        lanes yielded may take a new job (not held for a suspect, not draining)."""
        for lane in self.lanes:
            if lane.job is not None or self._held(lane):
                continue
            taken = self._take_retry(lane)
            if taken is not None:
                self._submit(lane, *taken)
            elif not self._draining(lane):
                yield lane

    def _top_up(self, jobs: Iterator[Job], exhausted: bool, buffer: Lookahead) -> bool:
        assert self._reader is not None, "set with the buffer"
        while not exhausted and buffer.room > 0:
            job = next(jobs, None)
            if job is None:
                return True
            self._reader.submit(buffer.add(job))
        return exhausted

    def _busy_with(self, actor: Any) -> list[Lane]:
        return [lane for lane in self.lanes if lane.job is not None and lane.actor is actor]

    def _held(self, lane: Lane) -> bool:
        """Its actor runs a suspect, which must run alone."""
        suspects = self._recovery.suspects
        if not suspects:  # the common case, without a scan of the lanes
            return False
        return any(other.job.id in suspects for other in self._busy_with(lane.actor))  # type: ignore[union-attr]

    def _draining(self, lane: Lane) -> bool:
        """A suspect waits for an idle actor: busy actors take no new job until it has one."""
        suspects = self._recovery.suspects
        waiting = bool(suspects) and any(job.id in suspects for job, _ in self.retry)
        return waiting and bool(self._busy_with(lane.actor))

    def _take_retry(self, lane: Lane) -> tuple[Job, int, Entry | None] | None:
        """The first retried job this lane may run, out of the queue: a suspect only on an
        idle actor; a job that met infrastructure errors on this worker slot only when every
        slot has failed it: it waits for another slot, placed or being placed (for up to
        SLOT_WAIT_SECONDS, so that no job waits forever for a node that never comes)."""
        if not self.retry:
            return None
        idle = not self._busy_with(lane.actor)
        slots = {other.slot for other in self.lanes} | self._actors.coming(SLOT_WAIT_SECONDS)
        for position, (job, attempt) in enumerate(self.retry):
            if not self._recovery.may_run(job.id, lane.slot, idle, slots):
                continue
            del self.retry[position]
            return job, attempt, self._retry_entries.pop(job.id, None)
        return None

    def _actor_key(self, actor: Any) -> Any:
        """The key of the job last sent to this actor and still running (the pack its free
        lanes should fill); None when it runs nothing."""
        mine = [lane for lane in self.lanes if lane.job is not None and lane.sent_to is actor]
        if not mine:
            return None
        last = max(mine, key=lambda lane: lane.sent)
        return UNKNOWN if last.entry is None else last.entry.key

    def _wait_seconds(self) -> float:
        """Short while a free lane waits for a match that a header being read may bring."""
        if self._lane_waits_for_read and self.buffer is not None and self.buffer.pending():
            return READ_WAIT_SECONDS
        return WAIT_SECONDS

    def _submit(self, lane: Lane, job: Job, attempt: int, entry: Entry | None = None) -> None:
        lane.job, lane.attempt, lane.live_step, lane.sent_to = job, attempt, 0, lane.actor
        self._sent += 1
        lane.entry, lane.sent = entry, self._sent
        lane.started = lane.moved = time.monotonic()
        lane.seen = None
        threads = self._threads_for(lane)
        if threads is not None:
            self._threads[id(lane.actor)] = threads
        lane.ref = lane.actor.run.remote(job, attempt, self._payload(job), lane.index, threads)
        alone = " (alone)" if job.id in self._recovery.suspects else ""
        log.info("job %s (%s) -> %s, attempt %d%s", job.id, job.task, lane.name, attempt, alone)

    def _threads_for(self, lane: Lane) -> int | None:
        """Torch threads for the jobs of the lane's actor: None (unchanged) without
        share_idle_cpus; else the CPUs each worker reserves, or in the tail of the run the
        CPUs that the run's placed workers reserve on the lane's node shared equally among
        the busy ones there (an idle worker's CPUs are lent, none beyond Ray's
        reservation). A retried job ends the lending (the busy count goes up)."""
        if not self.share_idle_cpus:
            return None
        own = self.worker_config.threads or 1
        if not self._tail:
            return own
        here = [other for other in self.lanes if other.node == lane.node]
        placed = len({id(other.actor) for other in here})
        busy = len({id(other.actor) for other in here if other.job is not None})
        return max(own, int(placed * self.pool.cpus_per_worker) // max(1, busy))

    def _share_cpus(self, tail: bool) -> None:
        """Give each busy actor its threads (_threads_for) when they change: the actor
        applies them at its fits' next progress report (worker.py Threads)."""
        if not self.share_idle_cpus:
            return
        self._tail = tail
        given: dict[Any, int | None] = {}  # per node: each node's share is the same
        for lane in self.lanes:
            if lane.job is None:
                continue
            if lane.node not in given:
                given[lane.node] = self._threads_for(lane)
            threads = given[lane.node]
            if threads is not None and self._threads.get(id(lane.actor)) != threads:
                self._threads[id(lane.actor)] = threads
                lane.actor.set_threads.remote(threads)  # no answer needed

    def _payload(self, job: Job) -> dict[str, bytes]:
        """Bytes of the job's memory:// inputs, which only the driver's process can read."""
        payload = {}
        for uri in job.inputs.values():
            if is_process_local(uri):
                # A missing file is left for the worker to report as the job's error.
                with contextlib.suppress(FileNotFoundError):
                    payload[uri] = self.storage.read_bytes(uri)
        return payload

    def _requeue(self, job: Job, attempt: int, entry: Entry | None) -> None:
        self.retry.append((job, attempt))
        if entry is not None:  # retried: it keeps its key
            self._retry_entries[job.id] = entry

    def _commit(self, outcome: JobOutcome) -> None:
        self._recovery.done(outcome.row["id"])
        if outcome.ok:
            self._health.ok({lane.slot for lane in self.lanes})
        self.on_outcome(outcome)

    def _collect(self, lane: Lane) -> None:
        if lane.job is None:  # an idle lane: nothing to collect
            return
        try:
            outcome = ray.get(lane.ref, timeout=0)
        except DEATH_ERRORS as error:
            self._lose(lane.actor, f"the process died ({first_line(error)})", None)
            return
        except ray.exceptions.RayError as error:  # an input that cannot be pickled, lost objects
            message = f"{type(error).__name__}: {error}"
            outcome = failed_outcome(lane.job, message, lane.attempt, lane.name, classify(error))
        job, attempt, entry = lane.job, lane.attempt, lane.entry
        lane.job, lane.ref, lane.entry = None, None, None
        worker = self._actors.worker_of(lane.slot, lane.actor)
        if outcome.row.get("error_kind") == KIND_INFRA:
            self._infrastructure_error(lane, worker, job, attempt, entry, outcome)
            return
        if worker is not None:  # the job ran to its own end: this worker works
            worker.infra_in_a_row = 0
        self._commit(outcome)

    def _infrastructure_error(
        self,
        lane: Lane,
        worker: Worker | None,
        job: Job,
        attempt: int,
        entry: Entry | None,
        outcome: JobOutcome,
    ) -> None:
        """Back to the queue, or failed (recovery.py); counted against the worker, which
        worker_infra_errors in a row retire."""
        self.infra_errors += 1
        error = str(outcome.row.get("error") or "")
        serial = -1 if worker is None else worker.serial
        oks = self._health.oks
        fail = self._recovery.infrastructure_error(job.id, serial, lane.slot, error, oks)
        if fail is None:
            log.warning("job %s met an infrastructure error on %s; retrying it on another "
                        "worker: %s", job.id, lane.name, error)  # fmt: skip
            self._requeue(job, attempt, entry)
        else:
            self._commit(failed_outcome(job, fail.message, fail.attempts, lane.name, fail.kind))
        if worker is not None:
            worker.infra_in_a_row += 1
            if worker.infra_in_a_row >= self.worker_infra_errors:
                why = f"{worker.infra_in_a_row} infrastructure errors in a row, the last: {error}"
                self._lose(worker.actor, why, set())

    def _lose(self, actor: Any, reason: str, culprits: set[str] | None) -> None:
        """Kill and replace an actor, giving its jobs in flight a new home (recovery.py
        says who is charged). ``culprits``: the lanes whose jobs caused it (a timeout or
        stall); None: unknown (a death), every job in flight; an empty set: none (a worker
        retired for infrastructure errors)."""
        busy = self._busy_with(actor)
        alone = len(busy) == 1
        jobs_fault = alone and (culprits is None or busy[0].name in culprits)  # charged
        kind = KIND_DIED if culprits is None else KIND_TIMEOUT
        self.lanes = [lane for lane in self.lanes if lane.actor is not actor]
        for lane in busy:
            job, attempt, entry = lane.job, lane.attempt, lane.entry
            assert job is not None
            lane.job, lane.ref, lane.entry = None, None, None
            culprit = culprits is None or lane.name in culprits
            then = self._recovery.lost(job.id, attempt, culprit, alone, reason, kind)
            if isinstance(then, Fail):
                self._commit(failed_outcome(job, then.message, then.attempts, lane.name, kind))
                continue
            if culprit:
                charged = "charged" if alone else "uncharged: it shared the worker"
                log.warning("job %s on %s: %s; it runs alone next, attempt %d (%s)", job.id,
                            lane.name, reason, then, charged)  # fmt: skip
            self._requeue(job, then, entry)
        worker = next((w for w in self._actors.workers.values() if w.actor is actor), None)
        if worker is not None:
            log.warning("%s lost: %s; replacing it", worker.slot, reason)
            if jobs_fault:  # the job's own, not the pool's: not counted (health.py)
                self._health.charged_to_job(worker.slot)
            self._actors.retire(worker, reason)

    def _check_overdue(self) -> None:
        """Kill the actors running a job past job_timeout, or none of whose lanes moved for
        stall_seconds (health.overdue_on_actor)."""
        if self.job_timeout is None and self.stall_seconds is None:
            return
        now = time.monotonic()
        by_actor: dict[int, list[Lane]] = {}
        for lane in self.lanes:
            if lane.job is not None:
                by_actor.setdefault(id(lane.actor), []).append(lane)
        found: dict[int, list[tuple[Lane, str]]] = {}
        for key, busy in by_actor.items():
            times = [(lane.started, lane.moved) for lane in busy]
            verdicts = overdue_on_actor(now, times, self.job_timeout, self.stall_seconds)
            for lane, why in zip(busy, verdicts, strict=True):
                if why is not None and not ray.wait([lane.ref], timeout=0)[0]:  # not just done
                    found.setdefault(key, []).append((lane, why))
        for overdue_lanes in found.values():
            lane, why = overdue_lanes[0]
            assert lane.job is not None
            if why == "timeout":
                self.timeouts += len(overdue_lanes)
                reason = f"ran longer than the job timeout ({self.job_timeout:g} s)"
            else:
                self.stalls += len(overdue_lanes)
                reason = f"made no progress for {self.stall_seconds:g} s (the stall limit)"
            log.warning("job %s on %s %s: killing its worker", lane.job.id, lane.name, reason)
            self._lose(lane.actor, reason, {lane.name for lane, _ in overdue_lanes})

    def _poll_progress(self) -> None:
        """Gather answers to earlier progress polls without waiting; send new ones each second."""
        if self._polls:
            done, _ = ray.wait(list(self._polls), num_returns=len(self._polls), timeout=0)
            for ref in done:
                lane, job_id = self._polls.pop(ref)
                try:
                    state = ray.get(ref, timeout=0)
                except ray.exceptions.RayError:
                    continue  # a dead actor: its job's own reference reports it
                if lane.job is not None and lane.job.id == job_id and state.get("id") == job_id:
                    lane.live_step = int(state.get("step") or 0)
                    seen = (state.get("step"), state.get("beat"))
                    if seen != lane.seen:
                        lane.seen, lane.moved = seen, time.monotonic()
        now = time.monotonic()
        if now - self._last_poll >= PROGRESS_POLL_SECONDS:
            self._last_poll = now
            polled = {id(lane) for lane, _ in self._polls.values()}
            for lane in self.lanes:
                if lane.job is not None and id(lane) not in polled:
                    self._polls[lane.actor.progress.remote(lane.index)] = (lane, lane.job.id)
        live_steps = sum(lane.live_step for lane in self.lanes if lane.job is not None)
        self.on_tick(self.running(), live_steps)

    def packing_report(self) -> dict[str, Any] | None:
        """run.json's ``packing``: the actors' pack occupancy (packing.summarize), with the
        look-ahead's figures; None when no worker packs. Asked once, at the end of the run:
        an actor replaced during the run took its counts with it. Never raises."""
        try:
            return self._packing_report()
        except Exception as error:  # a report must not hide how the run ended
            log.warning("could not gather the pack occupancy: %s", error)
            return None

    def _packing_report(self) -> dict[str, Any] | None:
        actors = {id(lane.actor): lane.actor for lane in self.lanes}
        refs = [actor.packing.remote() for actor in actors.values()]
        deadline = time.monotonic() + PACKING_STATS_SECONDS
        stats = []
        for ref in refs:
            try:
                answer = ray.get(ref, timeout=max(0.1, deadline - time.monotonic()))
            except (ray.exceptions.RayError, TimeoutError):
                continue  # a dead or stuck actor: report the others
            if answer:
                stats.append(answer)
        report = summarize(stats)
        if report is not None:
            report["lookahead"] = self._lookahead_report()
        return report

    def _lookahead_report(self) -> dict[str, Any] | None:
        if self.buffer is None or self._reader is None:
            return None
        buffer = self.buffer
        return {
            "buffer": buffer.capacity,
            "max_passes": buffer.max_passes,
            "picks": buffer.picks,
            "matched": buffer.matched,
            "forced": buffer.forced,
            **self._reader.stats(),
        }
