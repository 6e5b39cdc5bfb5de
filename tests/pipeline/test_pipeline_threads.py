"""CPU users get the machine: CPU workers sized by no flag share the CPUs among the pending
jobs (runner.plan_pool), and at the tail of a run the busy workers borrow the idle ones'
CPUs (Scheduler._threads_for); ``--threads N`` stays N.

The runs observe the torch threads inside the workers with a worker hook (worker.py):
``record_threads`` writes, at each progress report, the count the fitting thread uses.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import ray
import torch
from typer.testing import CliRunner

from pipeline.actor import AUTO_CUDA_LANES, lanes_for
from pipeline.cli import app
from pipeline.manifest import Job
from pipeline.outputs import read_results
from pipeline.runner import RunConfig, plan_pool, spread_cpus
from pipeline.scheduler import Lane, PoolSpec, Scheduler
from pipeline.storage import Storage
from pipeline.worker import WORKER_HOOK, WorkerConfig
from tests.support.builders import TINY_PARAMS, tiny_image, write_manifest, write_png

if TYPE_CHECKING:
    from pipeline.worker import Fitter

RECORD_DIR = "DIPPIPE_TEST_THREADS_DIR"  # where record_threads writes (one file per process)
# This job waits at its first report until the driver raises its worker's threads (applied
# at its next report); every other job waits at its first report until this one has reported.
# So the order of a tail is fixed however fast the fits and workers are: both jobs start
# while the other runs, then the held one is alone.
HOLD_JOB = "DIPPIPE_TEST_THREADS_HOLD"
HOLD_SECONDS = 60.0  # how long at most (then the test fails on what was recorded)


def record_threads(fitter: Fitter) -> None:
    """Worker hook: record (job, step, torch threads) at each progress report, and hold
    as HOLD_JOB says."""
    folder = Path(os.environ[RECORD_DIR])
    held: set[str] = set()

    def on_step(job_id: str, step: int) -> None:
        threads = torch.get_num_threads()  # this (fitting) thread's count
        with open(folder / f"{os.getpid()}.txt", "a") as record:
            record.write(f"{job_id} {step} {threads}\n")
        hold = os.environ.get(HOLD_JOB)
        if not hold or job_id in held:
            return
        held.add(job_id)
        deadline = time.monotonic() + HOLD_SECONDS
        while time.monotonic() < deadline:
            if fitter.threads.count > threads if job_id == hold else hold in _recorded(folder):
                return
            time.sleep(0.02)

    fitter.step_listeners.append(on_step)


def _recorded(folder: Path) -> dict[str, list[int]]:
    """Job id -> the thread counts its reports saw, in order."""
    seen: dict[str, list[tuple[int, int]]] = {}
    for path in folder.iterdir():
        for line in path.read_text().splitlines():
            job, step, threads = line.split()
            seen.setdefault(job, []).append((int(step), int(threads)))
    return {job: [threads for _, threads in sorted(reports)] for job, reports in seen.items()}


def _run(tmp_path: Path, monkeypatch, rows: list[dict], *flags: str) -> dict[str, list[int]]:
    """`dippipe run` on CPU workers of the session's Ray (2 logical CPUs); returns what
    record_threads saw per job, after checking that every job ended ok."""
    folder = tmp_path / "threads"
    folder.mkdir(parents=True)
    monkeypatch.setenv(WORKER_HOOK, "tests.pipeline.test_pipeline_threads:record_threads")
    monkeypatch.setenv(RECORD_DIR, str(folder))
    manifest = write_manifest(tmp_path / "m.parquet", rows)
    out = tmp_path / "out"
    args = ["run", manifest, "--out", str(out), "--gpus", "0", "--no-progress", *flags]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    ended = read_results(Storage(), str(out)).to_pylist()
    assert sorted(row["id"] for row in ended) == sorted(row["id"] for row in rows)
    assert all(row["status"] == "ok" for row in ended), ended
    return _recorded(folder)


def _jobs(tmp_path: Path, iterations: dict[str, int]) -> list[dict]:
    image = write_png(tmp_path / "in.png", tiny_image(1, 16))
    return [{"id": name, "task": "denoise", "image": image, "iterations": steps,
             "params": TINY_PARAMS} for name, steps in iterations.items()]  # fmt: skip


@pytest.mark.ray
def test_one_job_gets_every_cpu_unless_threads_says_otherwise(tmp_path, ray_local, monkeypatch):
    rows = _jobs(tmp_path, {"alone": 5})
    fake = ("--fake-fit-seconds", "0.01")  # the count a job starts with: no fit needed
    assert _run(tmp_path / "auto", monkeypatch, rows, *fake) == {"alone": [2]}
    fixed = _run(tmp_path / "fixed", monkeypatch, rows, *fake, "--threads", "1")
    assert fixed == {"alone": [1]}


@pytest.mark.ray
def test_as_many_jobs_as_cpus_start_on_one_thread_and_the_last_borrows_the_idle_cpu(
    tmp_path, ray_local, monkeypatch
):
    """Two jobs on 2 CPUs: two workers of one CPU each. When the short job is done and no
    job is left to start, the long one's worker gets the idle worker's CPU."""
    monkeypatch.setenv(HOLD_JOB, "long")
    rows = _jobs(tmp_path, {"long": 40, "short": 4})
    seen = _run(tmp_path, monkeypatch, rows, "--sync-every", "2")
    assert seen["short"][0] == 1 and seen["long"][0] == 1
    assert seen["long"][-1] == 2, seen


@pytest.mark.parametrize(
    ("nodes", "pending", "expected"),
    [
        ([4], 1, (1, 4)),
        ([4], 2, (2, 2)),
        ([4], 3, (3, 1)),  # whole CPUs: the fourth is lent at the tail
        ([4], 4, (4, 1)),
        ([4], 50, (4, 1)),
        ([2], 1, (1, 2)),
        ([4, 4], 3, (3, 2)),  # 2 + 1 workers of 2 CPUs: each can be placed
        ([2, 8], 1, (1, 8)),  # never more than a node has
        ([3, 3], 3, (3, 1)),  # 2 CPUs each would leave the third worker unplaceable
    ],
)
def test_spread_cpus(nodes, pending, expected):
    assert spread_cpus(nodes, pending) == expected


def _cluster(monkeypatch, nodes: list[int]) -> None:
    """plan_pool's view of a Ray cluster of CPU nodes, without starting one."""
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": float(sum(nodes))})
    monkeypatch.setattr(
        ray, "nodes", lambda: [{"Alive": True, "Resources": {"CPU": float(n)}} for n in nodes]
    )


@pytest.mark.parametrize(
    ("options", "threads", "pending", "expected"),
    [
        ({}, None, 1, PoolSpec(1, 0, 4)),  # one job: a worker of 4 CPUs (so 4 threads)
        ({}, None, 4, PoolSpec(4, 0, 1)),
        ({}, 1, 1, PoolSpec(1, 0, 1.0)),  # --threads: workers of 1 CPU, as the flags say
        ({"workers": 2}, None, 1, PoolSpec(1, 0, 1.0)),
        ({"cpus_per_worker": 2.0}, None, 4, PoolSpec(2, 0, 2.0)),
        ({"workers": 3}, None, 8, PoolSpec(3, 0, 1.0)),
    ],
)
def test_cpu_workers_sized_by_no_flag_share_the_cpus(
    monkeypatch, options, threads, pending, expected
):
    _cluster(monkeypatch, [4])
    config = RunConfig("m.parquet", WorkerConfig("out", threads=threads), gpus=0, **options)
    assert plan_pool(config, pending) == expected


class _Actor:
    """An actor's set_threads as the scheduler calls it, recorded."""

    def __init__(self) -> None:
        self.given: list[int] = []
        self.set_threads = self

    def remote(self, threads: int) -> None:
        self.given.append(threads)


def _scheduler(tmp_path, nodes: dict[str, int], share: bool = True) -> Scheduler:
    """Workers of 1 CPU (own count 1): ``nodes`` gives how many on each node."""
    count = sum(nodes.values())
    scheduler = Scheduler(PoolSpec(count, 0, 1.0), WorkerConfig(str(tmp_path), threads=1),
                          Storage(), lambda outcome: None, lambda running, steps: None,
                          share_idle_cpus=share)  # fmt: skip
    scheduler.lanes = [
        Lane(f"{node}-{k}", _Actor(), node=node) for node, n in nodes.items() for k in range(n)
    ]
    return scheduler


def _busy(scheduler: Scheduler, *names: str) -> dict[str, Any]:
    actors = {}
    for lane in scheduler.lanes:
        if lane.name in names:
            lane.job = Job(lane.name, "denoise", 0, 0, {"image": "in.png"})
            actors[lane.name] = lane.actor
    return actors


def test_the_tail_lends_idle_cpus_per_node_and_a_retry_takes_them_back(tmp_path):
    scheduler = _scheduler(tmp_path, {"a": 4, "b": 2})
    actors = _busy(scheduler, "a-0", "a-1", "a-2", "b-0")
    scheduler._share_cpus(tail=False)  # jobs left to start: each keeps its own CPU
    assert all(actor.given == [1] for actor in actors.values())
    scheduler._share_cpus(tail=True)
    assert [actors[name].given[-1] for name in ("a-0", "a-1", "a-2", "b-0")] == [1, 1, 1, 2]
    scheduler.lanes[0].job = scheduler.lanes[1].job = None  # a-0 and a-1 done
    scheduler._share_cpus(tail=True)
    assert actors["a-2"].given[-1] == 4 and actors["b-0"].given == [1, 2]  # b: unchanged
    scheduler._share_cpus(tail=False)  # a job came back to the queue: lending ends
    assert actors["a-2"].given[-1] == 1 and actors["b-0"].given[-1] == 1
    assert all(t <= 4 for actor in actors.values() for t in actor.given)  # a has 4 CPUs


def test_fixed_threads_are_never_changed(tmp_path):
    scheduler = _scheduler(tmp_path, {"a": 4}, share=False)  # --threads, or GPU workers
    actors = _busy(scheduler, "a-0")
    scheduler._share_cpus(tail=True)
    assert actors["a-0"].given == [] and scheduler._threads_for(scheduler.lanes[0]) is None


def test_cuda_workers_pack_only_on_request(monkeypatch):
    """No auto-packing until a GPU measures that it pays (issue 17): auto is one lane on
    CUDA as on a CPU; --fits-per-gpu K still packs K."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert lanes_for(WorkerConfig("out", device="cuda")) == 1
    assert lanes_for(WorkerConfig("out"), AUTO_CUDA_LANES) == 1  # the driver's answer
    assert lanes_for(WorkerConfig("out", device="cuda", fits_per_gpu=3)) == 3
