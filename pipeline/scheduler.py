"""Feeding jobs to long-lived Ray actors, one per GPU (or per CPU slot), with recovery.

Why this design and not a ready-made one:
- ``ray.util.ActorPool`` re-raises an actor's death and stops the whole run, and Ray Data's
  ``map_batches`` puts a small manifest into one block (one actor does all the work). We need
  per-job failure isolation and recovery from a dead worker, so the driver drives the actors
  itself with plain public Ray calls (``ray.wait`` / ``ray.get`` / ``ray.kill``).
- Each actor holds at most one job (bounded in flight: ``workers`` jobs). When it answers, the
  next job is pulled from a lazy iterator over the manifest: the driver never holds more than
  one Parquet batch of rows, and the next job starts within one round trip (milliseconds,
  against fits of seconds to minutes).
- A job's own errors come back as a ``failed`` row from the worker (see worker.py); only a dead
  process surfaces here, as ``RayActorError``. Because an actor runs one job at a time we know
  exactly which job it was running: the actor is replaced and that job retried, up to
  ``max_attempts`` in all (the ``attempts`` column), then recorded as failed.
- Actors also answer ``progress()`` from a separate concurrency group while they fit, so the
  bar shows live steps per second without interrupting the job.
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

from pipeline.manifest import Job
from pipeline.outputs import JobOutcome
from pipeline.packing import PackedFitService, PackingConfig
from pipeline.storage import Storage, is_process_local
from pipeline.worker import FAULT_KILL_JOB, FAULT_MARKER, Fitter, WorkerConfig, failed_outcome

log = logging.getLogger("dippipe")
PROGRESS_POLL_SECONDS = 1.0
DEATH_ERRORS = (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError)


AUTO_CUDA_LANES = 4  # --fits-per-gpu auto on a CUDA worker (packing.py caps it by memory)


def lanes_for(config: WorkerConfig, auto_cuda: int | None = None) -> int:
    """Jobs a worker takes at once: --fits-per-gpu, or auto (0): 4 on CUDA, 1 on a CPU.
    ``auto_cuda`` answers for a process that cannot look at its own device (the driver)."""
    if config.fits_per_device > 0:
        return config.fits_per_device
    if auto_cuda is not None:
        return auto_cuda
    uses_cuda = config.device != "cpu" and torch.cuda.is_available()
    return AUTO_CUDA_LANES if uses_cuda else 1


class WorkersKeepDying(RuntimeError):
    """Workers die before finishing anything: the run is stopped rather than spinning."""


@ray.remote(max_restarts=0, concurrency_groups={"status": 1})
class FitActor:
    """Fitters in their own process: one job per lane at a time (one lane unless the worker
    packs several fits per device); `progress` answers while they fit."""

    def __init__(self, config: WorkerConfig, name: str) -> None:
        node = ray.util.get_node_ip_address()
        self.info = {"worker": name, "node": node, "pid": os.getpid(), "gpus": ray.get_gpu_ids()}
        lanes = lanes_for(config)
        self.info["lanes"] = lanes
        service = None
        if lanes > 1:
            service = PackedFitService(PackingConfig(lanes, config.device))
        self.lanes = [Fitter(config, worker=name, node=node, service=service) for _ in range(lanes)]

    def run(self, job: Job, attempt: int, payload: dict[str, bytes], lane: int = 0) -> JobOutcome:
        return self.lanes[lane].run(job, attempt, payload)

    @ray.method(concurrency_group="status")
    def describe(self) -> dict[str, Any]:
        return self.info

    @ray.method(concurrency_group="status")
    def progress(self, lane: int = 0) -> dict[str, Any]:
        return self.lanes[lane].progress


@dataclass(frozen=True)
class PoolSpec:
    workers: int
    gpus_per_worker: int  # 1 (GPU workers) or 0 (CPU workers)
    cpus_per_worker: float


@dataclass
class Slot:
    """One lane of one actor: the unit that holds at most one job."""

    name: str
    actor: Any
    lane: int = 0
    job: Job | None = None
    attempt: int = 0
    ref: Any = None
    live_step: int = 0
    sent_to: Any = None  # the actor the job went to (lanes share one; it may be replaced)
    starting: Any = None  # describe() of a replacement actor not yet placed on a node


@dataclass
class Scheduler:
    pool: PoolSpec
    worker_config: WorkerConfig
    storage: Storage
    on_outcome: Callable[[JobOutcome], None]
    on_tick: Callable[[int, int], None]  # (running jobs, live steps)
    max_attempts: int = 3
    slots: list[Slot] = field(default_factory=list)
    retry: deque = field(default_factory=deque)
    deaths: int = 0
    _deaths_in_a_row: int = 0
    _polls: dict = field(default_factory=dict)
    _last_poll: float = 0.0

    def start(self) -> list[dict[str, Any]]:
        actors = [self._new_actor(f"worker-{i}") for i in range(self.pool.workers)]
        infos = self._describe_replacing_the_dead(actors)
        for actor, info in zip(actors, infos, strict=True):
            name, lanes = info["worker"], info["lanes"]
            self.slots += [
                Slot(name if lanes == 1 else f"{name}/{k}", actor, k) for k in range(lanes)
            ]
        for info in infos:
            log.info("%s ready on node %s (pid %s, gpus %s, %s lane(s))", *info.values())
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
        fault_env = {k: os.environ[k] for k in (FAULT_KILL_JOB, FAULT_MARKER) if k in os.environ}
        if fault_env:  # test-only hook; reaches workers of a running cluster too
            options["runtime_env"] = {"env_vars": fault_env}
        return FitActor.options(**options).remote(self.worker_config, name)

    def stop(self) -> None:
        for actor in {id(slot.actor): slot.actor for slot in self.slots}.values():
            ray.kill(actor, no_restart=True)

    def running(self) -> int:
        return sum(slot.job is not None for slot in self.slots)

    def run(self, jobs: Iterator[Job]) -> None:
        """Feed every job to a free actor until all have an outcome."""
        exhausted = False
        while True:
            self._check_started()
            exhausted = self._fill(jobs, exhausted)
            busy = {slot.ref: slot for slot in self.slots if slot.job is not None}
            if not busy:
                if exhausted and not self.retry:
                    return
                starting = [s.starting for s in self.slots if s.starting is not None]
                if starting:  # every worker lost: wait for a replacement to be placed
                    ray.wait(starting, num_returns=1, timeout=0.5)
                continue
            ready, rest = ray.wait(list(busy), num_returns=1, timeout=0.5)
            if ready and rest:  # collect everything else that is already done
                more, _ = ray.wait(rest, num_returns=len(rest), timeout=0)
                ready += more
            for ref in ready:
                self._collect(busy[ref])
            self._poll_progress()

    def _fill(self, jobs: Iterator[Job], exhausted: bool) -> bool:
        for slot in self.slots:
            if slot.job is not None or slot.starting is not None:
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
            self._submit(slot, job, attempt)
        return exhausted

    def _submit(self, slot: Slot, job: Job, attempt: int) -> None:
        slot.job, slot.attempt, slot.live_step, slot.sent_to = job, attempt, 0, slot.actor
        slot.ref = slot.actor.run.remote(job, attempt, self._payload(job), slot.lane)
        log.info("job %s (%s) -> %s, attempt %d", job.id, job.task, slot.name, attempt)

    def _payload(self, job: Job) -> dict[str, bytes]:
        """Bytes of the job's memory:// inputs, which only the driver's process can read."""
        payload = {}
        for uri in job.inputs.values():
            if is_process_local(uri):
                # A missing file is left for the worker to report as the job's error.
                with contextlib.suppress(FileNotFoundError):
                    payload[uri] = self.storage.read_bytes(uri)
        return payload

    def _collect(self, slot: Slot) -> None:
        job, attempt, ref = slot.job, slot.attempt, slot.ref
        slot.job, slot.ref = None, None
        try:
            outcome = ray.get(ref, timeout=0)
        except DEATH_ERRORS as error:
            outcome = self._worker_died(slot, job, attempt, error)
        except ray.exceptions.RayError as error:  # e.g. an input that cannot be pickled
            outcome = failed_outcome(job, f"{type(error).__name__}: {error}", attempt, slot.name)
        if outcome is not None:
            self._deaths_in_a_row = 0
            self.on_outcome(outcome)

    def _worker_died(self, slot: Slot, job: Job, attempt: int, error: Exception):
        self.deaths += 1
        self._deaths_in_a_row += 1
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        log.warning("%s died running job %s (attempt %d): %s", slot.name, job.id, attempt, reason)
        if self._deaths_in_a_row > 2 * len(self.slots) + self.max_attempts:
            raise WorkersKeepDying(f"workers keep dying without finishing a job: {reason}")
        if slot.actor is slot.sent_to:  # the first lane to notice replaces the actor for all
            ray.kill(slot.actor, no_restart=True)
            dead, replacement = slot.actor, self._new_actor(slot.name.split("/")[0])
            placed = replacement.describe.remote()
            for lane in self.slots:
                if lane.actor is dead:
                    lane.actor, lane.starting = replacement, placed
        if attempt < self.max_attempts:
            self.retry.append((job, attempt + 1))
            return None
        message = f"the worker process died {attempt} times while running this job ({reason})"
        return failed_outcome(job, message, attempt, slot.name)

    def _check_started(self) -> None:
        """A replacement takes jobs once placed; until then (its node lost for good, no
        free GPU) the other workers take the retries, so no job waits for it."""
        starting = list(
            {id(s.starting): s.starting for s in self.slots if s.starting is not None}.values()
        )
        if not starting:
            return
        done, _ = ray.wait(starting, num_returns=len(starting), timeout=0)
        for slot in self.slots:
            if slot.starting is not None and slot.starting in done:
                slot.starting = None

    def _poll_progress(self) -> None:
        """Gather answers to earlier progress polls without waiting; send new ones each second."""
        if self._polls:
            done, _ = ray.wait(list(self._polls), num_returns=len(self._polls), timeout=0)
            for ref in done:
                slot, job_id = self._polls.pop(ref)
                try:
                    state = ray.get(ref, timeout=0)
                except ray.exceptions.RayError:
                    continue  # a dead actor: its job's own reference reports it
                if slot.job is not None and state.get("id") == job_id:
                    slot.live_step = int(state.get("step") or 0)
        now = time.monotonic()
        if now - self._last_poll >= PROGRESS_POLL_SECONDS:
            self._last_poll = now
            polled = {slot.name for slot, _ in self._polls.values()}
            for slot in self.slots:
                if slot.job is not None and slot.name not in polled:
                    self._polls[slot.actor.progress.remote(slot.lane)] = (slot, slot.job.id)
        self.on_tick(self.running(), sum(s.live_step for s in self.slots if s.job is not None))
