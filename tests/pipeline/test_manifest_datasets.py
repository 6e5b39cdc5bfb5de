"""Issue 15: values that do not fit a column are that row's problem; folders and globs of
Parquet parts (Spark / Dask / Ray output) are one manifest."""

from __future__ import annotations

import math
import uuid

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.manifest import (
    ManifestError,
    inspect_manifest,
    iter_jobs,
    iter_manifest_columns,
    job_problems,
    manifest_files,
    read_ids,
)
from pipeline.storage import Storage, StorageOptions
from pipeline.validate import validate_manifest
from pipeline.worker import Fitter, WorkerConfig
from tests.support.builders import tiny_image, write_png

runner = CliRunner()
BIG = 1_099_511_627_776  # 2**40, written out: beyond int32


def _images(tmp_path, count: int) -> list[str]:
    return [write_png(tmp_path / "in" / f"{i}.png", tiny_image(i, size=16)) for i in range(count)]


def _table(ids: list[str], images: list[str], **columns: pa.Array) -> pa.Table:
    base = {"id": ids, "task": ["denoise"] * len(ids), "image": images}
    return pa.table({**base, **columns})


# --- values that do not fit: per-row problems ------------------------------------------------


def test_int64_iterations_of_2_to_the_40_is_that_rows_problem_in_validate(tmp_path):
    images = _images(tmp_path, 3)
    path = tmp_path / "m.parquet"
    iterations = pa.array([100, BIG, None], pa.int64())
    pq.write_table(_table(["a", "b", "c"], images, iterations=iterations), path)

    report = validate_manifest(Storage(), str(path), threads=2)

    assert report.manifest_problems == []
    assert report.rows == 3 and report.jobs_with_problems == 1
    [(row, job_id, problem)] = report.job_problems
    assert (row, job_id) == (1, "b")
    assert "'iterations'" in problem and "1099511627776" in problem

    ran = runner.invoke(app, ["validate", str(path)])
    text = " ".join(ran.output.split())
    assert ran.exit_code == 1 and "1099511627776" in text and "iterations" in text


def test_the_run_path_fails_that_job_and_yields_the_others(tmp_path):
    images = _images(tmp_path, 3)
    path = tmp_path / "m.parquet"
    iterations = pa.array([100, BIG, 200], pa.int64())
    pq.write_table(_table(["a", "b", "c"], images, iterations=iterations), path)

    info = inspect_manifest(Storage(), str(path))  # no manifest-level problem
    jobs = list(iter_jobs(Storage(), info))
    assert [(j.id, j.row, j.iterations) for j in jobs] == [
        ("a", 0, 100),
        ("b", 1, None),
        ("c", 2, 200),
    ]
    assert job_problems(jobs[0]) == [] and job_problems(jobs[2]) == []
    assert any("'iterations'" in p and "1099511627776" in p for p in job_problems(jobs[1]))

    fitter = Fitter(WorkerConfig(out=str(tmp_path / "out"), device="cpu", fake_fit_seconds=0))
    rows = {job.id: fitter.run(job).row for job in jobs}
    assert rows["a"]["status"] == "ok" and rows["c"]["status"] == "ok"
    assert rows["b"]["status"] == "failed"
    assert "iterations" in rows["b"]["error"] and "1099511627776" in rows["b"]["error"]


@pytest.mark.parametrize(
    ("column", "values", "bad_rows", "shown"),
    [
        (
            "scale",
            pa.array([2, -(2**33), 2**31], pa.int64()),
            [1, 2],
            ["-8589934592", "2147483648"],
        ),
        ("seed", pa.array([1, 2**63 + 5, 2**64 - 1], pa.uint64()), [1, 2], ["9223372036854775813"]),
        (
            "iterations",
            pa.array([1800.0, 1800.5, math.nan], pa.float64()),
            [1, 2],
            ["1800.5", "nan"],
        ),
        ("iterations", pa.array([3.0, 1e20, -(2.0**31)], pa.float32()), [1], ["1e+20"]),
        ("iterations", pa.array([5, 2**32 - 1, 7], pa.uint32()), [1], ["4294967295"]),
    ],
)
def test_values_that_do_not_fit_their_column_become_row_problems(
    tmp_path, column, values, bad_rows, shown
):
    path = tmp_path / "m.parquet"
    task = "super_resolution" if column == "scale" else "denoise"
    table = pa.table(
        {"id": ["r0", "r1", "r2"], "task": [task] * 3, "image": ["x"] * 3, column: values}
    )
    pq.write_table(table, path)
    jobs = list(iter_jobs(Storage(), inspect_manifest(Storage(), str(path))))
    assert [j.row for j in jobs if j.problems] == bad_rows
    text = " ".join(p for j in jobs for p in j.problems)
    assert all(f"'{column}'" in p for j in jobs for p in j.problems)
    assert all(value in text for value in shown), text
    assert jobs[0].problems == ()
    for job in jobs:
        if job.problems:
            assert job_problems(job) == list(job.problems)


def test_float_integer_column_from_pandas_reads_as_integers(tmp_path):
    path = tmp_path / "m.parquet"
    table = pa.table(
        {"id": ["a", "b"], "task": ["denoise"] * 2, "image": ["x", "y"],
         "iterations": pa.array([1800.0, None], pa.float64())}
    )  # fmt: skip
    pq.write_table(table, path)
    jobs = list(iter_jobs(Storage(), inspect_manifest(Storage(), str(path))))
    assert [(j.iterations, j.problems) for j in jobs] == [(1800, ()), (None, ())]


def test_a_column_type_that_can_never_fit_is_still_a_manifest_problem(tmp_path):
    path = tmp_path / "m.parquet"
    pq.write_table(
        pa.table({"id": ["a"], "task": ["denoise"], "image": ["x"], "iterations": ["10"]}), path
    )
    with pytest.raises(ManifestError) as caught:
        inspect_manifest(Storage(), str(path))
    assert caught.value.problems == ["column 'iterations' has type string, expected int32"]


def test_a_large_manifest_with_one_bad_value_fails_only_that_row(tmp_path):
    n = 200_000
    iterations = pa.array([*range(1, n), BIG], pa.int64())
    ids = [f"j{i}" for i in range(n)]
    path = tmp_path / "m.parquet"
    pq.write_table(_table(ids, ["x"] * n, iterations=iterations), path)
    info = inspect_manifest(Storage(), str(path))
    bad = [(j.row, j.problems) for j in iter_jobs(Storage(), info, batch_rows=65536) if j.problems]
    assert [row for row, _ in bad] == [n - 1]


# --- folders and globs of parts ---------------------------------------------------------------


def _write_parts(folder, tables: dict[str, pa.Table]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, table in tables.items():
        pq.write_table(table, folder / name)


def _spark_folder(tmp_path, images: list[str]):
    """Three parts written out of name order, with Spark's and Hadoop's side files."""
    folder = tmp_path / "jobs"
    _write_parts(
        folder,
        {
            "part-00002-x.snappy.parquet": _table(["e", "f"], images[4:6]),
            "part-00000-x.snappy.parquet": _table(["a", "b"], images[0:2]),
            "part-00001-x.snappy.parquet": _table(
                ["c", "d"], images[2:4], iterations=pa.array([10, BIG], pa.int64())
            ),
        },
    )
    (folder / "_SUCCESS").write_bytes(b"")
    (folder / ".part-00000-x.snappy.parquet.crc").write_bytes(b"crc!")
    (folder / "part-00000-x.snappy.parquet.crc").write_bytes(b"crc!")
    (folder / "_metadata").write_bytes(b"not parquet")
    (folder / "_temporary").mkdir()
    (folder / "_temporary" / "part-9.parquet").write_bytes(b"half written")
    return folder


def test_a_folder_of_parts_is_one_manifest_in_name_order(tmp_path):
    images = _images(tmp_path, 6)
    folder = _spark_folder(tmp_path, images)
    storage = Storage()

    assert [f.rsplit("/", 1)[1] for f in manifest_files(storage, str(folder))] == [
        "part-00000-x.snappy.parquet",
        "part-00001-x.snappy.parquet",
        "part-00002-x.snappy.parquet",
    ]
    info = inspect_manifest(storage, str(folder))
    assert info.num_rows == 6 and [p.num_rows for p in info.parts] == [2, 2, 2]
    assert "iterations" in info.columns
    jobs = list(iter_jobs(storage, info))
    assert [(j.id, j.row, j.iterations) for j in jobs] == [
        ("a", 0, None), ("b", 1, None), ("c", 2, 10), ("d", 3, None), ("e", 4, None), ("f", 5, None)
    ]  # fmt: skip
    assert read_ids(storage, info).to_pylist() == ["a", "b", "c", "d", "e", "f"]

    report = validate_manifest(storage, str(folder) + "/", threads=2)
    assert report.manifest_problems == [] and report.rows == 6
    assert [(row, job_id) for row, job_id, _ in report.job_problems] == [(3, "d")]
    assert "1099511627776" in report.job_problems[0][2]

    found = {
        row["id"]: row["image"]
        for table in iter_manifest_columns(storage, str(folder), ["id", "image", "mask"], 1024)
        for row in table.to_pylist()
    }
    assert found == dict(zip("abcdef", images, strict=True))


def test_row_numbers_count_across_parts(tmp_path):
    folder = tmp_path / "jobs"
    _write_parts(
        folder,
        {
            "part-0.parquet": _table(["a", "b"], ["x", "y"]),
            "part-1.parquet": _table(["c", "a"], ["x", "y"]),
        },
    )
    with pytest.raises(ManifestError) as caught:
        inspect_manifest(Storage(), str(folder))
    assert "duplicate id at row 0 ('a'), row 3 ('a')" in str(caught.value)


def test_dask_parts_are_ordered_by_number(tmp_path):
    folder = tmp_path / "dask"
    names = [f"part.{i}.parquet" for i in (10, 2, 0, 1)]
    _write_parts(folder, {name: _table([name], ["x"]) for name in names})
    info = inspect_manifest(Storage(), str(folder))
    assert [j.id for j in iter_jobs(Storage(), info)] == [
        "part.0.parquet", "part.1.parquet", "part.2.parquet", "part.10.parquet"
    ]  # fmt: skip


def test_a_glob_is_one_manifest(tmp_path):
    images = _images(tmp_path, 6)
    folder = _spark_folder(tmp_path, images)
    pq.write_table(_table(["other"], ["x"]), folder / "other.parquet")
    pattern = str(folder / "part-*.parquet")
    info = inspect_manifest(Storage(), pattern)
    assert [j.id for j in iter_jobs(Storage(), info)] == ["a", "b", "c", "d", "e", "f"]
    ran = runner.invoke(app, ["validate", pattern])
    text = " ".join(ran.output.split())
    assert ran.exit_code == 1 and "1099511627776" in text, text
    with pytest.raises(ManifestError, match="no Parquet file matches"):
        inspect_manifest(Storage(), str(folder / "nothing-*.parquet"))


def test_incompatible_parts_are_refused_naming_the_file(tmp_path):
    folder = tmp_path / "jobs"
    _write_parts(
        folder,
        {
            "part-0.parquet": _table(["a"], ["x"], iterations=pa.array([5], pa.int64())),
            "part-1.parquet": _table(["b"], ["y"], iterations=pa.array(["five"])),
            "part-2.parquet": pa.table({"id": ["c"], "task": ["denoise"]}),
            "part-3.parquet": _table(["d"], ["z"]),
        },
    )
    (folder / "part-4.parquet").write_bytes(b"id,task,image\n")
    with pytest.raises(ManifestError) as caught:
        inspect_manifest(Storage(), str(folder))
    problems = caught.value.problems
    assert len(problems) == 3, problems
    assert problems[0] == (
        f"file {folder}/part-1.parquet: column 'iterations' has type string, expected int32"
    )
    assert problems[1] == f"file {folder}/part-2.parquet: missing required column 'image'"
    assert problems[2].startswith(f"file {folder}/part-4.parquet: not a Parquet file")
    ran = runner.invoke(app, ["validate", str(folder)])
    assert ran.exit_code == 1 and "part-1.parquet" in " ".join(ran.output.split())


def test_an_empty_folder_and_a_missing_path_are_manifest_problems(tmp_path):
    folder = tmp_path / "jobs"
    folder.mkdir()
    (folder / "_SUCCESS").write_bytes(b"")
    with pytest.raises(ManifestError, match="a folder without Parquet files"):
        inspect_manifest(Storage(), str(folder))
    with pytest.raises(ManifestError, match="file not found"):
        inspect_manifest(Storage(), str(tmp_path / "absent"))


def test_a_memory_folder_and_glob(tmp_path):
    root = f"memory://jobs-{uuid.uuid4().hex[:8]}"
    storage = Storage()
    try:
        storage.write_parquet(f"{root}/part-1.parquet", _table(["b"], ["y"]))
        storage.write_parquet(f"{root}/part-0.parquet", _table(["a"], ["x"]))
        storage.write_bytes(f"{root}/_SUCCESS", b"")
        for uri in (root, root + "/", f"{root}/part-*.parquet"):
            info = inspect_manifest(storage, uri)
            assert [(j.id, j.row) for j in iter_jobs(storage, info)] == [("a", 0), ("b", 1)], uri
            assert read_ids(storage, info).to_pylist() == ["a", "b"]
    finally:
        fs = fsspec.filesystem("memory")
        fs.rm(root.split("://", 1)[1], recursive=True)


@pytest.mark.s3
def test_an_s3_folder_and_glob(s3_bucket):
    storage = Storage(StorageOptions.from_env())
    storage.write_parquet(f"{s3_bucket}/jobs/part-00001.parquet", _table(["c"], ["z"]))
    storage.write_parquet(f"{s3_bucket}/jobs/part-00000.parquet", _table(["a", "b"], ["x", "y"]))
    storage.write_bytes(f"{s3_bucket}/jobs/_SUCCESS", b"")
    storage.write_bytes(f"{s3_bucket}/jobs/.part-00000.parquet.crc", b"crc!")
    for uri in (f"{s3_bucket}/jobs/", f"{s3_bucket}/jobs/part-*.parquet"):
        info = inspect_manifest(storage, uri)
        assert [p.uri for p in info.parts] == [
            f"{s3_bucket}/jobs/part-00000.parquet",
            f"{s3_bucket}/jobs/part-00001.parquet",
        ], uri
        assert [(j.id, j.row) for j in iter_jobs(storage, info)] == [("a", 0), ("b", 1), ("c", 2)]


@pytest.mark.ray
def test_dippipe_run_and_report_take_a_folder(tmp_path, ray_local):
    """The whole path on a Spark-style folder: every job runs once (the bad row fails with its
    problem), a rerun finds nothing to do, and the report finds the jobs' inputs."""
    from pipeline.outputs import read_results

    images = _images(tmp_path, 6)
    folder = _spark_folder(tmp_path, images)
    out = tmp_path / "out"
    args = ["run", str(folder), "--out", str(out), "--gpus", "1", "--no-progress",
            "--fake-fit-seconds", "0"]  # fmt: skip
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 1, first.output  # the row with 2**40 iterations failed
    rows = {row["id"]: row for row in read_results(Storage(), str(out)).to_pylist()}
    assert sorted(rows) == list("abcdef")
    assert rows["d"]["status"] == "failed" and "1099511627776" in rows["d"]["error"]
    assert all(rows[i]["status"] == "ok" for i in "abcef")
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 1 and len(read_results(Storage(), str(out))) == 6
    reported = CliRunner().invoke(app, ["report", str(out)])
    assert reported.exit_code == 0, reported.output
    html = (out / "report.html").read_text()
    assert "inputs are not shown" not in html and "manifest unavailable" not in html
