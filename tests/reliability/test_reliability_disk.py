"""OUT on a full disk (a real, tiny tmpfs) and OUT without write permission.

A job whose PNG cannot be written fails with the real reason (ENOSPC, EACCES / EPERM) and
the others finish; when the results themselves cannot be written the run stops at once with a
clear message instead of running jobs it cannot record. Either way no partial file is left,
and once the disk or the permission is fixed, a rerun gives every job exactly one row.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from pipeline.outputs import shard_of
from tests.support.builders import tiny_image, write_manifest, write_png
from tests.support.filesystems import fill_disk, tmpfs, unwritable
from tests.support.results import assert_exactly_once, assert_no_partial_files, results

runner = CliRunner()


def _run(*args: str) -> tuple[int, str]:
    from pipeline.cli import app

    result = runner.invoke(app, ["run", *args, "--no-progress"])
    text = result.output.translate(str.maketrans("│┃", "  "))
    return result.exit_code, " ".join(text.split())


def _small_and_big(tmp_path: Path, small: int, big: int) -> tuple[str, list[str], list[str]]:
    """Jobs on a 24 px image (2 KB PNGs) and on a 400 px noise image (a 480 KB PNG)."""
    image = write_png(tmp_path / "in" / "small.png", tiny_image(1))
    noise = np.random.default_rng(0).random((3, 400, 400)).astype(np.float32)
    large = write_png(tmp_path / "in" / "big.png", noise)
    small_ids = [f"small-{i}" for i in range(small)]
    big_ids = [f"big-{i}" for i in range(big)]
    rows = [{"id": i, "task": "denoise", "image": image, "iterations": 3} for i in small_ids]
    rows += [{"id": i, "task": "denoise", "image": large, "iterations": 3} for i in big_ids]
    return write_manifest(tmp_path / "m.parquet", rows), small_ids, big_ids


@pytest.mark.ray
@pytest.mark.slow
def test_a_full_disk_is_the_infrastructure_and_a_plain_rerun_completes(tmp_path, ray_local):
    manifest, small_ids, big_ids = _small_and_big(tmp_path, small=4, big=3)
    with tmpfs(tmp_path / "vol", "2m") as volume:
        out = volume / "out"
        filler = fill_disk(volume, leave=256 * 1024)  # room for small PNGs and results only
        args = [manifest, "--out", str(out), "--gpus", "2", "--fake-fit-seconds", "0"]
        code, output = _run(*args)
        # A full OUT is no job's fault (faults.py): the big jobs are never failed for their
        # input; they end without a row, or failed as "infrastructure", and the run says so.
        assert code == 3 and "No space left on device" in output, output
        rows = {row["id"]: row for row in results(str(out))}
        for job_id in small_ids:
            assert rows[job_id]["status"] == "ok"
        for job_id in big_ids:
            assert job_id not in rows or rows[job_id]["error_kind"] == "infrastructure", rows
        assert_no_partial_files(out)  # the failed writes left no temporary file

        filler.unlink()  # the operator frees space
        code, output = _run(*args)  # a plain rerun: infrastructure failures run again
        assert code == 0, output
        rows = assert_exactly_once(str(out), small_ids + big_ids)
        assert all(row["status"] == "ok" for row in rows.values())
        assert_no_partial_files(out)


def _hog(volume: Path, out: Path, stop: threading.Event, started: threading.Event) -> None:
    """After two results, take every byte of the disk, and every byte freed later."""
    while len(results(str(out))) < 2 and not stop.is_set():
        time.sleep(0.05)
    with open(volume / "hog.bin", "ab", buffering=0) as handle:
        started.set()
        while not stop.is_set():
            try:
                handle.write(b"\0" * 4096)
            except OSError:
                time.sleep(0.005)


@pytest.mark.ray
@pytest.mark.slow
def test_results_that_cannot_be_written_stop_the_run_and_a_rerun_completes(tmp_path, ray_local):
    manifest, ids, _ = _small_and_big(tmp_path, small=8, big=0)
    with tmpfs(tmp_path / "vol", "2m") as volume:
        out = volume / "out"
        stop, started = threading.Event(), threading.Event()
        hog = threading.Thread(target=_hog, args=(volume, out, stop, started))
        hog.start()
        try:
            args = [manifest, "--out", str(out), "--gpus", "2", "--flush-rows", "1"]
            code, output = _run(*args, "--fake-fit-seconds", "0.5")
        finally:
            stop.set()
            hog.join()
        assert started.is_set(), output
        assert code == 3, output  # the infrastructure's: a rerun resumes once it is fixed
        assert "run stopped:" in output and "No space left on device" in output
        assert "Traceback" not in output
        recorded = {row["id"] for row in results(str(out))}
        assert 2 <= len(recorded) < len(ids)

        (volume / "hog.bin").unlink()
        code, output = _run(*args, "--fake-fit-seconds", "0.5", "--retry-failed")
        assert code == 0, output
        rows = assert_exactly_once(str(out), ids)
        assert all(row["status"] == "ok" for row in rows.values())
        assert_no_partial_files(out)


@pytest.mark.ray
@pytest.mark.slow
def test_permission_errors_on_out(tmp_path, ray_local):
    manifest, ids, _ = _small_and_big(tmp_path, small=6, big=0)
    out = tmp_path / "out"
    args = [manifest, "--out", str(out), "--gpus", "2", "--fake-fit-seconds", "0"]

    # 1. OUT itself is not writable: refused before any work, with the reason.
    with unwritable(out):
        code, output = _run(*args)
    assert code == 3, output  # OUT refuses us: the infrastructure (exit_codes.py)
    assert "cannot create the lock" in output and "nothing was run" in output
    assert "PermissionError" in output and "Traceback" not in output
    assert os.listdir(out) == []

    # 2. Two jobs' image folders are not writable: those two fail with the reason.
    blocked = ids[:2]
    folders = [out / "images" / shard_of(job_id) for job_id in blocked]
    with unwritable(folders[0]), unwritable(folders[1]):
        code, output = _run(*args)
    assert code == 3, output  # OUT refuses writes: the infrastructure's, not the jobs'
    rows = {row["id"]: row for row in results(str(out))}
    for job_id in ids:
        if job_id not in blocked:
            assert rows[job_id]["status"] == "ok", rows[job_id]
    for job_id in blocked:  # never failed for their input; at most "infrastructure"
        if job_id in rows:
            assert rows[job_id]["error_kind"] == "infrastructure", rows[job_id]
            assert "PermissionError" in rows[job_id]["error"], rows[job_id]
    assert "PermissionError" in output
    code, output = _run(*args)  # a plain rerun retries them
    assert code == 0, output
    assert all(row["status"] == "ok" for row in assert_exactly_once(str(out), ids).values())

    # 3. results/ is not writable: the run stops before running what it cannot record.
    fresh = tmp_path / "out2"
    (fresh / "results").mkdir(parents=True)
    fresh_args = [manifest, "--out", str(fresh), "--gpus", "2", "--fake-fit-seconds", "0"]
    with unwritable(fresh / "results"):
        code, output = _run(*fresh_args)
    assert code == 3, output
    assert "run stopped: cannot write results to" in output and "PermissionError" in output
    assert results(str(fresh)) == []
    assert not [p for p in fresh.rglob(".*") if p.is_file()]  # no temporary file, no lock
