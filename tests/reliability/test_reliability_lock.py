"""Two runs on one OUT: the second is refused with a clear message while the first runs; the
lock is created atomically (racing processes, local disk and S3), kept alive by a heartbeat,
and taken over only when stale (dead process, old heartbeat by the storage's clock), by a retry
of the same owner ($DIPPIPE_OWNER_ID, e.g. a RayJob's next attempt) once the holder's heartbeat
is OWNER_TAKEOVER_SECONDS old, or with --force-unlock."""

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

from pipeline import lock as lock_module
from pipeline.cli import app
from pipeline.lock import (
    HEARTBEAT_MAX_SECONDS,
    OWNER_ENV,
    OWNER_TAKEOVER_SECONDS,
    LockInfo,
    OutLock,
    OutLockedError,
)
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
    assert second.returncode == 3, message  # OUT locked: exit_codes.py
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
    """A lock as another run would have left it, in a local OUT (written atomically, as every
    writer of the lock does: a heartbeat reading a half-written file would rightly see "an
    unreadable lock", not the planted run)."""
    out.mkdir(parents=True, exist_ok=True)
    return _plant_anywhere(Storage(), str(out), **changes)


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
        if reason == "no heartbeat for":  # old by the storage's clock too (its mtime)
            old = time.time() - 3600
            os.utime(out / ".lock", (old, old))
        lock = OutLock(storage, str(out), owner="", **options)
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
    assert lock.lost and not lock.still_held()  # what the runner checks before a last flush
    lock.release()
    assert LockInfo.parse((out / ".lock").read_bytes()).run_id == "the-thief"  # left alone

    # still_held() reads the lock now, without waiting for the next heartbeat.
    (out / ".lock").unlink()
    lock = OutLock(storage, str(out), heartbeat_seconds=30, on_lost=lost.append)
    with lock:
        assert lock.still_held() and not lock.lost
        _plant(out, run_id="the-thief")
        assert not lock.still_held() and lock.lost
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
    assert refused.exit_code == 3 and "run stopped:" in text and "elsewhere.example" in text
    forced = runner.invoke(
        app, ["run", manifest, "--out", str(out), "--no-progress", "--force-unlock"]
    )
    text = " ".join(forced.output.split())
    assert forced.exit_code == 0, text
    assert "taking over the lock" in text and "nothing to do" in text
    assert not (out / ".lock").exists()
    record = json.loads((out / "run.json").read_text())
    assert record["config"]["force_unlock"] is True


def _plant_anywhere(storage: Storage, out: str, **changes) -> LockInfo:
    """A lock as another run would have left it, on any storage (one whole write)."""
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
    storage.write_bytes(join(out, ".lock"), info.encode())
    return info


def _holder(storage: Storage, out: str) -> LockInfo:
    info = LockInfo.parse(storage.read_bytes(join(out, ".lock")))
    assert info is not None
    return info


def test_staleness_is_read_off_the_storage_clock_not_the_writers(tmp_path, caplog):
    """A writer whose clock runs an hour late must not make its live lock look stale, and
    one whose clock runs an hour early must not keep a dead lock alive."""
    storage, out = Storage(), str(tmp_path / "out")
    _plant_anywhere(storage, out, heartbeat_unix=time.time() - 3600)  # written just now
    assert (age := OutLock(storage, out).storage_age()) is not None and age < 30
    with pytest.raises(OutLockedError, match="in use by another dippipe run"):
        OutLock(storage, out, stale_seconds=60, owner="").acquire()

    _plant_anywhere(storage, out, heartbeat_unix=time.time() + 3600)  # claims to be fresh
    old = time.time() - 7200
    os.utime(tmp_path / "out" / ".lock", (old, old))  # ... but was written 2 h ago
    with OutLock(storage, out, stale_seconds=60, owner="") as lock:
        assert lock.took_over is not None and lock.took_over.run_id == "other-run"
    assert "by the storage's clock" in caplog.text
    assert not any(p.name.startswith(".lock-clock") for p in (tmp_path / "out").iterdir())


def _age(tmp_path: Path, seconds: float) -> None:
    """Make OUT's lock `seconds` old by the storage's clock (its mtime), not by sleeping."""
    then = time.time() - seconds
    os.utime(tmp_path / "out" / ".lock", (then, then))


def test_a_retry_of_the_same_owner_takes_over_a_quiet_lock_only(tmp_path, monkeypatch):
    """A RayJob's next attempt runs on a new head (new host name, old process invisible), maybe
    while the old head's driver still flushes (pod in its grace period). The same
    $DIPPIPE_OWNER_ID takes the lock over once its heartbeat is OWNER_TAKEOVER_SECONDS old by
    the storage's clock (at once then, not after --stale-lock-seconds); a fresh one is refused
    (after waiting, here none); nobody else takes either."""
    storage, out, owner = Storage(), str(tmp_path / "out"), "rayjob/batch/dippipe-run"
    assert (
        60 <= OWNER_TAKEOVER_SECONDS <= 75 and OWNER_TAKEOVER_SECONDS >= 2 * HEARTBEAT_MAX_SECONDS
    )
    _plant_anywhere(storage, out, owner=owner)  # fresh heartbeat, another host
    for other in ("", "rayjob/batch/another-run"):
        with pytest.raises(OutLockedError, match="in use by another dippipe run"):
            OutLock(storage, out, owner=other).acquire()
    with pytest.raises(OutLockedError, match="same owner") as refused:  # the holder may live
        OutLock(storage, out, owner=owner, owner_wait_seconds=0).acquire()
    assert f"{OWNER_TAKEOVER_SECONDS:.0f} s without a heartbeat" in str(refused.value)
    _age(tmp_path, OWNER_TAKEOVER_SECONDS - 15)  # one heartbeat late: still not taken
    with pytest.raises(OutLockedError, match="same owner"):
        OutLock(storage, out, owner=owner, owner_wait_seconds=0).acquire()
    assert _holder(storage, out).run_id == "other-run"

    _age(tmp_path, OWNER_TAKEOVER_SECONDS + 5)  # quiet for longer than the bound
    for other in ("", "rayjob/batch/another-run"):  # ... but far from --stale-lock-seconds
        with pytest.raises(OutLockedError, match="in use by another dippipe run"):
            OutLock(storage, out, owner=other).acquire()
    monkeypatch.setenv(OWNER_ENV, owner)  # as deploy/entrypoint.sh sets it
    with OutLock(storage, out, owner_wait_seconds=0) as lock:  # at once: no wait allowed
        assert lock.took_over is not None and lock.took_over.owner == owner
        assert _holder(storage, out).owner == owner  # the next retry can do the same
        assert _holder(storage, out).run_id == lock.run_id

    # A blank owner on both sides is no identity: never a match.
    _plant_anywhere(storage, out, owner="  ")
    _age(tmp_path, OWNER_TAKEOVER_SECONDS + 5)
    monkeypatch.setenv(OWNER_ENV, "  ")
    with pytest.raises(OutLockedError):
        OutLock(storage, out).acquire()


def test_a_same_owner_retry_waits_for_the_old_attempt_to_stop(tmp_path, monkeypatch):
    """Refused at once, the retry would exit 2, which the entrypoint turns into a RayJob
    SUCCEEDED and never retried: so it waits for the old attempt to release the lock or to go
    quiet, and only a holder still heartbeating after owner_wait_seconds refuses it."""
    monkeypatch.setattr(lock_module, "OWNER_POLL_SECONDS", 0.05)
    storage, out, owner = Storage(), str(tmp_path / "out"), "rayjob/batch/dippipe-run"
    for ending in ("released", "went quiet"):
        _plant_anywhere(storage, out, owner=owner)
        timer = threading.Timer(
            0.3,
            lambda e=ending: (
                (tmp_path / "out" / ".lock").unlink()
                if e == "released"
                else _age(tmp_path, OWNER_TAKEOVER_SECONDS + 5)
            ),
        )
        timer.start()
        try:
            with OutLock(storage, out, owner=owner, owner_wait_seconds=30) as lock:
                assert (lock.took_over is None) == (ending == "released"), ending
                assert _holder(storage, out).run_id == lock.run_id
        finally:
            timer.cancel()
    _plant_anywhere(storage, out, owner=owner)  # keeps a fresh heartbeat throughout
    began = time.monotonic()
    with pytest.raises(OutLockedError, match="kept its heartbeat for the 1 s waited"):
        OutLock(storage, out, owner=owner, owner_wait_seconds=1).acquire()
    assert 1 <= time.monotonic() - began < 10
    assert _holder(storage, out).run_id == "other-run"


def test_without_a_storage_clock_the_owner_bound_uses_the_writers(tmp_path, monkeypatch):
    """A storage without modification times: the heartbeat's own timestamp, as for staleness."""
    monkeypatch.setattr(OutLock, "storage_age", lambda self: None)
    storage, out, owner = Storage(), str(tmp_path / "out"), "rayjob/batch/dippipe-run"
    _plant_anywhere(storage, out, owner=owner, heartbeat_unix=time.time() - 30)
    with pytest.raises(OutLockedError, match="same owner"):
        OutLock(storage, out, owner=owner, owner_wait_seconds=0).acquire()
    _plant_anywhere(storage, out, owner=owner, heartbeat_unix=time.time() - 100)
    with OutLock(storage, out, owner=owner, owner_wait_seconds=0) as lock:
        assert lock.took_over is not None


def test_the_heartbeat_never_outlasts_the_owner_bound(tmp_path):
    """A holder's heartbeats come at most HEARTBEAT_MAX_SECONDS apart, whatever its options,
    so OWNER_TAKEOVER_SECONDS without one means it is gone (or stalled)."""
    storage, out = Storage(), str(tmp_path / "out")
    assert OutLock(storage, out, stale_seconds=86400).heartbeat_seconds == HEARTBEAT_MAX_SECONDS
    assert OutLock(storage, out, heartbeat_seconds=600).heartbeat_seconds == HEARTBEAT_MAX_SECONDS
    assert OutLock(storage, out, stale_seconds=60).heartbeat_seconds == 6


def test_the_same_owner_never_takes_a_lock_from_a_live_process_here(tmp_path):
    """Two live drivers with one owner on one host (e.g. a RayJob submitted twice by hand to
    one cluster) are a real conflict: the second is refused."""
    storage, out, owner = Storage(), str(tmp_path / "out"), "rayjob/batch/dippipe-run"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _plant_anywhere(storage, out, host=socket.gethostname(), pid=sleeper.pid, owner=owner)
        _age(tmp_path, OWNER_TAKEOVER_SECONDS + 5)  # quiet long enough, yet its process lives
        with pytest.raises(OutLockedError, match=f"owner {owner}"):
            OutLock(storage, out, owner=owner).acquire()
    finally:
        sleeper.kill()
        sleeper.wait()
    with OutLock(storage, out, owner=owner) as lock:  # its process is gone now
        assert lock.took_over is not None


@pytest.mark.s3
def test_owner_takeover_and_storage_clock_on_s3(s3_bucket):
    storage = Storage(StorageOptions.from_env())
    out, owner = join(s3_bucket, "out"), "rayjob/batch/dippipe-run"
    _plant_anywhere(storage, out, heartbeat_unix=time.time() - 3600)  # late writer clock
    with pytest.raises(OutLockedError):
        OutLock(storage, out, stale_seconds=60, owner=owner).acquire()
    _plant_anywhere(storage, out, owner=owner)  # fresh: the same owner is refused too
    with pytest.raises(OutLockedError, match="same owner"):
        OutLock(storage, out, owner=owner, owner_wait_seconds=0).acquire()
    time.sleep(2.5)  # S3's LastModified has whole seconds: a 1 s bound, 2.5 s after the write
    with OutLock(storage, out, owner=owner, owner_takeover_seconds=1) as lock:
        assert lock.took_over is not None and lock.took_over.owner == owner
    assert not storage.exists(join(out, ".lock"))

    # S3's LastModified has whole seconds: a 1 s threshold, 2.5 s after the write.
    _plant_anywhere(storage, out, heartbeat_unix=time.time() + 3600)  # early writer clock
    time.sleep(2.5)
    with OutLock(storage, out, stale_seconds=1, owner="") as lock:
        assert lock.took_over is not None
        assert lock.storage_age() is not None and lock.storage_age() < 30  # its own, fresh
    fs, path = storage.resolve(out)
    fs.invalidate_cache(path)
    assert not fs.exists(path) or not fs.ls(path, detail=False)  # no probe object left
