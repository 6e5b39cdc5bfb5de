"""Manifest schema, streaming reads, manifest-level and per-job validation, folder builder."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.folder import FolderSpec, build_from_folder
from pipeline.manifest import (
    MANIFEST_SCHEMA,
    ManifestError,
    derive_seed,
    inspect_manifest,
    iter_jobs,
    job_from_row,
    job_problems,
)
from pipeline.storage import Storage
from pipeline.validate import validate_manifest
from tests.support.builders import TINY_PARAMS, tiny_image, write_manifest, write_png

runner = CliRunner()


def _rows(*ids: str) -> list[dict]:
    return [{"id": i, "task": "denoise", "image": f"{i}.png"} for i in ids]


def _rejected(tmp_path, rows_or_table) -> ManifestError:
    path = tmp_path / "m.parquet"
    if isinstance(rows_or_table, pa.Table):
        pq.write_table(rows_or_table, path)
    else:
        write_manifest(path, rows_or_table)
    with pytest.raises(ManifestError) as caught:
        inspect_manifest(Storage(), str(path))
    return caught.value


def test_schema_has_the_contract_columns_and_types():
    assert MANIFEST_SCHEMA.names == [
        "id",
        "task",
        "image",
        "mask",
        "guide",
        "reference",
        "scale",
        "iterations",
        "seed",
        "params",
    ]
    assert MANIFEST_SCHEMA.field("scale").type == pa.int32()
    assert MANIFEST_SCHEMA.field("seed").type == pa.int64()


@pytest.mark.parametrize(
    "bad_id", ["../x", "a/b", "a\\b", "caf\u00e9", "", "..", "x" * 129, "sp ace", "a\x00"]
)
def test_unsafe_ids_are_rejected_naming_the_row(tmp_path, bad_id):
    error = _rejected(tmp_path, _rows("ok-1", bad_id))
    assert "unsafe id" in str(error)
    assert "row 1" in str(error) and repr(bad_id) in str(error)


def test_duplicate_ids_name_every_row(tmp_path):
    error = _rejected(tmp_path, _rows("a", "b", "a", "c", "b"))
    assert "duplicate id at row 0 ('a'), row 1 ('b'), row 2 ('a'), row 4 ('b')" in str(error)


def test_missing_column_empty_manifest_and_not_parquet(tmp_path):
    error = _rejected(tmp_path, [{"id": "a", "task": "denoise"}])
    assert error.problems == ["missing required column 'image'"]
    empty = pa.table({name: pa.array([], pa.string()) for name in ("id", "task", "image")})
    assert "no rows" in str(_rejected(tmp_path, empty))
    (tmp_path / "notes.parquet").write_text("id,task,image\n")
    with pytest.raises(ManifestError, match="not a Parquet file"):
        inspect_manifest(Storage(), str(tmp_path / "notes.parquet"))
    with pytest.raises(ManifestError, match="file not found"):
        inspect_manifest(Storage(), str(tmp_path / "absent.parquet"))


def test_wrong_column_type_is_a_manifest_problem(tmp_path):
    table = pa.table({"id": ["a"], "task": ["denoise"], "image": ["x"], "scale": ["two"]})
    assert "column 'scale' has type string, expected int32" in str(_rejected(tmp_path, table))


def test_int64_columns_all_null_columns_and_extra_columns_are_accepted(tmp_path):
    table = pa.table(
        {
            "id": ["a", "b"],
            "task": ["super_resolution", "denoise"],
            "image": ["x", "y"],
            "scale": pa.array([2, None], pa.int64()),
            "mask": pa.nulls(2),
            "note": ["mine", "also"],
        }
    )
    pq.write_table(table, tmp_path / "m.parquet")
    info = inspect_manifest(Storage(), str(tmp_path / "m.parquet"))
    assert info.ignored_columns == ("note",)
    jobs = list(iter_jobs(Storage(), info))
    assert [(j.id, j.scale, j.inputs.get("mask"), j.row) for j in jobs] == [
        ("a", 2, None, 0),
        ("b", None, None, 1),
    ]


def test_seed_defaults_to_a_stable_hash_of_the_id():
    assert derive_seed("img-1") == derive_seed("img-1") != derive_seed("img-2")
    assert 0 <= derive_seed("img-1") < 2**63
    row = {"id": "img-1", "task": "denoise", "image": "x"}
    assert job_from_row(row, 0).seed == derive_seed("img-1")
    assert job_from_row({**row, "seed": 7}, 0).seed == 7


def test_streaming_a_large_manifest_holds_one_batch(tmp_path):
    n = 200_000
    ids = [f"img-{i:07d}" for i in range(n)]
    table = pa.table(
        {"id": ids, "task": ["denoise"] * n, "image": [f"s3://b/{i}.png" for i in ids]}
    )
    pq.write_table(table, tmp_path / "big.parquet", row_group_size=50_000)
    info = inspect_manifest(Storage(), str(tmp_path / "big.parquet"))
    count, last = 0, None
    for job in iter_jobs(Storage(), info, batch_rows=4096):
        count, last = count + 1, job
    assert info.num_rows == count == n and last.id == ids[-1] and last.row == n - 1


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"task": "dehaze"}, "unknown task 'dehaze'"),
        ({"task": "inpaint"}, "task 'inpaint' needs column 'mask'"),
        ({"task": "flash_no_flash"}, "needs column 'guide'"),
        ({"task": "super_resolution"}, "super_resolution needs scale"),
        ({"params": "{lr: 1}"}, "params is not valid JSON"),
        ({"params": "[1, 2]"}, "params must be a JSON object"),
        ({"params": '{"chanels": 8}'}, "chanels"),
        ({"params": '{"lr": -1}'}, "lr"),
        ({"iterations": 0}, "iterations must be at least 1"),
    ],
)
def test_job_problems(changes, message):
    job = job_from_row({"id": "a", "task": "denoise", "image": "x.png", **changes}, 0)
    problems = job_problems(job)
    assert any(message in p for p in problems), problems


def test_good_job_has_no_problems():
    job = job_from_row({"id": "a", "task": "denoise", "image": "x", "params": TINY_PARAMS}, 0)
    assert job_problems(job) == []


def test_validate_reports_files_sizes_and_params(tmp_path):
    image = write_png(tmp_path / "a.png", tiny_image(0, 24))
    small_mask = write_png(tmp_path / "m.png", np.ones((1, 16, 16), np.float32))
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    rows = [
        {"id": "good", "task": "denoise", "image": image, "params": TINY_PARAMS},
        {"id": "missing", "task": "denoise", "image": str(tmp_path / "none.png")},
        {"id": "corrupt", "task": "denoise", "image": str(tmp_path / "bad.png")},
        {"id": "mask", "task": "inpaint", "image": image, "mask": small_mask},
        {"id": "ref", "task": "super_resolution", "image": image, "scale": 2, "reference": image},
        {"id": "params", "task": "denoise", "image": image, "params": '{"depth": "x"}'},
    ]
    manifest = write_manifest(tmp_path / "m.parquet", rows)
    report = validate_manifest(Storage(), manifest)
    found = {job_id: problem for _, job_id, problem in report.job_problems}
    assert not report.ok and report.jobs_with_problems == 5 and "good" not in found
    assert found["missing"].startswith("image not found")
    assert "not a readable image" in found["corrupt"]
    assert "mask" in found["mask"] and "16x16 pixels, expected 24x24" in found["mask"]
    assert "expected 48x48" in found["ref"]
    assert "depth" in found["params"]
    result = runner.invoke(app, ["validate", manifest])
    assert result.exit_code == 1 and "row 1 (missing): image not found" in result.output
    good = write_manifest(tmp_path / "good.parquet", rows[:1])
    result = runner.invoke(app, ["validate", good])
    assert result.exit_code == 0 and "1 jobs, no problems" in result.output


def test_validate_lists_manifest_problems(tmp_path):
    manifest = write_manifest(tmp_path / "m.parquet", _rows("a", "a", "../x"))
    result = runner.invoke(app, ["validate", manifest])
    assert result.exit_code == 1
    assert "duplicate id" in result.output and "'../x'" in result.output


def test_manifest_command_builds_from_a_folder(tmp_path):
    folder = tmp_path / "photos"
    write_png(folder / "cat.png", tiny_image(1))
    write_png(folder / "cat_mask.png", np.ones((1, 24, 24), np.float32))
    write_png(folder / "cat_ref.png", tiny_image(1))
    write_png(folder / "dog 2.png", tiny_image(2))
    (folder / "readme.txt").write_text("not an image")
    out = tmp_path / "m.parquet"
    result = runner.invoke(
        app, ["manifest", str(folder), "--task", "inpaint", "--out", str(out), "--params", "{}"]
    )
    assert result.exit_code == 0, result.output
    rows = pq.read_table(out).to_pylist()
    assert [r["id"] for r in rows] == ["cat", "dog_2"]
    assert rows[0]["mask"].endswith("cat_mask.png") and rows[0]["reference"].endswith("_ref.png")
    assert rows[1]["mask"] is None
    assert pq.read_table(out).schema.equals(MANIFEST_SCHEMA)
    spec = FolderSpec(str(tmp_path / "empty"), "denoise", params={"lr": 0.01})
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        build_from_folder(Storage(), spec)
    assert json.loads('{"lr": 0.01}') == spec.params
