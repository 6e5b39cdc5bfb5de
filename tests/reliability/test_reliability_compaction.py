"""Compaction killed at every point: between every pair of its storage writes and deletes.

The OUT holds small shards and, to start from a state only a crash leaves, the sources of an
earlier compaction that were never deleted. For each k, compaction is stopped right before its
k-th write or delete, by an injected crash (local disk and the loopback S3 server) and by a real
SIGKILL of a child process (local disk). Then a fresh reader must see every result row and every
trace row exactly once, and the next resume (what runner._prepare_out does) must delete every
leftover and leave one compacted shard holding everything.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from pipeline.compaction import compact
from pipeline.outputs import (
    JobOutcome,
    ShardWriter,
    read_prior,
    read_results,
    read_traces,
    remove_orphan_traces,
)
from pipeline.report.scan import iter_results
from pipeline.shards import live_shards
from pipeline.storage import Storage, StorageOptions, join

STEPS = 2
REPOSITORY = Path(__file__).resolve().parents[2]


class Crash(BaseException):
    """Not an Exception: nothing on the way up may catch it, as nothing catches a SIGKILL."""


class CrashingStorage(Storage):
    """Dies right before its `at`-th write or delete; once dead, every later one fails too
    (a thread of the pool must not finish an operation after the crash)."""

    def __init__(self, options: StorageOptions, at: int) -> None:
        super().__init__(options)
        self.at, self.done, self.dead = at, 0, False
        self.lock = threading.Lock()

    def _step(self) -> None:
        with self.lock:
            if self.dead or self.done == self.at:
                self.dead = True
                raise Crash
            self.done += 1

    def write_bytes(self, uri: str, data: bytes) -> None:
        self._step()
        super().write_bytes(uri, data)

    def remove(self, uri: str) -> None:
        self._step()
        super().remove(uri)


def _outcome(job_id: str) -> JobOutcome:
    row = {"id": job_id, "task": "denoise", "status": "ok"}
    steps = list(range(STEPS))
    return JobOutcome(row, {"step": steps, "energy": [1.0] * STEPS, "psnr": [None] * STEPS})


def build_out(storage: Storage, out: str) -> list[str]:
    """6 small shards, 3 of them already compacted by a run killed before it deleted them."""
    ids = []
    writer = ShardWriter(storage, out, flush_rows=2, compact_every=0)
    for i in range(6):
        ids.append(f"a{i}")
        writer.add(_outcome(ids[-1]))
    saved = {}
    for folder in ("results", "traces"):
        for uri in storage.list_files(join(out, folder)):
            saved[uri] = storage.read_bytes(uri)
    compact(storage, out, "earlier")
    for uri, data in saved.items():  # the earlier compaction's sources, left by its crash
        storage.write_bytes(uri, data)
    for i in range(6, 12):
        ids.append(f"b{i}")
        writer.add(_outcome(ids[-1]))
    return ids


def check_each_once(storage: Storage, out: str, ids: list[str]) -> None:
    assert sorted(read_results(storage, out).column("id").to_pylist()) == sorted(ids)
    assert sorted(read_prior(storage, out).ok.to_pylist()) == sorted(ids)
    scanned = [i for t in iter_results(storage, out) for i in t.column("id").to_pylist()]
    assert sorted(scanned) == sorted(ids)
    traces = read_traces(storage, out)
    pairs = sorted(zip(*traces.select(["id", "step"]).to_pydict().values(), strict=True))
    assert pairs == sorted((i, s) for i in ids for s in range(STEPS))


def resume_and_check(storage: Storage, out: str, ids: list[str]) -> None:
    """What _prepare_out does first, then: one shard each, nothing left over."""
    remove_orphan_traces(storage, out)
    compact(storage, out, "resume")
    check_each_once(storage, out, ids)
    results = storage.list_files(join(out, "results"))
    traces = storage.list_files(join(out, "traces"))
    assert len(results) == 1 and [u.rsplit("/", 1)[-1] for u in results] == [
        u.rsplit("/", 1)[-1] for u in traces
    ], (results, traces)
    assert live_shards(storage, out)[0] == results


def copy_out(template: Path, storage: Storage, out: str) -> None:
    for path in template.rglob("*.parquet"):
        storage.write_bytes(join(out, str(path.relative_to(template))), path.read_bytes())


def crash_at_every_point(tmp_path: Path, storage: Storage, base: str) -> int:
    """Runs the crash at every k until a compaction completes; returns the points tried."""
    template = tmp_path / "template"
    ids = build_out(Storage(), str(template))
    for at in range(100):
        out = join(base, f"out-{at}")
        copy_out(template, storage, out)
        crashing = CrashingStorage(storage.options, at)
        try:
            compact(crashing, out, "now")
        except Crash:
            check_each_once(storage, out, ids)
            resume_and_check(storage, out, ids)
            continue
        check_each_once(storage, out, ids)
        resume_and_check(storage, out, ids)
        return at
    raise AssertionError("compaction never completed")


def test_compaction_crashed_at_every_point_on_local_disk(tmp_path):
    points = crash_at_every_point(tmp_path, Storage(), str(tmp_path))
    # cleanup: 3 + 3 removes; one group of 4 shards: 2 writes and 4 + 4 removes
    assert points == 16


@pytest.mark.s3
def test_compaction_crashed_at_every_point_on_s3(tmp_path, s3_bucket):
    storage = Storage(StorageOptions.from_env(retries=0))
    assert crash_at_every_point(tmp_path, storage, s3_bucket) == 16


CHILD = """
import os, signal, sys
from pipeline.compaction import compact
from pipeline.storage import Storage

class KillingStorage(Storage):
    def __init__(self, at):
        super().__init__()
        self.at, self.done = at, 0
    def _step(self):
        if self.done == self.at:
            os.kill(os.getpid(), signal.SIGKILL)
        self.done += 1
    def write_bytes(self, uri, data):
        self._step()
        super().write_bytes(uri, data)
    def remove(self, uri):
        self._step()
        super().remove(uri)

storage = KillingStorage(int(sys.argv[2]))
# one thread: the kill lands exactly between two operations
import pipeline.shards as shards
shards.READ_WORKERS = shards.LOCAL_READ_WORKERS = 1
compact(storage, sys.argv[1], "now")
"""


@pytest.mark.slow
def test_compaction_killed_by_sigkill_at_every_point(tmp_path):
    storage = Storage()
    template = str(tmp_path / "template")
    ids = build_out(storage, template)
    env = {**os.environ, "PYTHONPATH": str(REPOSITORY), "OMP_NUM_THREADS": "1"}
    for at in range(17):
        out = str(tmp_path / f"out-{at}")
        shutil.copytree(template, out)
        child = subprocess.run(
            [sys.executable, "-c", CHILD, out, str(at)], env=env, capture_output=True, text=True
        )
        killed = child.returncode == -signal.SIGKILL
        assert killed or (at == 16 and child.returncode == 0), (at, child.stderr[-2000:])
        check_each_once(storage, out, ids)
        resume_and_check(storage, out, ids)
