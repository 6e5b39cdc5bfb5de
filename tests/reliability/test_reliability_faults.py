"""Processes killed for real: a fitting worker (SIGKILL mid-fit) and the driver itself
(SIGKILL of `dippipe run`, then the same command again). Each ends with every job exactly
once in results/, complete traces, and no partial or temporary file."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.outputs import read_traces
from pipeline.storage import Storage
from tests.support.builders import TINY_PARAMS, tiny_image, write_manifest, write_png
from tests.support.processes import fit_actor_pids, kill_session, start_dippipe
from tests.support.results import assert_exactly_once, assert_no_partial_files, results

STEPS = 150


def _manifest(tmp_path: Path, ids: list[str], iterations: int = STEPS) -> str:
    image = write_png(tmp_path / "in.png", tiny_image(5))
    rows = [
        {
            "id": i,
            "task": "denoise",
            "image": image,
            "iterations": iterations,
            "params": TINY_PARAMS,
        }
        for i in ids
    ]
    return write_manifest(tmp_path / "m.parquet", rows)


def _kill_one_fitting_worker(out: Path, killed: list[int], stop: threading.Event) -> None:
    """Once the first job is recorded (workers warm, the next fits under way), SIGKILL one
    of this test process's FitActor workers."""
    while not stop.is_set() and not results(str(out)):
        time.sleep(0.05)
    time.sleep(0.2)  # well inside the next fits (each takes about a second)
    while not stop.is_set():
        pids = fit_actor_pids(os.getpid(), running_only=False)
        if pids:
            os.kill(pids[0], signal.SIGKILL)
            killed.append(pids[0])
            return
        time.sleep(0.05)


@pytest.mark.ray
@pytest.mark.slow
def test_a_worker_sigkilled_mid_fit_is_replaced_and_its_job_done_once(tmp_path, ray_local):
    ids = [f"w{i}" for i in range(4)]
    manifest, out = _manifest(tmp_path, ids), tmp_path / "out"
    killed: list[int] = []
    stop = threading.Event()
    killer = threading.Thread(target=_kill_one_fitting_worker, args=(out, killed, stop))
    killer.start()
    try:
        args = ["run", manifest, "--out", str(out), "--gpus", "2", "--flush-rows", "1"]
        result = CliRunner().invoke(app, [*args, "--no-progress", "--sync-every", "20"])
    finally:
        stop.set()
        killer.join()
    output = " ".join(result.output.translate(str.maketrans("│┃", "  ")).split())
    assert len(killed) == 1, output
    assert result.exit_code == 0, output
    assert "worker processes replaced 1" in output
    rows = assert_exactly_once(str(out), ids)
    assert all(row["status"] == "ok" for row in rows.values())
    assert sorted(row["attempts"] for row in rows.values()) == [1, 1, 1, 2]
    traces = read_traces(Storage(), str(out)).to_pylist()
    for job_id in ids:  # the killed attempt left no trace rows: exactly one full trace
        assert [t["step"] for t in traces if t["id"] == job_id] == list(range(STEPS))
    assert_no_partial_files(out)


@pytest.mark.ray
@pytest.mark.slow
def test_the_driver_sigkilled_mid_run_then_the_same_command_finishes_every_job_once(
    tmp_path, ray_local
):
    ids = [f"d{i}" for i in range(8)]
    manifest, out = _manifest(tmp_path, ids, iterations=5), tmp_path / "out"
    args = ["run", manifest, "--out", str(out), "--gpus", "0", "--workers", "2"]
    args += ["--flush-rows", "1", "--no-progress", "--fake-fit-seconds", "1.0"]
    driver = start_dippipe(*args)
    try:
        deadline = time.monotonic() + 120
        while len(results(str(out))) < 2 and driver.poll() is None:
            assert time.monotonic() < deadline, "the first run made no progress"
            time.sleep(0.1)
        os.kill(driver.pid, signal.SIGKILL)  # the driver only: no chance to flush or unlock
        driver.wait(timeout=30)
    finally:
        kill_session(driver.pid)  # its embedded Ray, which fate-shares with it anyway
    assert driver.returncode == -signal.SIGKILL
    done_before = {row["id"] for row in results(str(out))}
    assert 2 <= len(done_before) < len(ids)
    assert (out / ".lock").exists()  # left by the killed driver, with its (dead) pid

    # The same command again (in this process, joining the test's Ray: saves a Ray start).
    rerun = CliRunner().invoke(app, args)
    output = " ".join(rerun.output.split())
    assert rerun.exit_code == 0, output
    assert "taking over the lock" in output and "its process is gone" in output
    rows = assert_exactly_once(str(out), ids)
    assert all(row["status"] == "ok" for row in rows.values())
    traces = read_traces(Storage(), str(out)).to_pylist()
    assert sorted(t["id"] for t in traces) == sorted(ids)  # no orphan trace shard survived
    assert_no_partial_files(out)
