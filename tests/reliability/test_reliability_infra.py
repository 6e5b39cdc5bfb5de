"""Systemic faults and timeouts on a real local Ray (CPU workers, fake fits): infrastructure
errors are retried elsewhere and never committed on first sight, a failing worker is replaced,
a pool that only fails stops the run, overdue jobs get their worker killed, bystanders of a
death are not charged, and a run without workers stops.

Faults are injected in the workers by tests/support/worker_faults.py (selected by worker name
or job id, with marker files for "the first time"), so nothing depends on timing except the
stall and timeout limits themselves: 10 s or more, which every healthy job (a fake fit of
0.05 s, also the first one of a freshly placed worker) stays far from on a loaded machine."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from pipeline.errors import NoWorkersError, WorkersKeepDying
from pipeline.outputs import KIND_DIED, KIND_TIMEOUT, read_results
from pipeline.runner import RunConfig, run
from pipeline.scheduler import PoolSpec, Scheduler
from pipeline.storage import Storage
from pipeline.worker import WorkerConfig
from tests.support import worker_faults as faults
from tests.support.builders import TINY_PARAMS, tiny_image, write_manifest, write_png

pytestmark = [pytest.mark.ray]


def _run(tmp_path: Path, ids: list[str], workers: int = 1, lanes: int = 1, **options: Any):
    """Run fake fits of `ids` on CPU workers; returns (summary, {id: row})."""
    image = write_png(tmp_path / "in.png", tiny_image(1, 16))
    rows = [{"id": i, "task": "denoise", "image": image, "iterations": 5,
             "params": TINY_PARAMS} for i in ids]  # fmt: skip
    manifest = write_manifest(tmp_path / "m.parquet", rows)
    worker = WorkerConfig(out=str(tmp_path / "out"), device="cpu", fake_fit_seconds=0.05,
                          fits_per_gpu=lanes, threads=1)  # fmt: skip
    config = RunConfig(manifest, worker, gpus=0, workers=workers, show_progress=False,
                       flush_rows=1, lookahead=0, **options)  # fmt: skip
    summary = run(config, Console(stderr=True, quiet=True))
    return summary, _rows(tmp_path)


def _rows(tmp_path: Path) -> dict[str, dict]:
    out = tmp_path / "out"
    if not (out / "results").exists():
        return {}
    rows = read_results(Storage(), str(out)).to_pylist()
    assert len(rows) == len({row["id"] for row in rows}), "a job recorded twice"
    return {row["id"]: row for row in rows}


@pytest.mark.parametrize(
    "variable", [faults.FAULT_CUDA_WORKERS, faults.FAULT_NO_CREDENTIALS_WORKERS]
)
def test_a_worker_failing_every_job_is_replaced_and_the_jobs_end_ok_on_the_other(
    tmp_path, ray_local, monkeypatch, variable
):
    """worker-1 (and each replacement, which keeps its name: a bad node) fails every job
    with a CUDA error, or cannot read inputs without credentials. worker-0's jobs hold until
    worker-1 has failed 3 times (retired after 2, its replacement fails one more). Each actor
    of worker-1 fails 2 jobs and is retired, except the last (0 or 1 failure, the run ended)."""
    monkeypatch.setenv(variable, "worker-1")
    (failures := tmp_path / "failures").mkdir()
    monkeypatch.setenv(faults.FAULT_RECORD_DIR, str(failures))
    monkeypatch.setenv(faults.FAULT_HOLD_FOR, "3")
    ids = [f"j{i}" for i in range(8)]
    summary, rows = _run(tmp_path, ids, workers=2, worker_infra_errors=2, max_attempts=3)
    assert sorted(rows) == ids
    assert all(row["status"] == "ok" and row["worker"] == "worker-0" for row in rows.values())
    assert all(row["attempts"] == 1 for row in rows.values())  # not charged to the jobs
    failed = len(list(failures.iterdir()))
    assert failed >= 3 and summary.infrastructure_retries == failed
    assert summary.worker_deaths == failed // 2  # worker-1 retired after each second one


def test_every_worker_failing_stops_the_run_and_commits_no_failure(
    tmp_path, ray_local, monkeypatch
):
    monkeypatch.setenv(faults.FAULT_CUDA_WORKERS, "*")
    with pytest.raises(WorkersKeepDying, match="CUDA error: an illegal memory access"):
        _run(tmp_path, [f"j{i}" for i in range(4)], workers=2, worker_infra_errors=1,
             max_attempts=2)  # fmt: skip
    assert _rows(tmp_path) == {}  # nothing committed: a rerun runs them all


def test_a_stalled_job_gets_its_worker_replaced_and_runs_again(tmp_path, ray_local, monkeypatch):
    monkeypatch.setenv(faults.FAULT_STALL_JOB, "j1")
    monkeypatch.setenv(faults.FAULT_STALL_MARKER, str(tmp_path / "stalled"))
    summary, rows = _run(tmp_path, ["j0", "j1", "j2"], stall_seconds=12.0, max_attempts=2)
    assert (tmp_path / "stalled").exists()
    assert all(row["status"] == "ok" for row in rows.values()) and len(rows) == 3
    assert rows["j1"]["attempts"] == 2  # it ran alone: charged
    assert rows["j0"]["attempts"] == rows["j2"]["attempts"] == 1
    assert summary.worker_deaths == 1


def test_a_job_past_the_timeout_fails_as_timeout_after_max_attempts(
    tmp_path, ray_local, monkeypatch
):
    """Two workers: the second try of slow goes to the other, idle one, without waiting for
    the replacement of the first (the test takes 2 x the timeout, not 2 x (it + a start))."""
    monkeypatch.setenv(faults.FAULT_SLOW_JOB, "slow")
    summary, rows = _run(tmp_path, ["a", "slow", "b"], workers=2, job_timeout=10.0,
                         max_attempts=2)  # fmt: skip
    assert rows["a"]["status"] == rows["b"]["status"] == "ok"
    assert rows["a"]["attempts"] == rows["b"]["attempts"] == 1
    slow = rows["slow"]
    assert slow["status"] == "failed" and slow["error_kind"] == KIND_TIMEOUT
    assert slow["attempts"] == 2 and "job timeout (10 s)" in slow["error"]
    assert summary.worker_deaths == summary.timeouts == 2


def test_jobs_in_flight_beside_a_job_that_kills_its_worker_are_not_charged(
    tmp_path, ray_local, monkeypatch
):
    """One worker, 4 lanes: k kills the process while the 3 others run on it. They are
    requeued uncharged and each runs alone; k, alone, kills it again: charged each time."""
    monkeypatch.setenv(faults.FAULT_CRASH_JOB, "k")
    monkeypatch.setenv(faults.FAULT_CRASH_MARKER, str(tmp_path / "crashed"))
    monkeypatch.setenv(faults.FAULT_CRASH_CROWD, "3")
    summary, rows = _run(tmp_path, ["a", "k", "b", "c"], lanes=4, max_attempts=2)
    assert (tmp_path / "crashed").exists()
    assert {i: rows[i]["attempts"] for i in "abc"} == {"a": 1, "b": 1, "c": 1}
    assert all(rows[i]["status"] == "ok" for i in "abc")
    killer = rows["k"]
    assert killer["status"] == "failed" and killer["error_kind"] == KIND_DIED
    assert killer["attempts"] == 2 and "worker process died 2 times" in killer["error"]
    assert summary.worker_deaths == 3  # once with the others, twice alone


def test_no_worker_placed_within_worker_wait_stops_the_run(tmp_path, ray_local):
    """ray_local has 2 logical GPUs: a worker asking for 3 is never placed."""
    scheduler = Scheduler(PoolSpec(1, 3, 1.0), WorkerConfig(out=str(tmp_path / "out")),
                          Storage(), lambda outcome: None, lambda running, steps: None,
                          worker_wait=1.5)  # fmt: skip
    started = time.monotonic()
    try:
        with pytest.raises(NoWorkersError, match=r"no worker was placed for 1.5 s"):
            scheduler.start()
    finally:
        scheduler.stop()
    assert time.monotonic() - started < 30


def test_what_on_placed_raises_stops_the_run(tmp_path, ray_local):
    placed: list[dict] = []

    def refuse(info: dict) -> None:
        placed.append(info)
        raise RuntimeError(f"refused {info['worker']}")

    config = WorkerConfig(out=str(tmp_path / "out"), device="cpu")
    scheduler = Scheduler(PoolSpec(1, 0, 1.0), config, Storage(), lambda outcome: None,
                          lambda running, steps: None, on_placed=refuse)  # fmt: skip
    try:
        with pytest.raises(RuntimeError, match="refused worker-0"):
            scheduler.start()
    finally:
        scheduler.stop()
    assert placed[0]["lanes"] == 1 and placed[0]["worker"] == "worker-0"
