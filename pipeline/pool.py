"""The fitting actors of a run, one per slot (worker-0 ... worker-N-1): asked of Ray, noticed
when placed, killed and replaced in their slot.

Ray places an actor when a node has its GPUs and CPUs free, which may be much later (an
autoscaler adding a node) or never. So nothing waits for all of them: the scheduler gives
lanes to each actor as it is placed (:meth:`Pool.placed`), and the run stops only when *no*
actor is placed for ``worker_wait`` seconds (health.py). A replacement is asked for at once
whenever an actor is lost, and every loss not charged to a job that ran alone counts
towards health.py's ``WorkersKeepDying``.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import ray

from pipeline.actor import AUTO_CUDA_LANES, FitActor, lanes_for, worker_hook_env
from pipeline.errors import WorkerDeviceError
from pipeline.health import PoolHealth, WorkerWait
from pipeline.worker import WorkerConfig

log = logging.getLogger("dippipe")
DEATH_ERRORS = (
    ray.exceptions.RayActorError,
    ray.exceptions.WorkerCrashedError,
    ray.exceptions.OutOfMemoryError,  # Ray's memory monitor killed the process
)


@dataclass(frozen=True)
class PoolSpec:
    workers: int
    gpus_per_worker: int  # 1 (GPU workers) or 0 (CPU workers)
    cpus_per_worker: float


@dataclass
class Worker:
    """One actor of a slot, from its request until it is lost."""

    slot: str
    actor: Any
    serial: int  # unique in the run: "different workers" for a job's infrastructure errors
    placed: Any  # describe()'s reference until it answers, then None
    infra_in_a_row: int = 0
    asked: float = field(default_factory=time.monotonic)  # when it was asked for


@dataclass
class Pool:
    spec: PoolSpec
    config: WorkerConfig
    health: PoolHealth
    wait: WorkerWait
    workers: dict[str, Worker] = field(default_factory=dict)  # slot -> its current actor
    replaced: int = 0  # actors lost and replaced (died, retired, killed)
    _serials: Iterator[int] = field(default_factory=itertools.count)

    def request(self, slot: str) -> None:
        options: dict[str, Any] = {
            "num_gpus": self.spec.gpus_per_worker,
            "num_cpus": self.spec.cpus_per_worker,
            "name": None,
            # One thread per lane for `run`; the "status" group answers besides.
            "max_concurrency": lanes_for(self.config, AUTO_CUDA_LANES),
        }
        hook_env = worker_hook_env()
        if hook_env:
            options["runtime_env"] = {"env_vars": hook_env}
        actor = FitActor.options(**options).remote(self.config, slot)  # type: ignore[attr-defined]
        self.workers[slot] = Worker(slot, actor, next(self._serials), actor.describe.remote())

    def placed(self, wait: float, serving: bool) -> list[tuple[Worker, dict[str, Any]]]:
        """The actors placed since the last call, with their describe(), waiting up to
        ``wait`` s for one. One that died while starting is replaced; one with a GPU it
        cannot use stops the run (WorkerDeviceError); ``serving``: some actor was already
        placed (else, past worker_wait s, NoWorkersError)."""
        pending = {w.placed: w for w in self.workers.values() if w.placed is not None}
        new: list[tuple[Worker, dict[str, Any]]] = []
        if pending:
            done, _ = ray.wait(list(pending), num_returns=1, timeout=wait)
            if done:
                done, _ = ray.wait(list(pending), num_returns=len(pending), timeout=0)
            for ref in done:
                worker = pending[ref]
                worker.placed = None
                try:
                    info = ray.get(ref)
                except DEATH_ERRORS as error:
                    log.warning("%s died while starting; replacing it: %s", worker.slot,
                                first_line(error))  # fmt: skip
                    self.retire(worker, f"died while starting: {first_line(error)}")
                    continue
                if info.get("device_error"):
                    where = f"{worker.slot} on node {info['node']}"
                    raise WorkerDeviceError(f"{where}: {info['device_error']}")
                self.health.placed_slots.add(worker.slot)
                new.append((worker, info))
        spec = self.spec
        asked = f"{spec.workers} worker(s) of {spec.gpus_per_worker} GPU(s) and "
        asked += f"{spec.cpus_per_worker:g} CPU(s)"
        self.wait.update(serving or bool(new), time.monotonic(), asked)
        return new

    def coming(self, within: float) -> set[str]:
        """Slots whose actor is not placed yet, asked for less than ``within`` s ago."""
        now = time.monotonic()
        return {w.slot for w in self.workers.values()
                if w.placed is not None and now - w.asked < within}  # fmt: skip

    def worker_of(self, slot: str, actor: Any) -> Worker | None:
        """The slot's current Worker if ``actor`` is still it."""
        worker = self.workers.get(slot)
        return worker if worker is not None and worker.actor is actor else None

    def retire(self, worker: Worker, reason: str) -> None:
        """Kill the actor, ask for a replacement in its slot, count the loss (health.py:
        may raise WorkersKeepDying)."""
        ray.kill(worker.actor, no_restart=True)
        self.replaced += 1  # one per process, whatever number of lanes it had
        self.request(worker.slot)
        self.health.lost(worker.slot, reason)

    def stop(self) -> None:
        for worker in self.workers.values():
            ray.kill(worker.actor, no_restart=True)


def first_line(error: BaseException) -> str:
    """The first line of an error's message (Ray's carry a traceback), or its type."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
