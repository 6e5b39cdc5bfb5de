"""`dippipe run --stop auto --ensemble M`: run-wide params reach every job, a job's own
params win, and the stopping statistic lands in the traces."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.outputs import read_results, read_traces
from pipeline.storage import Storage
from tests.support.builders import tiny_image, write_manifest, write_png

SMALL = {"channels": 8, "depth": 3, "input_depth": 8, "stop_window": 5, "stop_patience": 10}


@pytest.mark.ray
def test_stop_and_ensemble_flags_apply_unless_the_job_overrides(tmp_path, ray_local):
    # Noisy: denoising's stopping rule arms once the fit reaches the noise level.
    noise = np.random.default_rng(0).normal(0.0, 0.1, (3, 16, 16)).astype(np.float32)
    image = write_png(tmp_path / "a.png", (tiny_image(0, 16) + noise).clip(0, 1))
    rows = [
        {"id": "auto", "task": "denoise", "image": image, "iterations": 400,
         "params": json.dumps(SMALL)},
        {"id": "fixed", "task": "denoise", "image": image, "iterations": 30,
         "params": json.dumps({**SMALL, "stop": "fixed", "ensemble": 1})},
    ]  # fmt: skip
    manifest = write_manifest(tmp_path / "m.parquet", rows)
    out = tmp_path / "out"
    args = ["run", manifest, "--out", str(out), "--gpus", "1", "--no-progress"]
    result = CliRunner().invoke(
        app, [*args, "--sync-every", "5", "--stop", "auto", "--ensemble", "2"]
    )
    assert result.exit_code == 0, result.output
    by_id = {r["id"]: r for r in read_results(Storage(), str(out)).to_pylist()}
    auto, fixed = by_id["auto"], by_id["fixed"]
    assert auto["stop_reason"] == "auto" and auto["stopped_at"] < 400
    # Two members, each stopped early: more steps than one member, fewer than 2 x 400.
    assert auto["stopped_at"] < auto["iterations"] < 800
    assert fixed["stop_reason"] == "iterations" and fixed["iterations"] == 30
    traces = read_traces(Storage(), str(out)).to_pylist()
    auto_stats = [t["stop_stat"] for t in traces if t["id"] == "auto"]
    assert auto_stats[:4] == [None] * 4 and all(v is not None for v in auto_stats[4:])
    assert all(t["stop_stat"] is None for t in traces if t["id"] == "fixed")


def test_a_bad_stop_value_is_refused_before_any_work(tmp_path):
    result = CliRunner().invoke(
        app, ["run", str(tmp_path / "m.parquet"), "--out", str(tmp_path), "--stop", "never"]
    )
    assert result.exit_code == 2 and "--stop must be" in result.output


@pytest.mark.ray
def test_fits_per_gpu_packs_jobs_and_keeps_every_result(tmp_path, ray_local):
    """Two workers with 3 lanes each take 6 jobs at once; jobs of two sizes make packs
    drain and rebuild; an ensemble's members pack together. Every job lands once."""
    params = json.dumps({"channels": 8, "depth": 3, "input_depth": 8})
    rows = []
    for i in range(7):
        size = 16 if i % 3 else 24
        image = write_png(tmp_path / f"{i}.png", tiny_image(i, size))
        rows.append({"id": f"job-{i}", "task": "denoise", "image": image, "reference": image,
                     "iterations": 10 + 5 * i, "params": params})  # fmt: skip
    manifest = write_manifest(tmp_path / "m.parquet", rows)
    out = tmp_path / "out"
    args = ["run", manifest, "--out", str(out), "--gpus", "2", "--no-progress"]
    result = CliRunner().invoke(app, [*args, "--fits-per-gpu", "3", "--ensemble", "2"])
    assert result.exit_code == 0, result.output
    by_id = {r["id"]: r for r in read_results(Storage(), str(out)).to_pylist()}
    assert sorted(by_id) == sorted(r["id"] for r in rows)
    for i in range(7):
        row = by_id[f"job-{i}"]
        assert row["status"] == "ok" and row["iterations"] == 2 * (10 + 5 * i)
        assert row["worker"] in ("worker-0", "worker-1") and row["psnr"] is not None
    assert "3 lane(s)" in " ".join(result.output.split())
