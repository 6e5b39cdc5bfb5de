"""Two runs on one OUT: the second is refused with a clear message while the first runs; the
lock is created atomically (racing processes, local disk and S3), kept alive by a heartbeat,
and taken over only when stale (dead process, old heartbeat) or with --force-unlock."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.lock import LockInfo, OutLock, OutLockedError
from pipeline.outputs import JobOutcome, ShardWriter
from pipeline.runner import RunConfig, run
from pipeline.storage import Storage, StorageOptions, join
from pipeline.worker import WorkerConfig
from tests.support.builders import tiny_image, write_manifest, write_png
from tests.support.processes import DIPPIPE
from tests.support.results import assert_exactly_once, assert_no_partial_files


def _manifest(tmp_path: Path, ids: list[str]) -> str:
    image = write_png(tmp_path / "in.png", tiny_image(2))
    rows = [{"id": i, "task": "denoise", "image": image, "iterations": 3} for i in ids]
    return write_manifest(tmp_path / "m.parquet", rows)


@pytest.mark.ray
@pytest.mark.slow
def test_a_second_run_on_the_same_out_is_refused_while_the_first_runs(tmp_path, ray_local):
    ids = [f"c{i}" for i in range(5)]
    manifest, out = _manifest(tmp_path, ids), tmp_path / "out"
    worker = WorkerConfig(str(out), fake_fit_seconds=1.0)
    config = RunConfig(manifest, worker, gpus=1, show_progress=False, flush_rows=1)
    first: dict = {}
    thread = threading.Thread(target=lambda: first.setdefault("summary", run(config)))
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not (out / ".lock").exists():
            assert time.monotonic() < deadline and thread.is_alive()
            time.sleep(0.05)
        holder = LockInfo.parse((out / ".lock").read_bytes())
        second = subprocess.run(
            [*DIPPIPE, "run", manifest, "--out", str(out), "--gpus", "0", "--no-progress"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert thread.is_alive(), "the first run ended too soon to prove anything"
    finally:
        thread.join()
    message = " ".join(second.stdout.split() + second.stderr.split())
    assert second.returncode == 2, message
    assert "is in use by another dippipe run" in message and holder.run_id in message
    assert f"pid {os.getpid()}" in message and "--force-unlock" in message
    assert "Traceback" not in message
    assert first["summary"].ok == len(ids)
    assert_exactly_once(str(out), ids)
    assert_no_partial_files(out)  # the first run's lock is gone too


RACE = """
import sys
from pipeline.lock import OutLock, OutLockedError
from pipeline.storage import Storage, StorageOptions
lock = OutLock(Storage(StorageOptions.from_env()), sys.argv[1], on_lost=print)
print("ready", flush=True)
sys.stdin.readline()  # "go": all at once
try:
    lock.acquire()
except OutLockedError:
    print("locked", flush=True)
else:
    print("won", flush=True)
    sys.stdin.readline()  # held until every process has answered
    lock.release()
"""


@pytest.mark.s3
@pytest.mark.slow
def test_lock_creation_is_atomic_between_racing_processes(tmp_path, s3_bucket):
    outs = [str(tmp_path / "out"), join(s3_bucket, "out")]
    racers = [
        subprocess.Popen(
            [sys.executable, "-c", RACE, out],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for out in outs
        for _ in range(5)
    ]
    try:
        assert all(racer.stdout.readline().strip() == "ready" for racer in racers)
        for racer in racers:
            racer.stdin.write("go\n")
        for racer in racers:
            racer.stdin.flush()
        answers = [racer.stdout.readline().strip() for racer in racers]
        for racer in racers:
            racer.communicate("release\n", timeout=60)
    finally:
        for racer in racers:
            racer.kill()
    for answers_of_one_out in (answers[:5], answers[5:]):
        assert sorted(answers_of_one_out) == ["locked"] * 4 + ["won"], answers
    storage = Storage(StorageOptions.from_env())
    assert not any(storage.exists(join(out, ".lock")) for out in outs)


def _plant(out: Path, **changes) -> LockInfo:
    """A lock as another run would have left it."""
    values = {
        "run_id": "other-run",
        "host": "elsewhere.example",
        "pid": 4242,
        "process_start": None,
        "started_at": "2026-01-01T00:00:00+00:00",
        "heartbeat_at": "now",
        "heartbeat_unix": time.time(),
    }
    info = LockInfo(**{**values, **changes})
    out.mkdir(parents=True, exist_ok=True)
    # Atomically, as every writer of the lock does (storage.py): a heartbeat reading a
    # half-written file would rightly see "an unreadable lock", not the planted run.
    staged = out / ".lock.planting"
    staged.write_bytes(info.encode())
    os.replace(staged, out / ".lock")
    return info


def test_stale_locks_are_taken_over_and_live_ones_refused(tmp_path):
    storage, out = Storage(), tmp_path / "out"
    _plant(out)  # fresh, on another host
    with pytest.raises(OutLockedError, match="in use by another dippipe run") as refused:
        OutLock(storage, str(out)).acquire()
    assert "elsewhere.example" in str(refused.value) and "pid 4242" in str(refused.value)

    cases = {
        "--force-unlock": ({}, {"force": True}),
        "no heartbeat for": ({"heartbeat_unix": time.time() - 3600}, {"stale_seconds": 60}),
        "its process is gone": ({"host": socket.gethostname(), "pid": _dead_pid()}, {}),
        "unreadable": (None, {}),
    }
    for reason, (planted, options) in cases.items():
        if planted is None:
            (out / ".lock").write_bytes(b"\x00 not json")
        else:
            _plant(out, **planted)
        lock = OutLock(storage, str(out), **options)
        with lock:
            assert LockInfo.parse((out / ".lock").read_bytes()).run_id == lock.run_id, reason
            assert lock.took_over is not None
        assert not (out / ".lock").exists()

    holding = OutLock(storage, str(out))  # a live run in this very process
    with holding, pytest.raises(OutLockedError, match=holding.run_id):
        OutLock(storage, str(out), stale_seconds=3600).acquire()
    # ... whereas a lock naming this process but no run of it is a leftover: taken over
    _plant(out, host=socket.gethostname(), pid=os.getpid())
    with OutLock(storage, str(out)) as lock:
        assert lock.took_over is not None


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_the_heartbeat_refreshes_the_lock_and_notices_losing_it(tmp_path):
    storage, out = Storage(), tmp_path / "out"
    lost: list[str] = []
    lock = OutLock(storage, str(out), heartbeat_seconds=0.1, on_lost=lost.append)
    lock.acquire()
    first = LockInfo.parse((out / ".lock").read_bytes())
    time.sleep(0.5)
    assert LockInfo.parse((out / ".lock").read_bytes()).heartbeat_unix > first.heartbeat_unix
    _plant(out, run_id="the-thief")  # e.g. taken over after a long stall of this run
    deadline = time.monotonic() + 5
    while not lost and time.monotonic() < deadline:
        time.sleep(0.05)
    assert lost and "lost the lock" in lost[0] and "the-thief" in lost[0]
    lock.release()
    assert LockInfo.parse((out / ".lock").read_bytes()).run_id == "the-thief"  # left alone


def test_the_cli_names_the_holder_and_force_unlock_proceeds(tmp_path):
    """A finished OUT ('nothing to do') still takes the lock: no Ray is needed here."""
    manifest, out = _manifest(tmp_path, ["f0", "f1"]), tmp_path / "out"
    writer = ShardWriter(Storage(), str(out))
    for job_id in ("f0", "f1"):
        writer.add(JobOutcome({"id": job_id, "task": "denoise", "status": "ok"}))
    writer.flush()
    _plant(out)
    runner = CliRunner()
    refused = runner.invoke(app, ["run", manifest, "--out", str(out), "--no-progress"])
    text = " ".join(refused.output.split())
    assert refused.exit_code == 2 and "run stopped:" in text and "elsewhere.example" in text
    forced = runner.invoke(
        app, ["run", manifest, "--out", str(out), "--no-progress", "--force-unlock"]
    )
    text = " ".join(forced.output.split())
    assert forced.exit_code == 0, text
    assert "taking over the lock" in text and "nothing to do" in text
    assert not (out / ".lock").exists()
    record = json.loads((out / "run.json").read_text())
    assert record["config"]["force_unlock"] is True
