"""The pool's health: when a running job is overdue, and when the whole run must stop.

- A job is *overdue* when it runs past ``job_timeout`` (wall clock since it was sent), or
  *stalled* when its worker shows no progress for ``stall_seconds``. A stall is judged per
  worker (actor), not per job: a hung CUDA call stops every lane of the actor, while a job
  whose packed fits wait in the queue behind another job's long pack (packing.py) makes no
  step of its own but is not stalled. So the lanes of an actor stall together, when none of
  them moved (was sent a job, made a new step, or a worker.py heartbeat while reading inputs
  or writing the output) for ``stall_seconds`` (:func:`overdue_on_actor`); one lane stuck
  while the others move is left to ``job_timeout``. The worker is killed and replaced; the
  scheduler decides who is charged (the job only when it ran alone on that worker).
- Workers *lost* (died, retired after infrastructure errors, killed for a timeout or stall)
  count in a row until a job ends ok anywhere, except a loss charged to a job that ran alone
  (it died or was overdue alone: the job's own fault, which its attempts bound, recovery.py).
  The run stops (``WorkersKeepDying``) when the count reaches ``2 x workers + max_attempts +
  1`` *and* every slot placed since that last ok (a slot whose actor was placed at the ok, or
  was placed after it) lost one since. So one bad node, or one job that kills its worker,
  never stops a run whose other workers finish jobs; jobs that only time out or die alone
  end as failed rows and never stop the run (nor does a pool of one-lane workers whose
  process dies under every job: each job fails "died" after its attempts); a slot Ray never
  places, or whose node went before the last ok and whose replacement is never placed, does
  not keep a failing run alive; and a healthy run, where jobs end ok between losses, never
  gets there.
- No worker placed for ``worker_wait`` seconds, at the start or after losing them all, stops
  the run too (``NoWorkersError``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from pipeline.errors import NoWorkersError, WorkersKeepDying

log = logging.getLogger("dippipe")


def overdue(
    now: float,
    started: float,
    moved: float,
    job_timeout: float | None,
    stall_seconds: float | None,
) -> str | None:
    """'timeout' or 'stall' when a job sent at ``started`` that last moved at ``moved``
    has run too long or stalled; None while it is fine."""
    if job_timeout is not None and now - started > job_timeout:
        return "timeout"
    if stall_seconds is not None and now - moved > stall_seconds:
        return "stall"
    return None


def overdue_on_actor(
    now: float,
    lanes: Sequence[tuple[float, float]],
    job_timeout: float | None,
    stall_seconds: float | None,
) -> list[str | None]:
    """:func:`overdue` for each busy lane of one actor, given as (sent at, last moved at):
    a timeout is each job's own, a stall the actor's: no lane is stalled while any of them
    moved within ``stall_seconds``."""
    moved = max((last for _, last in lanes), default=now)
    return [overdue(now, started, moved, job_timeout, stall_seconds) for started, _ in lanes]


@dataclass
class PoolHealth:
    workers: int  # slots in the pool (worker-0 ... worker-N-1)
    max_attempts: int
    oks: int = 0  # jobs ended ok so far
    losses_in_a_row: int = 0  # workers lost since the last ok job (charged ones aside)
    lost_slots: set[str] = field(default_factory=set)  # slots among them
    # Slots placed since the last ok job: those placed at it, and those placed after it
    # (pool.py adds each actor placed); before the first ok, every slot ever placed.
    placed_slots: set[str] = field(default_factory=set)
    last_loss: str = ""
    _job_loss: str | None = field(default=None, init=False)  # next loss charged to its job

    @property
    def limit(self) -> int:
        return 2 * self.workers + self.max_attempts + 1

    def ok(self, placed: Iterable[str]) -> None:
        """A job ended ok; ``placed``: the slots whose actor is placed now."""
        self.oks += 1
        self.losses_in_a_row = 0
        self.lost_slots.clear()
        self.placed_slots.clear()
        self.placed_slots.update(placed)

    def charged_to_job(self, slot: str) -> None:
        """The coming loss of this slot's worker is charged to the job that ran alone on it
        (it died, or ran past the timeout or stalled): not counted (the job's attempts)."""
        self._job_loss = slot

    def lost(self, slot: str, reason: str) -> None:
        """Count a lost worker; raise WorkersKeepDying when every slot keeps losing them."""
        self.last_loss = f"{slot}: {reason}"
        if self._job_loss == slot:
            self._job_loss = None
            return
        self.losses_in_a_row += 1
        self.lost_slots.add(slot)
        if self.losses_in_a_row >= self.limit and self.lost_slots >= self.placed_slots:
            raise WorkersKeepDying(
                f"workers keep failing without finishing a job: {self.losses_in_a_row} worker "
                f"processes lost in a row, on every worker; the last: {self.last_loss}"
            )


@dataclass
class WorkerWait:
    """How long the run has had no placed worker; raises once that passes ``limit``."""

    limit: float | None
    since: float | None = None  # when the run was last left without a placed worker

    def update(self, placed: bool, now: float, asked: str) -> None:
        if placed:
            self.since = None
            return
        if self.since is None:
            self.since = now
        if self.limit is not None and now - self.since > self.limit:
            raise NoWorkersError(
                f"no worker was placed for {self.limit:g} s (--worker-wait); asked for {asked}: "
                "check that the cluster has (or its autoscaler can add) the GPUs and CPUs"
            )
