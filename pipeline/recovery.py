"""Who is charged when a job's worker is lost or fails it, and where a retried job may run.

The scheduler (scheduler.py) asks; this module keeps the jobs' records and answers:

- A worker lost (its process died; or killed because a job ran past the job timeout or
  stalled): a *culprit* job, i.e. every job in flight on a death, the overdue one on a
  timeout or stall, is charged an attempt only if it ran *alone* on that worker; one that
  shared the worker becomes a *suspect*, requeued uncharged, and from then on runs alone so
  that the next loss names it. Past ``max_attempts`` charged tries it fails: "died" for a
  death, "timeout" for a timeout or stall. Jobs that were not culprits are requeued as they
  were.
- An infrastructure error (faults.py) is charged to the worker, not the job: the job is
  requeued, and waits for a worker slot that has not failed it (placed, or being placed for
  a few minutes at most: scheduler.py); only when every slot has failed it may any take it.
  It fails ("infrastructure") once it met such errors on ``max_attempts`` different workers
  *and* some job ended ok since its first one: while nothing ends ok the whole pool is
  failing, and the run stops instead (health.py), committing nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.outputs import KIND_DIED, KIND_INFRA


@dataclass(frozen=True)
class Fail:
    """The job's final failed row: its message, attempts and error_kind."""

    message: str
    attempts: int
    kind: str


@dataclass
class Trouble:
    """A job's infrastructure errors so far (never committed while it is retried)."""

    ok_mark: int  # jobs ended ok in the pool when it first met one
    workers: set[int] = field(default_factory=set)  # serials of the workers (actors)
    slots: set[str] = field(default_factory=set)  # their slots (worker-3)


@dataclass
class Recovery:
    max_attempts: int
    suspects: set[str] = field(default_factory=set)  # job ids that must run alone
    trouble: dict[str, Trouble] = field(default_factory=dict)  # job id -> its infra errors

    def lost(self, job_id: str, attempt: int, culprit: bool, alone: bool, reason: str,
             kind: str) -> int | Fail:  # fmt: skip
        """A job in flight on a lost worker: the attempt to requeue it with, or its Fail."""
        if not culprit:
            return attempt
        self.suspects.add(job_id)
        if not alone:
            return attempt
        if attempt < self.max_attempts:
            return attempt + 1
        if kind == KIND_DIED:
            message = (f"the worker process died {attempt} times while running this job "
                       f"alone (the last: {reason})")  # fmt: skip
        else:
            message = f"{reason}, {attempt} times, each time running alone (worker killed)"
        return Fail(message, attempt, kind)

    def infrastructure_error(self, job_id: str, worker: int, slot: str, error: str,
                             oks: int) -> Fail | None:  # fmt: skip
        """None: requeue the job (same attempt); else its Fail. ``oks``: the pool's ok jobs."""
        trouble = self.trouble.setdefault(job_id, Trouble(oks))
        trouble.workers.add(worker)
        trouble.slots.add(slot)
        tries = len(trouble.workers)
        if tries >= self.max_attempts and oks > trouble.ok_mark:
            message = (f"infrastructure errors on {tries} different workers (a plain rerun "
                       f"retries this job); the last, on {slot}: {error}")  # fmt: skip
            return Fail(message, tries, KIND_INFRA)
        return None

    def may_run(self, job_id: str, slot: str, idle: bool, slots: set[str]) -> bool:
        """Whether a lane of ``slot`` may take this retried job: a suspect only on an idle
        actor; a job failed there by the infrastructure only when every slot of ``slots``
        did."""
        if job_id in self.suspects and not idle:
            return False
        trouble = self.trouble.get(job_id)
        return trouble is None or slot not in trouble.slots or not (slots - trouble.slots)

    def done(self, job_id: str) -> None:
        """The job's outcome is committed: forget it."""
        self.suspects.discard(job_id)
        self.trouble.pop(job_id, None)
