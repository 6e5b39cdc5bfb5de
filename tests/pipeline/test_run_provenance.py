"""Provenance of each result: the run that wrote it (run_id, runs/<id>.json kept per run) and
the spec it ran with, so that a rerun names (or, with --rerun-changed, reruns) the finished
ids whose spec changed since."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.outputs import read_results
from pipeline.storage import Storage
from tests.support.builders import tiny_image, write_manifest, write_png

runner = CliRunner()


def _run(manifest: str, out: Path, *extra: str) -> tuple[int, str]:
    args = ["run", manifest, "--out", str(out), "--gpus", "0", "--workers", "1",
            "--fake-fit-seconds", "0", "--no-progress", *extra]  # fmt: skip
    result = runner.invoke(app, args)
    return result.exit_code, " ".join(result.output.split())


def _rows(out: Path) -> dict[str, dict]:
    rows = read_results(Storage(), str(out)).to_pylist()
    assert len(rows) == len({row["id"] for row in rows}), "an id has two rows"
    return {row["id"]: row for row in rows}


@pytest.mark.ray
def test_rows_name_their_run_and_a_changed_spec_is_named_then_rerun_on_request(tmp_path, ray_local):
    image = write_png(tmp_path / "a.png", tiny_image(0, 16))
    other = write_png(tmp_path / "b.png", tiny_image(1, 16))
    jobs = [{"id": "a", "task": "denoise", "image": image, "iterations": 10},
            {"id": "b", "task": "denoise", "image": image, "iterations": 10}]  # fmt: skip
    manifest = write_manifest(tmp_path / "m.parquet", jobs)
    out = tmp_path / "out"

    code, text = _run(manifest, out)
    assert code == 0, text
    first = _rows(out)
    run_json = json.loads((out / "run.json").read_text())
    assert {row["run_id"] for row in first.values()} == {run_json["run_id"]}
    kept = json.loads((out / "runs" / f"{run_json['run_id']}.json").read_text())
    assert kept["run_id"] == run_json["run_id"] and kept["summary"]["ok"] == 2
    assert all(row["spec"] for row in first.values())

    # Another image for "a": a finished id that now means something else. Nothing pending.
    jobs[0]["image"] = other
    write_manifest(manifest, jobs)
    code, text = _run(manifest, out)
    assert code == 0 and "nothing to do" in text, text
    assert "1 finished job(s) have another spec" in text and ": a;" in text, text
    assert _rows(out) == first  # named, kept

    # The same with a new job to run: the check runs as the jobs stream past.
    jobs.append({"id": "c", "task": "denoise", "image": image, "iterations": 10})
    write_manifest(manifest, jobs)
    code, text = _run(manifest, out)
    assert code == 0 and "1 finished job(s) have another spec" in text, text
    third = _rows(out)
    assert third["a"] == first["a"] and third["b"] == first["b"]
    assert third["c"]["run_id"] != run_json["run_id"]

    # --rerun-changed: "a" runs again, once; "b" and "c" are untouched; every run kept.
    code, text = _run(manifest, out, "--rerun-changed")
    assert code == 0 and "running again 1 job(s) whose spec changed" in text, text
    fourth = _rows(out)
    assert fourth["b"] == first["b"] and fourth["c"] == third["c"]
    assert fourth["a"]["run_id"] not in (first["a"]["run_id"], third["c"]["run_id"])
    assert fourth["a"]["spec"] != first["a"]["spec"]
    assert len(list((out / "runs").glob("*.json"))) == 4

    code, text = _run(manifest, out)  # settled: nothing changed, nothing named
    assert code == 0 and "another spec" not in text, text


@pytest.mark.ray
def test_run_wide_defaults_are_part_of_the_spec(tmp_path, ray_local):
    image = write_png(tmp_path / "a.png", tiny_image(0, 16))
    manifest = write_manifest(tmp_path / "m.parquet", [{"id": "a", "task": "denoise",
                                                         "image": image}])  # fmt: skip
    out = tmp_path / "out"
    assert _run(manifest, out, "--stop", "auto")[0] == 0
    code, text = _run(manifest, out, "--stop", "fixed")
    assert code == 0 and "1 finished job(s) have another spec" in text, text


@pytest.mark.ray
def test_a_failed_job_whose_input_was_fixed_is_named_and_rerun_on_request(tmp_path, ray_local):
    image = write_png(tmp_path / "a.png", tiny_image(0, 16))
    jobs = [{"id": "a", "task": "denoise", "image": image},
            {"id": "b", "task": "denoise", "image": str(tmp_path / "missing.png")}]  # fmt: skip
    manifest = write_manifest(tmp_path / "m.parquet", jobs)
    out = tmp_path / "out"
    code, text = _run(manifest, out)
    assert code == 1 and _rows(out)["b"]["error_kind"] == "job", text

    jobs[1]["image"] = image  # the user fixes the URI of the failed job
    write_manifest(manifest, jobs)
    code, text = _run(manifest, out)
    assert code == 1 and "1 finished job(s) have another spec" in text and ": b;" in text, text
    code, text = _run(manifest, out, "--rerun-changed")
    assert code == 0 and "running again 1 job(s) whose spec changed" in text, text
    rows = _rows(out)
    assert rows["b"]["status"] == "ok" and rows["a"]["status"] == "ok"
