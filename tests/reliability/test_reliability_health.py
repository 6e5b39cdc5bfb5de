"""The rules alone, no Ray: who is charged (recovery.py), when a job is overdue and when the
run stops (health.py)."""

from __future__ import annotations

import pytest

from pipeline.errors import NoWorkersError, WorkersKeepDying
from pipeline.health import PoolHealth, WorkerWait, overdue, overdue_on_actor
from pipeline.manifest import Job
from pipeline.outputs import KIND_DIED, KIND_INFRA, KIND_TIMEOUT, JobOutcome
from pipeline.pool import Worker
from pipeline.recovery import Fail, Recovery
from pipeline.scheduler import Lane, PoolSpec, Scheduler
from pipeline.storage import Storage
from pipeline.worker import WorkerConfig


def test_a_culprit_is_charged_only_when_it_ran_alone():
    recovery = Recovery(max_attempts=2)
    assert recovery.lost("a", 1, culprit=True, alone=False, reason="died", kind=KIND_DIED) == 1
    assert "a" in recovery.suspects  # runs alone next
    assert recovery.lost("b", 1, culprit=False, alone=False, reason="x", kind=KIND_DIED) == 1
    assert "b" not in recovery.suspects  # a bystander of a timeout: as it was
    assert recovery.lost("a", 1, culprit=True, alone=True, reason="died", kind=KIND_DIED) == 2
    fail = recovery.lost("a", 2, culprit=True, alone=True, reason="died", kind=KIND_DIED)
    assert isinstance(fail, Fail) and fail.kind == KIND_DIED and fail.attempts == 2
    assert "died 2 times while running this job alone (the last: died)" in fail.message
    recovery.done("a")
    assert not recovery.suspects


def test_an_infrastructure_failure_needs_max_attempts_workers_and_an_ok_job_since():
    recovery = Recovery(max_attempts=2)
    assert recovery.infrastructure_error("j", 0, "worker-0", "CUDA error", oks=5) is None
    # A second worker, but nothing ended ok since: the pool may be failing, not the job.
    assert recovery.infrastructure_error("j", 1, "worker-1", "CUDA error", oks=5) is None
    fail = recovery.infrastructure_error("j", 2, "worker-0", "CUDA error", oks=6)
    assert isinstance(fail, Fail) and fail.kind == KIND_INFRA and fail.attempts == 3
    assert "on worker-0: CUDA error" in fail.message


def test_a_job_waits_for_a_slot_that_has_not_failed_it():
    recovery = Recovery(max_attempts=3)
    recovery.infrastructure_error("j", 7, "worker-1", "denied", oks=0)
    slots = {"worker-0", "worker-1"}
    assert not recovery.may_run("j", "worker-1", idle=True, slots=slots)
    assert recovery.may_run("j", "worker-0", idle=True, slots=slots)
    assert recovery.may_run("j", "worker-1", idle=True, slots={"worker-1"})  # all failed it
    recovery.lost("s", 1, culprit=True, alone=False, reason="died", kind=KIND_DIED)
    assert not recovery.may_run("s", "worker-0", idle=False, slots=slots)  # a suspect
    assert recovery.may_run("s", "worker-0", idle=True, slots=slots)


def test_one_failing_slot_never_stops_the_run_but_every_placed_one_does():
    health = PoolHealth(workers=2, max_attempts=3)  # limit 2 x 2 + 3 + 1 = 8
    health.placed_slots |= {"worker-0", "worker-1"}
    for _ in range(50):
        health.lost("worker-1", "CUDA error")  # worker-0 fits on, no ok needed
    health.ok(placed={"worker-0", "worker-1"})
    for loss in range(7):
        health.lost("worker-0" if loss % 2 else "worker-1", "CUDA error")
    with pytest.raises(WorkersKeepDying, match=r"8 worker processes lost in a row.*CUDA error"):
        health.lost("worker-0", "CUDA error")


def test_a_slot_never_placed_does_not_keep_a_failing_run_alive():
    health = PoolHealth(workers=2, max_attempts=1)  # limit 6
    health.placed_slots.add("worker-0")  # worker-1 is never placed
    for _ in range(5):
        health.lost("worker-0", "denied")
    with pytest.raises(WorkersKeepDying):
        health.lost("worker-0", "denied")


def test_a_slot_whose_node_went_before_the_last_ok_does_not_keep_a_failing_run_alive():
    """worker-1's node goes (its replacement is never placed), worker-0 then ends a job ok,
    then fails every job (its credentials expired): the run stops instead of replacing
    worker-0 forever."""
    health = PoolHealth(workers=2, max_attempts=3)  # limit 8
    health.placed_slots |= {"worker-0", "worker-1"}
    health.lost("worker-1", "the process died (node lost)")
    health.ok(placed={"worker-0"})  # worker-1 is being replaced, never placed again
    for _ in range(7):
        health.lost("worker-0", "NoCredentialsError")
    with pytest.raises(WorkersKeepDying, match="8 worker processes lost in a row"):
        health.lost("worker-0", "NoCredentialsError")


def test_a_slot_placed_again_after_the_last_ok_must_fail_too():
    health = PoolHealth(workers=2, max_attempts=3)  # limit 8
    health.placed_slots |= {"worker-0", "worker-1"}
    health.lost("worker-1", "died")
    health.ok(placed={"worker-0"})
    health.placed_slots.add("worker-1")  # its replacement is placed (pool.py), and works
    for _ in range(30):
        health.lost("worker-0", "NoCredentialsError")


def test_losses_charged_to_a_job_that_ran_alone_do_not_stop_the_run():
    """One GPU, jobs that each run past the job timeout max_attempts times alone: their
    attempts fail them; the pool is not failing."""
    health = PoolHealth(workers=1, max_attempts=3)  # limit 2 + 3 + 1 = 6
    health.placed_slots.add("worker-0")
    for _ in range(2 * 3):  # two jobs, three kills each, nothing ends ok
        health.charged_to_job("worker-0")
        health.lost("worker-0", "ran longer than the job timeout (60 s)")
    assert health.losses_in_a_row == 0 and not health.lost_slots
    assert "job timeout" in health.last_loss
    for _ in range(5):  # uncharged losses (a worker retired for infrastructure errors)
        health.lost("worker-0", "3 infrastructure errors in a row")
    health.charged_to_job("worker-0")
    health.lost("worker-0", "died")  # neither counts nor resets the streak
    with pytest.raises(WorkersKeepDying, match="6 worker processes lost in a row"):
        health.lost("worker-0", "3 infrastructure errors in a row")


def test_the_scheduler_does_not_count_the_losses_it_charges_to_a_job(tmp_path):
    """The scheduler's side of the rule above, without Ray (retire only counts the loss):
    on one GPU, two jobs killed three times each for the job timeout, running alone, end
    failed; the run goes on. A worker retired for infrastructure errors still counts."""
    committed: list[JobOutcome] = []
    scheduler = Scheduler(PoolSpec(1, 0, 1.0), WorkerConfig(out=str(tmp_path / "out")),
                          Storage(), committed.append, lambda running, steps: None,
                          max_attempts=3, job_timeout=60.0)  # fmt: skip
    health = scheduler._health  # limit 2 + 3 + 1 = 6
    health.placed_slots.add("worker-0")
    pool = scheduler._actors
    pool.retire = lambda worker, reason: health.lost(worker.slot, reason)  # type: ignore[method-assign]

    def kill(job: Job | None, attempt: int = 1, culprits: set[str] | None = None) -> None:
        actor = object()
        pool.workers["worker-0"] = Worker("worker-0", actor, 0, None)
        scheduler.lanes = [Lane("worker-0", actor, job=job, attempt=attempt)]
        scheduler._lose(actor, "ran longer than the job timeout (60 s)", culprits)

    for name in ("a", "b"):
        job = Job(name, "denoise", 0, 0, {"image": "in.png"})
        for attempt in (1, 2, 3):
            kill(job, attempt, culprits={"worker-0"})
    assert [(o.row["id"], o.row["error_kind"], o.row["attempts"]) for o in committed] == [
        ("a", KIND_TIMEOUT, 3), ("b", KIND_TIMEOUT, 3)]  # fmt: skip
    assert health.losses_in_a_row == 0
    kill(Job("c", "denoise", 0, 0, {"image": "in.png"}), culprits=None)  # died alone: charged
    assert health.losses_in_a_row == 0
    for _ in range(5):
        kill(None, culprits=set())  # retired after infrastructure errors, running nothing
    with pytest.raises(WorkersKeepDying):
        kill(None, culprits=set())


def test_an_ok_job_leaves_the_slots_placed_then_for_the_scheduler(tmp_path):
    scheduler = Scheduler(PoolSpec(2, 0, 1.0), WorkerConfig(out=str(tmp_path / "out")),
                          Storage(), lambda outcome: None, lambda running, steps: None)  # fmt: skip
    scheduler._health.placed_slots |= {"worker-0", "worker-1"}  # worker-1's node went
    scheduler.lanes = [Lane("worker-0/0", object()), Lane("worker-0/1", object(), 1)]
    scheduler._commit(JobOutcome({"id": "a", "status": "ok"}))
    assert scheduler._health.placed_slots == {"worker-0"}


def test_a_stall_is_the_actors_a_lane_waiting_behind_a_moving_pack_is_not_stalled():
    """Lanes of one actor as (sent at, last moved at), stall limit 10 s at t = 100."""
    waiting, packed = (50.0, 50.0), (60.0, 95.0)  # queued fits; a long pack that steps
    assert overdue_on_actor(100.0, [waiting, packed], None, 10.0) == [None, None]
    assert overdue_on_actor(100.0, [waiting], None, 10.0) == ["stall"]  # alone: stalled
    hung = [(50.0, 70.0), (60.0, 85.0)]  # a hung CUDA call: no lane moved for 15 s
    assert overdue_on_actor(100.0, hung, None, 10.0) == ["stall", "stall"]
    # A timeout stays each job's own.
    assert overdue_on_actor(100.0, [waiting, packed], 45.0, 10.0) == ["timeout", None]
    assert overdue_on_actor(100.0, [], 45.0, 10.0) == []


def test_overdue_says_timeout_or_stall():
    assert overdue(100.0, 0.0, 99.0, job_timeout=50.0, stall_seconds=10.0) == "timeout"
    assert overdue(100.0, 60.0, 80.0, job_timeout=50.0, stall_seconds=10.0) == "stall"
    assert overdue(100.0, 60.0, 95.0, job_timeout=50.0, stall_seconds=10.0) is None
    assert overdue(1e9, 0.0, 0.0, job_timeout=None, stall_seconds=None) is None


def test_worker_wait_counts_from_when_the_last_worker_went():
    wait = WorkerWait(limit=10.0)
    wait.update(False, 0.0, "1 worker")
    wait.update(True, 5.0, "1 worker")  # placed: the clock stops
    wait.update(False, 100.0, "1 worker")  # all lost again: counts from here
    wait.update(False, 109.0, "1 worker")
    with pytest.raises(NoWorkersError, match="no worker was placed for 10 s"):
        wait.update(False, 111.0, "1 worker")
