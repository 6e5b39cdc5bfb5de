"""Ctrl-C on a real `dippipe run` process (its own embedded Ray): finished jobs are kept,
the exit code is 130, and a rerun does the rest with no duplicated row."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.outputs import read_results
from pipeline.storage import Storage
from tests.support.builders import tiny_image, write_manifest, write_png

JOBS = 12  # enough left to interrupt even when the machine is slow to poll


def _shards(out: Path) -> int:
    """Results shards written so far (one per job with --flush-rows 1): cheap to poll."""
    return len(list((out / "results").glob("*.parquet")))


def _results(out: Path) -> list[dict]:
    return read_results(Storage(), str(out)).to_pylist() if (out / "results").exists() else []


@pytest.mark.slow
@pytest.mark.ray
def test_ctrl_c_keeps_finished_jobs_and_a_rerun_resumes(tmp_path):
    image = write_png(tmp_path / "in.png", tiny_image(0))
    rows = [{"id": f"job-{i}", "task": "denoise", "image": image} for i in range(JOBS)]
    manifest = write_manifest(tmp_path / "m.parquet", rows)
    out = tmp_path / "out"
    # Benchmark mode: jobs of a fixed 1.5 s that still read inputs and write outputs.
    args = [
        "run",
        manifest,
        "--out",
        str(out),
        "--gpus",
        "0",
        "--workers",
        "1",
        "--flush-rows",
        "1",
        "--no-progress",
        "--fake-fit-seconds",
        "1.5",
    ]
    command = [sys.executable, "-c", "from pipeline.cli import app; app()", *args]
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        # A test runner started in the background (`cmd &` without job control) ignores
        # SIGINT, and so would the child: give it the default so Ctrl-C reaches Python.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 120
    while _shards(out) < 2 and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.1)
    os.kill(process.pid, signal.SIGINT)
    output = process.communicate(timeout=60)[0].decode()
    assert process.returncode == 130, output
    assert "interrupted" in output
    kept = {row["id"] for row in _results(out)}
    assert 2 <= len(kept) < JOBS
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    ids = [row["id"] for row in _results(out)]
    assert sorted(ids) == sorted(r["id"] for r in rows)  # all there, none twice


def test_a_second_stop_signal_does_not_cut_the_final_flush_short():
    """Ray's `job stop` signals the entrypoint and every child: dippipe may get SIGTERM twice;
    the second, arriving while the last results are written, must wait."""
    import os
    import signal

    from pipeline.runner import _install_sigterm, _restore_sigterm, _signals_held

    previous = signal.getsignal(signal.SIGTERM)
    _install_sigterm()  # SIGTERM raises KeyboardInterrupt, as in a run
    try:
        with _signals_held():
            os.kill(os.getpid(), signal.SIGTERM)  # ignored: no KeyboardInterrupt here
            written = True
        assert written
        with pytest.raises(KeyboardInterrupt):  # and the run's handler is back afterwards
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler interrupts this at once
    finally:
        _restore_sigterm(previous)
