"""Size-aware feeding (lookahead.py): the picking rule, keys from image headers, and the
scheduler's use of them with stand-in actors (no Ray started)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from pipeline.lookahead import PENDING, UNKNOWN, Lookahead, job_key, read_key
from pipeline.manifest import Job
from pipeline.packing import summarize
from pipeline.storage import Storage
from tests.support.builders import tiny_image, write_png
from tests.support.filesystems import count_ranged_reads

A, B, C = ("denoise", None, None, 16, 16), ("denoise", None, None, 24, 24), ("x",)


def _job(name: str, image: str = "") -> Job:
    return Job(name, "denoise", 0, 0, {"image": image} if image else {})


def _buffer(keys: list[Any], capacity: int = 8, max_passes: int | None = None) -> Lookahead:
    buffer = Lookahead(capacity, max_passes)
    for i, key in enumerate(keys):
        buffer.add(_job(f"j{i}"), key)
    return buffer


def _ids(buffer: Lookahead) -> list[str]:
    return [entry.job.id for entry in buffer.entries]


def test_a_busy_worker_gets_the_oldest_job_of_its_key():
    buffer = _buffer([A, B, A, B, A])
    picked = buffer.pick(B)
    assert picked is not None and picked.job.id == "j1"
    picked = buffer.pick(A)
    assert picked is not None and picked.job.id == "j0"
    picked = buffer.pick(A)
    assert picked is not None and picked.job.id == "j2"
    assert _ids(buffer) == ["j3", "j4"] and buffer.picks == 3 and buffer.matched == 3


def test_passes_count_only_younger_jobs_picked_first():
    buffer = _buffer([A, B, B, A])
    assert buffer.pick(A).job.id == "j0"
    assert [e.passes for e in buffer.entries] == [0, 0, 0]
    assert buffer.pick(A).job.id == "j3"
    assert [e.passes for e in buffer.entries] == [1, 1]


def test_an_idle_worker_takes_the_oldest_even_before_its_header_is_read():
    buffer = _buffer([PENDING, A, B])
    picked = buffer.pick(None)
    assert picked is not None and picked.job.id == "j0" and picked.key is PENDING


def test_no_match_leaves_the_lane_free():
    buffer = _buffer([B, B, C])
    assert buffer.pick(A) is None and len(buffer) == 3
    assert all(entry.passes == 0 for entry in buffer.entries)


def test_unknown_and_pending_keys_match_nothing():
    buffer = _buffer([UNKNOWN, PENDING, A, B])
    assert buffer.pick(PENDING) is None  # the header of the worker's job is being read
    picked = buffer.pick(B)
    assert picked is not None and picked.job.id == "j3"
    picked = buffer.pick(A)
    assert picked is not None and picked.job.id == "j2"
    buffer.entries[1].key = A  # the header arrives
    picked = buffer.pick(A)
    assert picked is not None and picked.job.id == "j1"
    picked = buffer.pick(None)  # an unknown job still runs: an idle worker takes it
    assert picked is not None and picked.key is UNKNOWN and not buffer


def test_a_worker_running_an_unknown_job_takes_jobs_in_manifest_order():
    buffer = _buffer([B, UNKNOWN, A])
    picked = buffer.pick(UNKNOWN)
    assert picked is not None and picked.job.id == "j0"


def test_fairness_bound_takes_the_oldest_after_max_passes():
    buffer = Lookahead(capacity=4, max_passes=3)
    buffer.add(_job("b"), B)
    for i in range(3):
        buffer.add(_job(f"a{i}"), A)
    taken = [buffer.pick(A).job.id for _ in range(3)]
    assert taken == ["a0", "a1", "a2"] and buffer.entries[0].passes == 3
    buffer.add(_job("a3"), A)
    picked = buffer.pick(A)  # an A would fit, but b has waited long enough
    assert picked is not None and picked.job.id == "b" and buffer.forced == 1


def test_fairness_bound_defaults_to_the_buffer_size():
    buffer = Lookahead(capacity=5)
    assert buffer.max_passes == 5 and buffer.room == 5
    buffer.add(_job("x"), A)
    assert buffer.room == 4 and Lookahead(0).capacity == 1


def test_job_key_canonical_params_and_tiles(tmp_path: Path):
    from pipeline.worker import WorkerConfig

    one = Job("a", "denoise", 0, 0, params='{"depth": 2, "channels": 4}')
    two = Job("b", "denoise", 0, 0, params='{"channels":4,"depth":2}')
    config = WorkerConfig(out=str(tmp_path))
    assert job_key(one, (16, 24), config) == job_key(two, (16, 24), config)
    assert job_key(one, (16, 24), config) != job_key(two, (24, 16), config)
    broken = Job("c", "denoise", 0, 0, params="{not json")
    assert job_key(broken, (16, 16), config)[2] == "{not json"
    assert job_key(one, (3000, 2000), config)[-2:] == (3000, 2000)  # tile_above None: own size
    tiled = _Config(tile_size=64, tile_above=100 * 100)
    big, bigger = job_key(one, (300, 200), tiled), job_key(one, (900, 700), tiled)
    assert big == bigger and big[-2:] == ("tile", 64)
    assert job_key(one, (90, 90), tiled) == (*job_key(one, (90, 90), config)[:3], 90, 90)
    assert job_key(one, (300, 200), _Config(tile_size=0, tile_above=1))[-2:] == (300, 200)


def test_read_key_from_headers_and_unknown_when_unreadable(tmp_path: Path):
    from pipeline.worker import WorkerConfig

    config = WorkerConfig(out=str(tmp_path))
    storage = Storage()
    image = write_png(tmp_path / "a.png", tiny_image(0, 24))
    wide = write_png(tmp_path / "w.png", tiny_image(0, 16)[:, :8, :])
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x17" * 64)
    (tmp_path / "short.png").write_bytes(Path(image).read_bytes()[:12])
    assert read_key(storage, _job("a", image), config)[-2:] == (24, 24)
    assert read_key(storage, _job("w", wide), config)[-2:] == (16, 8)
    for name in ("corrupt.png", "short.png", "missing.png"):
        assert read_key(storage, _job(name, str(tmp_path / name)), config) is UNKNOWN
    assert read_key(storage, _job("none"), config) is UNKNOWN


def test_read_key_finds_a_tiff_directory_written_after_the_pixels(tmp_path: Path, monkeypatch):
    """libtiff (Pillow's compressed TIFFs) writes the IFD after the image data: beyond the
    first 64 KiB of a noisy 300 x 200 scan. The key is still read (a second, ranged read)."""
    import numpy as np
    from PIL import Image

    from pipeline.storage import HEADER_BYTES
    from pipeline.worker import WorkerConfig

    noise = np.random.default_rng(0).integers(0, 256, (200, 300, 3), dtype=np.uint8)
    path = tmp_path / "scan.tif"
    Image.fromarray(noise).save(path, compression="tiff_lzw")
    data = path.read_bytes()
    assert int.from_bytes(data[4:8], "little") > HEADER_BYTES  # the IFD lies past the head
    sizes = count_ranged_reads(monkeypatch)
    key = read_key(Storage(), _job("scan", str(path)), WorkerConfig(out=str(tmp_path)))
    assert key[-2:] == (300, 200)
    assert 0 < sum(sizes) < len(data) // 4  # the IFD, not the pixels
    (tmp_path / "big.png").write_bytes(b"\x89PNG" + bytes(4 * HEADER_BYTES))  # not a TIFF
    assert read_key(Storage(), _job("big", str(tmp_path / "big.png")), WorkerConfig(
        out=str(tmp_path))) is UNKNOWN  # fmt: skip
    assert sum(sizes) < len(data) // 4  # no second look at a file that is not a TIFF


def test_summarize_occupancy_over_workers():
    assert summarize([]) is None
    stats = [
        {"steps": 10, "fit_steps": 20, "slot_steps": 20, "lanes": 2},
        {"steps": 10, "fit_steps": 10, "slot_steps": 20, "lanes": 2},
    ]
    report = summarize(stats)
    assert report == {
        "mean_occupancy": 0.75,
        "mean_fits": 1.5,
        "steps": 20,
        "workers": 2,
        "lanes": 2,
    }
    idle = summarize([{"steps": 0, "fit_steps": 0, "slot_steps": 0, "lanes": 2}])
    assert idle is not None and idle["mean_occupancy"] is None and idle["steps"] == 0


# The scheduler's feeding, with stand-in actors: `run.remote` records what each lane got.


class _Method:
    def __init__(self, calls: list) -> None:
        self.calls = calls

    def remote(
        self, job: Job, attempt: int, payload: dict, lane: int, threads: int | None = None
    ) -> str:
        self.calls.append((job.id, attempt, lane))
        return f"ref-{job.id}-{attempt}"


class _Actor:
    def __init__(self) -> None:
        self.calls: list = []
        self.run = _Method(self.calls)


def _scheduler(tmp_path: Path, actors: int, lanes: int, depth: int, passes: int | None = None):
    from pipeline.lookahead import KeyReader
    from pipeline.scheduler import Lane, PoolSpec, Scheduler
    from pipeline.worker import WorkerConfig

    config = WorkerConfig(out=str(tmp_path / "out"), fits_per_gpu=lanes)
    scheduler = Scheduler(
        PoolSpec(actors, 0, 1.0),
        config,
        Storage(),
        lambda outcome: None,
        lambda running, steps: None,
        lookahead=depth,
        lookahead_passes=passes,
    )
    stand_ins = [_Actor() for _ in range(actors)]
    for i, actor in enumerate(stand_ins):
        scheduler.lanes += [Lane(f"worker-{i}/{k}", actor, k) for k in range(lanes)]
    scheduler.buffer = Lookahead(depth * actors * lanes, passes)
    scheduler._reader = KeyReader(scheduler.storage, config, 2)
    return scheduler, stand_ins


def _jobs(tmp_path: Path, sizes: list[int]) -> list[Job]:
    paths = {size: write_png(tmp_path / f"{size}.png", tiny_image(0, size)) for size in sizes}
    return [_job(f"j{i}-{size}", paths[size]) for i, size in enumerate(sizes)]


def _counting(jobs: list[Job], pulled: list[str]) -> Iterator[Job]:
    for job in jobs:
        pulled.append(job.id)
        yield job


def _settle(scheduler) -> None:
    deadline = time.monotonic() + 10
    while scheduler.buffer.pending() and time.monotonic() < deadline:
        time.sleep(0.005)
    assert not scheduler.buffer.pending(), "header reads did not finish"


def _finish(scheduler, lane_name: str) -> None:
    """The job of that lane ends (as _collect would see it, without the outcome)."""
    (lane,) = [lane for lane in scheduler.lanes if lane.name == lane_name]
    lane.job, lane.ref, lane.entry = None, None, None


def test_scheduler_fills_an_actors_lanes_with_one_size(tmp_path: Path):
    scheduler, (actor,) = _scheduler(tmp_path, actors=1, lanes=2, depth=3)
    jobs = _jobs(tmp_path, [16, 24, 16, 24, 16, 24, 16, 24, 16, 24])
    pulled: list[str] = []
    stream = _counting(jobs, pulled)
    exhausted = scheduler._fill(stream, False)
    # Buffer bounded: 3 x 2 lanes, +1 pulled for each job a lane took.
    assert actor.calls[0] == ("j0-16", 1, 0)  # an idle actor: the oldest, header or not
    assert len(pulled) == 6 + len(actor.calls) and not exhausted and len(scheduler.buffer) == 6
    _settle(scheduler)  # the second lane waits for j0's header if it was not read yet
    scheduler._fill(stream, exhausted)
    assert actor.calls[1] == ("j2-16", 1, 1) and len(pulled) == 8
    _finish(scheduler, "worker-0/0")
    _settle(scheduler)
    scheduler._fill(stream, exhausted)
    assert actor.calls[2] == ("j4-16", 1, 0)  # still the 16 px pack
    _finish(scheduler, "worker-0/0")
    _finish(scheduler, "worker-0/1")
    _settle(scheduler)
    scheduler._fill(stream, exhausted)  # drained: the oldest (24 px) and one to match it
    assert [c[0] for c in actor.calls[3:]] == ["j1-24", "j3-24"]
    assert len(pulled) == 10 and len(scheduler.buffer) == 5
    scheduler._reader.close()


def test_scheduler_retries_first_and_keeps_their_key(tmp_path: Path):
    scheduler, (actor,) = _scheduler(tmp_path, actors=1, lanes=2, depth=2)
    jobs = _jobs(tmp_path, [16, 24, 24, 24])
    stream = iter(jobs[1:])
    retried = scheduler.buffer.add(jobs[0], A)  # an entry with a known key, as if read
    scheduler.buffer.entries.remove(retried)
    scheduler.retry.append((jobs[0], 2))
    scheduler._retry_entries[jobs[0].id] = retried
    scheduler._fill(stream, False)
    assert actor.calls[0] == ("j0-16", 2, 0)
    assert scheduler.lanes[0].entry is retried and not scheduler._retry_entries
    _settle(scheduler)
    scheduler._fill(stream, False)  # the actor runs A (16 px): no 24 px job for it
    assert len(actor.calls) == 1
    scheduler._reader.close()


def test_one_lane_actors_take_jobs_in_manifest_order(tmp_path: Path):
    scheduler, actors = _scheduler(tmp_path, actors=2, lanes=1, depth=2, passes=2)
    # One lane per actor: every actor is idle when its lane is free: manifest order.
    jobs = _jobs(tmp_path, [16, 24, 16, 24])
    stream = iter(jobs)
    scheduler._fill(stream, False)
    assert [a.calls[0][0] for a in actors] == ["j0-16", "j1-24"]
    scheduler._reader.close()


def test_without_lookahead_no_header_is_read(tmp_path: Path, monkeypatch):
    from pipeline import lookahead

    monkeypatch.setattr(lookahead, "read_key", _no_reads)
    scheduler, (actor,) = _scheduler(tmp_path, actors=1, lanes=2, depth=0)
    scheduler.buffer, scheduler._reader = None, None  # what start() leaves with lookahead=0
    jobs = _jobs(tmp_path, [16, 24, 16])
    scheduler._fill(iter(jobs), False)
    assert [c[0] for c in actor.calls] == ["j0-16", "j1-24"]  # manifest order


def _no_reads(*args: Any) -> None:
    raise AssertionError("a header was read")


def test_params_key_ignores_whitespace_and_order():
    first = Job("a", "denoise", 0, 0, params=json.dumps({"a": 1, "b": 2}))
    second = Job("b", "denoise", 0, 0, params='{"b":2, "a":1}')
    assert job_key(first, (8, 8), _Config()) == job_key(second, (8, 8), _Config())


@dataclass
class _Config:
    """What job_key reads of a WorkerConfig."""

    tile_size: int = 0
    tile_above: int | None = None


# End to end on a local Ray: one CPU worker with two lanes (fits packed on the CPU).

MIXED_PARAMS = {"channels": 4, "depth": 2, "input_depth": 2, "stop": "fixed", "ensemble": 1}


def _mixed_run(tmp_path: Path, lookahead: int, jobs: int = 8, name: str = "") -> dict:
    from rich.console import Console

    from pipeline.runner import RunConfig, run
    from pipeline.worker import WorkerConfig
    from tests.support.builders import write_manifest

    paths = {s: write_png(tmp_path / f"in-{s}.png", tiny_image(s, s)) for s in (16, 24)}
    rows = [
        {"id": f"j{i}", "task": "denoise", "image": paths[16 if i % 2 else 24],
         "iterations": 40, "params": json.dumps(MIXED_PARAMS)}
        for i in range(jobs)
    ]  # fmt: skip
    manifest = write_manifest(tmp_path / "m.parquet", rows)
    out = tmp_path / (name or f"out-{lookahead}")
    worker = WorkerConfig(out=str(out), device="cpu", fits_per_gpu=2, sync_every=5, threads=1)
    config = RunConfig(
        manifest, worker, gpus=0, workers=1, show_progress=False, lookahead=lookahead
    )
    summary = run(config, Console(stderr=True, quiet=True))
    assert summary.exit_code() == 0 and summary.ok + summary.skipped_ok == jobs
    record = json.loads((out / "run.json").read_text())
    record["out"], record["ran"], record["deaths"] = out, summary.ok, summary.worker_deaths
    return record


@pytest.mark.ray
@pytest.mark.slow
def test_lookahead_keeps_packs_fuller_on_a_mixed_manifest(tmp_path: Path, ray_local):
    without = _mixed_run(tmp_path, lookahead=0)["packing"]
    record = _mixed_run(tmp_path, lookahead=4)
    with_ = record["packing"]
    assert record["config"]["lookahead"] == 4
    assert without["lookahead"] is None and with_["lookahead"]["header_reads"] == 8
    assert with_["lanes"] == 2 and with_["steps"] > 0 and without["steps"] > 0
    print(f"occupancy without look-ahead {without}, with {with_}")
    assert with_["mean_occupancy"] > without["mean_occupancy"] + 0.15


@pytest.mark.ray
@pytest.mark.slow
def test_lookahead_with_a_worker_killed_mid_pack_runs_every_job_once(
    tmp_path: Path, ray_local, monkeypatch
):
    from pipeline.outputs import read_results

    monkeypatch.setenv("DIPPIPE_FAULT_KILL_JOB", "j1")
    monkeypatch.setenv("DIPPIPE_FAULT_MARKER", str(tmp_path / "killed-once"))
    record = _mixed_run(tmp_path, lookahead=2, jobs=6, name="out")
    assert (tmp_path / "killed-once").exists() and record["deaths"] == 1
    rows = read_results(Storage(), str(record["out"])).to_pylist()
    assert sorted(row["id"] for row in rows) == [f"j{i}" for i in range(6)]
    assert all(row["status"] == "ok" for row in rows)
    attempts = {row["id"]: row["attempts"] for row in rows}
    # Killed alone it is charged; killed in a pack no one is (recovery.py: suspects rerun
    # alone), and its pack mates never are.
    assert attempts["j1"] in (1, 2) and sum(attempts.values()) == 5 + attempts["j1"]
    assert record["packing"]["lookahead"]["picks"] == 6  # retries do not go through it
    again = _mixed_run(tmp_path, lookahead=2, jobs=6, name="out")  # resume: nothing left
    assert again["ran"] == 0 and again["packing"] is None
