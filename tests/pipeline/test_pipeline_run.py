"""`dippipe run` end to end on a local Ray (2 CPUs, 2 logical GPUs): outputs row by row,
bad inputs, resume, --retry-failed, a worker killed mid-job, memory:// storage."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.images import decode_image, encode_png
from pipeline.manifest import derive_seed
from pipeline.outputs import read_results, read_traces
from pipeline.storage import Storage
from tests.support.builders import TINY_PARAMS, tiny_image, write_manifest, write_png

runner = CliRunner()
STEPS = 12


def _run(*args: str):
    result = runner.invoke(app, ["run", *args, "--no-progress", "--sync-every", "5"])
    text = result.output.translate(str.maketrans("│┃", "  "))  # table borders off
    return result, " ".join(text.split())


def _by_id(out: Path) -> dict[str, dict]:
    rows = read_results(Storage(), str(out)).to_pylist()
    ids = [row["id"] for row in rows]
    assert len(ids) == len(set(ids)), f"duplicated result rows: {sorted(ids)}"
    return {row["id"]: row for row in rows}


def _mixed_manifest(tmp_path: Path) -> tuple[str, dict[str, str]]:
    """Three good jobs and one of every per-job problem; returns (manifest, expected errors)."""
    inputs = tmp_path / "inputs"
    image = write_png(inputs / "a.png", tiny_image(0))
    mask = write_png(inputs / "a_mask.png", (tiny_image(1, 24, 1) > 0.4).astype(np.float32))
    small = write_png(inputs / "small.png", tiny_image(2, 16))
    hr = write_png(inputs / "hr.png", tiny_image(3, 48))
    (inputs / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x17" * 64)
    common = {"iterations": STEPS, "params": TINY_PARAMS}
    rows = [
        {"id": "denoise-ok", "task": "denoise", "image": image, "reference": image, **common},
        {"id": "inpaint-ok", "task": "inpaint", "image": image, "mask": mask, **common},
        {"id": "sr-ok", "task": "super_resolution", "image": image, "scale": 2, "reference": hr},
        {"id": "corrupt", "task": "denoise", "image": str(inputs / "corrupt.png")},
        {"id": "missing", "task": "denoise", "image": str(inputs / "nope.png")},
        {"id": "mask-size", "task": "inpaint", "image": image, "mask": small},
        {"id": "unknown-task", "task": "colourise", "image": image},
        {"id": "bad-params", "task": "denoise", "image": image, "params": '{"depth": 99}'},
    ]
    rows[2].update(common)
    for row in rows[3:]:
        row.setdefault("iterations", STEPS)
    errors = {
        "corrupt": "not a readable image",
        "missing": f"image not found: {inputs / 'nope.png'}",
        "mask-size": "is 16x16 pixels, expected 24x24",
        "unknown-task": "unknown task 'colourise'",
        "bad-params": "depth",
    }
    return write_manifest(tmp_path / "manifest.parquet", rows), errors


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, ray_local):
    tmp = tmp_path_factory.mktemp("run")
    manifest, errors = _mixed_manifest(tmp)
    out = tmp / "out"
    result, output = _run(manifest, "--out", str(out), "--gpus", "2")
    return {
        "tmp": tmp,
        "manifest": manifest,
        "out": out,
        "errors": errors,
        "result": result,
        "output": output,
    }


@pytest.mark.ray
def test_run_exits_1_and_every_job_has_one_row(first_run):
    assert first_run["result"].exit_code == 1, first_run["output"]
    rows = _by_id(first_run["out"])
    assert set(rows) == {"denoise-ok", "inpaint-ok", "sr-ok", *first_run["errors"]}
    assert "ran: ok 3" in first_run["output"] and "ran: failed 5" in first_run["output"]
    assert "-> worker-" in first_run["output"]  # logs say which job runs where


@pytest.mark.ray
def test_ok_rows_outputs_and_traces(first_run):
    rows, out = _by_id(first_run["out"]), first_run["out"]
    traces = read_traces(Storage(), str(out)).to_pylist()
    sizes = {"denoise-ok": 24, "inpaint-ok": 24, "sr-ok": 48}
    for job_id, size in sizes.items():
        row = rows[job_id]
        assert row["status"] == "ok" and row["error"] is None
        assert (row["task"], row["iterations"], row["attempts"]) == (row["task"], STEPS, 1)
        assert row["seed"] == derive_seed(job_id) and row["device"] == "cpu"
        assert row["energy"] > 0 and row["seconds"] > 0 and row["worker"].startswith("worker-")
        assert row["stop_reason"] == "iterations" and row["stopped_at"] == STEPS
        assert (row["psnr"] is None) == (job_id == "inpaint-ok")
        assert Path(row["output"]).parent.parent == out / "images"
        image = decode_image(Path(row["output"]).read_bytes())
        assert image.pixels.shape == (3, size, size)
        steps = [t for t in traces if t["id"] == job_id]
        assert [t["step"] for t in steps] == list(range(STEPS))
        assert all((t["psnr"] is None) == (row["psnr"] is None) for t in steps)
        assert all(t["energy"] > 0 for t in steps)
    assert {t["id"] for t in traces} == set(sizes)  # failed jobs have no trace rows


@pytest.mark.ray
def test_failed_rows_say_why(first_run):
    rows = _by_id(first_run["out"])
    for job_id, message in first_run["errors"].items():
        row = rows[job_id]
        assert row["status"] == "failed" and message in row["error"], row
        assert row["output"] is None and row["attempts"] == 1


@pytest.mark.ray
def test_run_json_and_no_temp_files(first_run):
    out = first_run["out"]
    record = json.loads((out / "run.json").read_text())
    assert record["versions"]["torch"] and record["versions"]["ray"]
    assert record["summary"]["ok"] == 3 and record["finished_at"]
    assert "testing-secret-value" not in (out / "run.json").read_text()
    assert not [p for p in out.rglob(".*") if p.is_file()]


@pytest.mark.ray
def test_rerun_does_no_work_and_retry_failed_replaces_rows(first_run):
    out, manifest = first_run["out"], first_run["manifest"]
    before = sorted((p.name, p.read_bytes()) for p in (out / "results").iterdir())
    result, output = _run(manifest, "--out", str(out))
    assert result.exit_code == 1 and "nothing to do" in output
    assert sorted((p.name, p.read_bytes()) for p in (out / "results").iterdir()) == before
    write_png(first_run["tmp"] / "inputs" / "corrupt.png", tiny_image(9))  # the user fixes it
    result, output = _run(manifest, "--out", str(out), "--retry-failed")
    assert result.exit_code == 1, output
    rows = _by_id(out)  # asserts one row per id
    assert len(rows) == 8 and rows["corrupt"]["status"] == "ok"
    assert rows["missing"]["status"] == "failed" and rows["denoise-ok"]["attempts"] == 1
    traces = read_traces(Storage(), str(out)).to_pylist()
    assert [t["step"] for t in traces if t["id"] == "corrupt"] == list(range(STEPS))
    assert len([t for t in traces if t["id"] == "denoise-ok"]) == STEPS


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([{"id": "a", "task": "denoise", "image": "x"}] * 2, "duplicate id at row 0 ('a')"),
        ([{"id": "../x", "task": "denoise", "image": "x"}], "unsafe id"),
        ([{"id": "a", "task": "denoise"}], "missing required column 'image'"),
    ],
)
def test_manifest_problems_stop_the_run_before_any_work(tmp_path, rows, message):
    manifest = write_manifest(tmp_path / "m.parquet", rows)
    result, output = _run(manifest, "--out", str(tmp_path / "out"))
    assert result.exit_code == 2 and message in output and "nothing was run" in output
    assert not (tmp_path / "out").exists()


def test_empty_manifest_stops_the_run(tmp_path):
    manifest = tmp_path / "m.parquet"
    pq.write_table(pq.read_table(write_manifest(manifest, [{"id": "a"}])).slice(0, 0), manifest)
    result, output = _run(str(manifest), "--out", str(tmp_path / "out"))
    assert result.exit_code == 2 and "no rows" in output


def _good_manifest(tmp_path: Path, ids: list[str]) -> str:
    image = write_png(tmp_path / "in.png", tiny_image(4))
    rows = [
        {"id": i, "task": "denoise", "image": image, "iterations": 30, "params": TINY_PARAMS}
        for i in ids
    ]
    return write_manifest(tmp_path / "m.parquet", rows)


@pytest.mark.ray
@pytest.mark.slow
def test_worker_killed_mid_job_is_replaced_and_the_job_retried(tmp_path, monkeypatch):
    manifest = _good_manifest(tmp_path, ["j0", "j1", "j2", "j3"])
    monkeypatch.setenv("DIPPIPE_FAULT_KILL_JOB", "j1")
    monkeypatch.setenv("DIPPIPE_FAULT_MARKER", str(tmp_path / "killed-once"))
    result, output = _run(manifest, "--out", str(tmp_path / "out"), "--gpus", "2")
    assert result.exit_code == 0, output
    assert (tmp_path / "killed-once").exists() and "worker processes replaced 1" in output
    rows = _by_id(tmp_path / "out")
    assert sorted(rows) == ["j0", "j1", "j2", "j3"]
    assert all(row["status"] == "ok" for row in rows.values())
    assert {i: row["attempts"] for i, row in rows.items()} == {"j0": 1, "j1": 2, "j2": 1, "j3": 1}
    traces = read_traces(Storage(), str(tmp_path / "out")).to_pylist()
    assert len(traces) == 4 * 30 and len([t for t in traces if t["id"] == "j1"]) == 30
    result, output = _run(manifest, "--out", str(tmp_path / "out"))
    assert result.exit_code == 0 and "nothing to do" in output


@pytest.mark.ray
def test_attempts_are_bounded_then_retry_failed_recovers(tmp_path, monkeypatch):
    manifest = _good_manifest(tmp_path, ["k0", "k1"])
    monkeypatch.setenv("DIPPIPE_FAULT_KILL_JOB", "k1")
    monkeypatch.setenv("DIPPIPE_FAULT_MARKER", str(tmp_path / "killed-once"))
    out = str(tmp_path / "out")
    result, output = _run(manifest, "--out", out, "--gpus", "1", "--max-attempts", "1")
    assert result.exit_code == 1
    rows = _by_id(tmp_path / "out")
    assert rows["k0"]["status"] == "ok" and rows["k1"]["status"] == "failed"
    assert "worker process died 1 times" in rows["k1"]["error"] and rows["k1"]["attempts"] == 1
    result, output = _run(manifest, "--out", out, "--gpus", "1", "--retry-failed")
    assert result.exit_code == 0, output
    rows = _by_id(tmp_path / "out")
    assert rows["k1"]["status"] == "ok" and len(rows) == 2


@pytest.mark.ray
def test_memory_storage_through_ray_workers():
    storage = Storage()
    storage.write_bytes("memory://e2e/in/a.png", encode_png(tiny_image(6)))
    rows = [
        {
            "id": "m1",
            "task": "denoise",
            "image": "memory://e2e/in/a.png",
            "iterations": 8,
            "params": TINY_PARAMS,
        }
    ]
    import pyarrow as pa

    storage.write_parquet("memory://e2e/m.parquet", pa.Table.from_pylist(rows))
    result, output = _run("memory://e2e/m.parquet", "--out", "memory://e2e/out", "--gpus", "1")
    assert result.exit_code == 0, output
    (row,) = read_results(storage, "memory://e2e/out").to_pylist()
    assert row["status"] == "ok"
    assert decode_image(storage.read_bytes(row["output"])).size == (24, 24)


@pytest.mark.ray
def test_demo_builds_inputs_runs_and_prints_the_psnr_table(tmp_path):
    result = runner.invoke(app, ["demo", "--out", str(tmp_path / "demo"), "--iterations", "5"])
    output = " ".join(result.output.split())
    assert result.exit_code == 0, output
    assert "PSNR against the clean image" in output and "look at:" in output
    rows = _by_id(tmp_path / "demo")
    assert sorted(rows) == ["astronaut-denoise", "chelsea-sr-x2", "coffee-inpaint"]
    assert all(row["status"] == "ok" and row["psnr"] is not None for row in rows.values())
    sr = decode_image(Path(rows["chelsea-sr-x2"]["output"]).read_bytes())
    assert sr.size == (64, 64)
