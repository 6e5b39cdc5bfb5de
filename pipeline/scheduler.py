"""Feeding jobs to long-lived Ray actors, one per GPU (or per CPU share), with recovery.

Why this design and not a ready-made one:
- ``ray.util.ActorPool`` re-raises an actor's death and stops the whole run, and Ray Data's
  ``map_batches`` puts a small manifest into one block (one actor does all the work). We need
  per-job failure isolation and recovery from a dead worker, so the driver drives the actors
  itself with plain public Ray calls (``ray.wait`` / ``ray.get`` / ``ray.kill``).
- Each lane of an actor holds at most one job (one lane per actor unless it packs several
  fits per GPU: ``--fits-per-gpu``), so at most ``workers x lanes`` jobs are in flight. When a
  lane answers, the next job is pulled from a lazy iterator over the manifest: the driver never
  holds more than one Parquet batch of rows, and the next job starts within one round trip
  (milliseconds, against fits of seconds to minutes). With several lanes per actor the driver
  looks ahead instead: a bounded buffer of the next jobs, keyed by image size from their
  headers, from which a free lane gets a job that fits its actor's current pack
  (lookahead.py: the key, the picking rule, the fairness bound, the knobs).
- A job's own errors come back as a ``failed`` row from the worker (see worker.py); only a dead
  process surfaces here, as ``RayActorError``. Because a lane runs one job at a time we know
  exactly which jobs the actor was running: the actor is replaced and those jobs retried, up to
  ``max_attempts`` in all (the ``attempts`` column), then recorded as failed.
- Actors also answer ``progress()`` from a separate concurrency group while they fit, so the
  bar shows live steps per second without interrupting the job, and ``packing()`` (their pack
  occupancy, gathered once at the end for run.json).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import ray
import torch

from pipeline.errors import InfrastructureError
from pipeline.lookahead import DEFAULT_DEPTH, UNKNOWN, Entry, KeyReader, Lookahead
from pipeline.manifest import Job
from pipeline.outputs import JobOutcome
from pipeline.packing import PackedFitService, PackingConfig, summarize
from pipeline.storage import Storage, is_process_local
from pipeline.worker import WORKER_HOOK, Fitter, WorkerConfig, failed_outcome

log = logging.getLogger("dippipe")
PROGRESS_POLL_SECONDS = 1.0
WAIT_SECONDS = 0.5  # longest wait for a job to end before the loop looks around again
READ_WAIT_SECONDS = 0.02  # the same while a free lane waits for a header being read
PACKING_STATS_SECONDS = 10.0  # how long the end of a run waits for the actors' occupancy
DEATH_ERRORS = (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError)


DEFAULT_STALL_SECONDS = 1800.0  # no step progress this long: the worker is stalled
DEFAULT_WORKER_WAIT = 1800.0  # no worker placed this long: the run stops
DEFAULT_WORKER_INFRA_ERRORS = 3  # infrastructure errors in a row that retire a worker
AUTO_CUDA_LANES = 4  # --fits-per-gpu auto on a CUDA worker (packing.py caps it by memory)


def lanes_for(config: WorkerConfig, auto_cuda: int | None = None) -> int:
    """Jobs a worker takes at once: --fits-per-gpu, or auto (0): 4 on CUDA, 1 on a CPU.
    ``auto_cuda`` answers for a process that cannot look at its own device (the driver)."""
    if config.fits_per_gpu > 0:
        return config.fits_per_gpu
    if auto_cuda is not None:
        return auto_cuda
    uses_cuda = config.device != "cpu" and torch.cuda.is_available()
    return AUTO_CUDA_LANES if uses_cuda else 1


def worker_hook_env() -> dict[str, str]:
    """With a worker hook set (worker.py), the variables that go to every worker through Ray's
    runtime_env: the hook and the driver's other DIPPIPE_* settings (workers of a cluster
    started separately do not inherit the driver's environment). Empty without a hook."""
    if not os.environ.get(WORKER_HOOK):
        return {}
    return {key: value for key, value in os.environ.items() if key.startswith("DIPPIPE_")}


class WorkersKeepDying(InfrastructureError):
    """Workers die before finishing anything: the run is stopped rather than spinning."""


# Ray's type stubs know neither `concurrency_groups` nor the `.options` of the actor class.
@ray.remote(max_restarts=0, concurrency_groups={"status": 1})  # type: ignore[call-overload]
class FitActor:
    """Fitters in their own process, one per lane, each with one job at a time (one lane
    unless the worker packs several fits per GPU); `progress` answers while they fit."""

    def __init__(self, config: WorkerConfig, name: str) -> None:
        node = ray.util.get_node_ip_address()
        self.info = {"worker": name, "node": node, "pid": os.getpid(), "gpus": ray.get_gpu_ids()}
        lanes = lanes_for(config)
        self.info["lanes"] = lanes
        service = None
        if lanes > 1:
            service = PackedFitService(PackingConfig(lanes, config.device))
        self.service = service
        self.fitters = [
            Fitter(config, name, node, service, ship_process_local=True) for _ in range(lanes)
        ]

    def run(self, job: Job, attempt: int, payload: dict[str, bytes], lane: int = 0) -> JobOutcome:
        return self.fitters[lane].run(job, attempt, payload)

    @ray.method(concurrency_group="status")
    def describe(self) -> dict[str, Any]:
        return self.info

    @ray.method(concurrency_group="status")
    def progress(self, lane: int = 0) -> dict[str, Any]:
        return self.fitters[lane].progress

    @ray.method(concurrency_group="status")
    def packing(self) -> dict[str, Any] | None:
        """The pack occupancy counts so far (packing.py); None when this worker does not pack."""
        return None if self.service is None else self.service.stats()


@dataclass(frozen=True)
class PoolSpec:
    workers: int
    gpus_per_worker: int  # 1 (GPU workers) or 0 (CPU workers)
    cpus_per_worker: float


@dataclass
class Lane:
    """One lane of one actor: the unit that holds at most one job."""

    name: str
    actor: Any
    index: int = 0  # which of its actor's lanes
    job: Job | None = None
    attempt: int = 0
    ref: Any = None
    live_step: int = 0
    sent_to: Any = None  # the actor the job went to (lanes share one; it may be replaced)
    starting: Any = None  # describe() of a replacement actor not yet placed on a node
    entry: Entry | None = None  # the job's look-ahead entry (its key), when it came from one
    sent: int = 0  # when the job was sent (a counter): the actor's last one sets its key


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
    lanes: list[Lane] = field(default_factory=list)
    retry: deque = field(default_factory=deque)
    deaths: int = 0
    _deaths_in_a_row: int = 0
    _polls: dict = field(default_factory=dict)
    _last_poll: float = 0.0
    buffer: Lookahead | None = None  # set by start() when look-ahead applies
    _reader: KeyReader | None = None
    _retry_entries: dict = field(default_factory=dict)  # job id -> its entry, while retried
    _sent: int = 0
    _lane_waits_for_read: bool = False

    def start(self) -> list[dict[str, Any]]:
        actors = [self._new_actor(f"worker-{i}") for i in range(self.pool.workers)]
        infos = self._describe_replacing_the_dead(actors)
        for actor, info in zip(actors, infos, strict=True):
            name, count = info["worker"], info["lanes"]
            self.lanes += [
                Lane(name if count == 1 else f"{name}/{k}", actor, k) for k in range(count)
            ]
        for info in infos:
            log.info("%s ready on node %s (pid %s, gpus %s, %s lane(s))", *info.values())
        if self.lookahead > 0 and any(info["lanes"] > 1 for info in infos):
            capacity = self.lookahead * len(self.lanes)
            self.buffer = Lookahead(capacity, self.lookahead_passes)
            self._reader = KeyReader(self.storage, self.worker_config, self.header_readers)
            log.info("look-ahead: %d buffered job(s), keyed by image size", capacity)
        return infos

    def _describe_replacing_the_dead(self, actors: list[Any]) -> list[dict[str, Any]]:
        """describe() of every new actor; one that dies while starting (killed, out of
        memory) is replaced, up to max_attempts times each, instead of ending the run."""
        infos: list[dict[str, Any] | None] = [None] * len(actors)
        for _ in range(self.max_attempts + 1):
            pending = {i: actors[i].describe.remote() for i, got in enumerate(infos) if not got}
            for i, ref in pending.items():
                try:
                    infos[i] = ray.get(ref)
                except DEATH_ERRORS as error:
                    self.deaths += 1
                    reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
                    log.warning("worker-%d died while starting; replacing it: %s", i, reason)
                    actors[i] = self._new_actor(f"worker-{i}")
            if all(infos):
                return infos  # type: ignore[return-value]
        raise WorkersKeepDying("workers keep dying while they start")

    def _new_actor(self, name: str) -> Any:
        options: dict[str, Any] = {
            "num_gpus": self.pool.gpus_per_worker,
            "num_cpus": self.pool.cpus_per_worker,
            "name": None,
            # One thread per lane for `run`; the "status" group answers besides.
            "max_concurrency": lanes_for(self.worker_config, AUTO_CUDA_LANES),
        }
        hook_env = worker_hook_env()
        if hook_env:
            options["runtime_env"] = {"env_vars": hook_env}
        return FitActor.options(**options).remote(self.worker_config, name)  # type: ignore[attr-defined]

    def stop(self) -> None:
        if self._reader is not None:
            self._reader.close()
        for actor in {id(lane.actor): lane.actor for lane in self.lanes}.values():
            ray.kill(actor, no_restart=True)

    def running(self) -> int:
        return sum(lane.job is not None for lane in self.lanes)

    def run(self, jobs: Iterator[Job]) -> None:
        """Feed every job to a free lane until all have an outcome."""
        exhausted = False
        while True:
            self._check_started()
            exhausted = self._fill(jobs, exhausted)
            busy = {lane.ref: lane for lane in self.lanes if lane.job is not None}
            if not busy:
                if exhausted and not self.retry and not self.buffer:
                    return
                starting = self._starting()
                if starting:  # every worker lost: wait for a replacement to be placed
                    ray.wait(starting, num_returns=1, timeout=0.5)
                continue
            ready, rest = ray.wait(list(busy), num_returns=1, timeout=self._wait_seconds())
            if ready and rest:  # collect everything else that is already done
                more, _ = ray.wait(rest, num_returns=len(rest), timeout=0)
                ready += more
            for ref in ready:
                self._collect(busy[ref])
            self._poll_progress()

    def _fill(self, jobs: Iterator[Job], exhausted: bool) -> bool:
        if self.buffer is not None:
            return self._fill_sized(jobs, exhausted, self.buffer)
        for lane in self.lanes:
            if lane.job is not None or lane.starting is not None:
                continue
            if self.retry:
                job, attempt = self.retry.popleft()
            elif not exhausted:
                job, attempt = next(jobs, None), 1
                if job is None:
                    exhausted = True
                    continue
            else:
                continue
            self._submit(lane, job, attempt)
        return exhausted

    def _fill_sized(self, jobs: Iterator[Job], exhausted: bool, buffer: Lookahead) -> bool:
        """_fill with look-ahead: retries first, then the buffered job that fits the lane's
        actor (Lookahead.pick); the buffer is topped up from the stream as jobs leave it."""
        exhausted = self._top_up(jobs, exhausted, buffer)
        self._lane_waits_for_read = False
        for lane in self.lanes:
            if lane.job is not None or lane.starting is not None:
                continue
            if self.retry:
                job, attempt = self.retry.popleft()
                self._submit(lane, job, attempt, self._retry_entries.pop(job.id, None))
                continue
            entry = buffer.pick(self._actor_key(lane.actor))
            if entry is None:
                self._lane_waits_for_read = bool(buffer)
                continue
            self._submit(lane, entry.job, 1, entry)
            exhausted = self._top_up(jobs, exhausted, buffer)
        return exhausted

    def _top_up(self, jobs: Iterator[Job], exhausted: bool, buffer: Lookahead) -> bool:
        assert self._reader is not None, "start() sets both"
        while not exhausted and buffer.room > 0:
            job = next(jobs, None)
            if job is None:
                return True
            self._reader.submit(buffer.add(job))
        return exhausted

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
        lane.ref = lane.actor.run.remote(job, attempt, self._payload(job), lane.index)
        log.info("job %s (%s) -> %s, attempt %d", job.id, job.task, lane.name, attempt)

    def _payload(self, job: Job) -> dict[str, bytes]:
        """Bytes of the job's memory:// inputs, which only the driver's process can read."""
        payload = {}
        for uri in job.inputs.values():
            if is_process_local(uri):
                # A missing file is left for the worker to report as the job's error.
                with contextlib.suppress(FileNotFoundError):
                    payload[uri] = self.storage.read_bytes(uri)
        return payload

    def _collect(self, lane: Lane) -> None:
        job, attempt, ref, entry = lane.job, lane.attempt, lane.ref, lane.entry
        if job is None:  # an idle lane: nothing to collect
            return
        lane.job, lane.ref, lane.entry = None, None, None
        try:
            outcome = ray.get(ref, timeout=0)
        except DEATH_ERRORS as error:
            outcome = self._worker_died(lane, job, attempt, error)
            if outcome is None and entry is not None:  # retried: it keeps its key
                self._retry_entries[job.id] = entry
        except ray.exceptions.RayError as error:  # e.g. an input that cannot be pickled
            outcome = failed_outcome(job, f"{type(error).__name__}: {error}", attempt, lane.name)
        if outcome is not None:
            self._deaths_in_a_row = 0
            self.on_outcome(outcome)

    def _worker_died(self, lane: Lane, job: Job, attempt: int, error: Exception):
        self._deaths_in_a_row += 1
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        log.warning("%s died running job %s (attempt %d): %s", lane.name, job.id, attempt, reason)
        if self._deaths_in_a_row > 2 * len(self.lanes) + self.max_attempts:
            raise WorkersKeepDying(f"workers keep dying without finishing a job: {reason}")
        if lane.actor is lane.sent_to:  # the first of its lanes to notice replaces the actor
            self.deaths += 1  # one per process, whatever number of lanes it had
            ray.kill(lane.actor, no_restart=True)
            dead, replacement = lane.actor, self._new_actor(lane.name.split("/")[0])
            placed = replacement.describe.remote()
            for other in self.lanes:
                if other.actor is dead:
                    other.actor, other.starting = replacement, placed
        if attempt < self.max_attempts:
            self.retry.append((job, attempt + 1))
            return None
        message = f"the worker process died {attempt} times while running this job ({reason})"
        return failed_outcome(job, message, attempt, lane.name)

    def _starting(self) -> list[Any]:
        """describe() of the replacement actors not yet placed, once each (lanes share one)."""
        starting = [lane.starting for lane in self.lanes if lane.starting is not None]
        return list({id(ref): ref for ref in starting}.values())

    def _check_started(self) -> None:
        """A replacement takes jobs once placed; until then (its node lost for good, no
        free GPU) the other workers take the retries, so no job waits for it."""
        starting = self._starting()
        if not starting:
            return
        done, _ = ray.wait(starting, num_returns=len(starting), timeout=0)
        for lane in self.lanes:
            if lane.starting is not None and lane.starting in done:
                lane.starting = None

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
                if lane.job is not None and state.get("id") == job_id:
                    lane.live_step = int(state.get("step") or 0)
        now = time.monotonic()
        if now - self._last_poll >= PROGRESS_POLL_SECONDS:
            self._last_poll = now
            polled = {lane.name for lane, _ in self._polls.values()}
            for lane in self.lanes:
                if lane.job is not None and lane.name not in polled:
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
        actors = {id(lane.actor): lane.actor for lane in self.lanes if lane.starting is None}
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
