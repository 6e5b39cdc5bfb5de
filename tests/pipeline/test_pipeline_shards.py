"""Results / traces shards that stay few: the flush bounds, compaction, readers that ignore
replaced shards, parallel reads, and infrastructure failures that a plain rerun retries."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import compaction, shards
from pipeline.compaction import compact
from pipeline.manifest import inspect_manifest
from pipeline.outputs import (
    KIND_INFRA,
    KIND_JOB,
    RESULT_SCHEMA,
    JobOutcome,
    ShardWriter,
    drop_failed_rows,
    drop_rows,
    read_columns,
    read_prior,
    read_results,
    read_traces,
    result_shards,
)
from pipeline.report.scan import iter_results
from pipeline.runner import RunConfig, _prepare_out
from pipeline.shards import REPLACES_KEY, parallel_map
from pipeline.storage import Storage, join
from pipeline.summary import RunSummary
from pipeline.worker import WorkerConfig
from tests.support.builders import write_manifest


def outcome(job_id: str, status: str = "ok", kind: str | None = None, steps: int = 3):
    row = {"id": job_id, "task": "denoise", "status": status, "attempts": 1, "error_kind": kind}
    row["error"] = None if status == "ok" else "boom"
    trace = {"step": list(range(steps)), "energy": [0.5] * steps, "psnr": [None] * steps}
    return JobOutcome(row, trace)


def write_shards(out: str, shards: int, per_shard: int, prefix: str = "j") -> list[str]:
    """`shards` small shards of `per_shard` ok jobs (3 trace rows each); returns the ids."""
    writer = ShardWriter(Storage(), out, flush_rows=per_shard, compact_every=0)
    ids = [f"{prefix}{i:04d}" for i in range(shards * per_shard)]
    for job_id in ids:
        writer.add(outcome(job_id))
    writer.flush()
    return ids


def names(out: str, folder: str) -> list[str]:
    return sorted(u.rsplit("/", 1)[-1] for u in Storage().list_files(join(out, folder)))


def assert_each_once(out: str, ids: list[str], steps: int = 3) -> None:
    """Every reader sees each result row, and each trace row, exactly once."""
    storage = Storage()
    assert sorted(read_results(storage, out).column("id").to_pylist()) == sorted(ids)
    scanned = [i for t in iter_results(storage, out) for i in t.column("id").to_pylist()]
    assert sorted(scanned) == sorted(ids)
    assert sorted(read_prior(storage, out).ok.to_pylist()) == sorted(ids)
    traces = read_traces(storage, out)
    pairs = sorted(zip(*traces.select(["id", "step"]).to_pydict().values(), strict=True))
    assert pairs == sorted((i, s) for i in ids for s in range(steps))


# ---- flush policy ---------------------------------------------------------------------------


def test_the_writer_flushes_at_the_byte_bound_before_the_row_bound(tmp_path):
    out = str(tmp_path / "out")
    writer = ShardWriter(Storage(), out, flush_rows=10_000, flush_seconds=1e9, flush_bytes=50_000)
    for i in range(3):  # 1,000 steps: ~25 KB of Arrow trace data each
        writer.add(outcome(f"a{i}", steps=1000))
    assert len(names(out, "results")) == 1  # the second job crossed 50 KB
    assert len(pq.read_table(join(out, "results", names(out, "results")[0]))) == 2
    writer.flush()
    assert_each_once(out, ["a0", "a1", "a2"], steps=1000)


def test_default_flush_bounds_make_few_shards():
    from pipeline.outputs import FLUSH_BYTES, FLUSH_ROWS, FLUSH_SECONDS

    assert FLUSH_ROWS >= 1000 and FLUSH_BYTES >= 32 << 20 and FLUSH_SECONDS >= 60


# ---- compaction -----------------------------------------------------------------------------


def test_compaction_merges_small_shards_and_keeps_every_row(tmp_path):
    out = str(tmp_path / "out")
    ids = write_shards(out, shards=6, per_shard=5)
    before = read_results(Storage(), out).sort_by("id")
    done = compact(Storage(), out, "t1")
    assert (done.groups, done.sources, done.rows) == (1, 6, 30)
    assert names(out, "results") == names(out, "traces") == ["compact-t1-00000.parquet"]
    assert read_results(Storage(), out).sort_by("id").equals(before)
    assert_each_once(out, ids)
    meta = pq.read_schema(join(out, "results", "compact-t1-00000.parquet")).metadata
    assert len(json.loads(meta[REPLACES_KEY])) == 6
    assert compact(Storage(), out, "t2").groups == 0  # one shard alone: nothing to gain


def test_groups_are_bounded_and_large_shards_are_left_alone(tmp_path, monkeypatch):
    out = str(tmp_path / "out")
    ids = write_shards(out, shards=7, per_shard=2)
    monkeypatch.setattr(compaction, "GROUP_SHARDS", 3)
    done = compact(Storage(), out, "g")
    assert (done.groups, done.sources) == (2, 6)  # 3 + 3, the seventh alone is left
    assert len(names(out, "results")) == 3
    assert_each_once(out, ids)
    monkeypatch.setattr(compaction, "SMALL_BYTES", 1)  # now every shard counts as large
    assert compact(Storage(), out, "h").groups == 0


def test_the_budget_leaves_the_rest_for_later(tmp_path):
    out = str(tmp_path / "out")
    ids = write_shards(out, shards=8, per_shard=2)
    sizes = [(tmp_path / "out" / f / n).stat().st_size
             for f in ("results", "traces") for n in names(out, f)]  # fmt: skip
    done = compact(Storage(), out, "b", budget=sum(sizes) // 2)  # about 4 shards' worth
    assert done.groups == 1 and 2 <= done.sources <= 4 and done.left >= 8 - 4 - 1  # (1 alone)
    assert done.bytes <= sum(sizes) // 2
    assert_each_once(out, ids)
    assert compact(Storage(), out, "c", budget=1).groups == 0  # no group fits in 1 byte


def test_shards_of_older_versions_are_compacted_with_nulls(tmp_path):
    out = str(tmp_path / "out")
    ids = write_shards(out, shards=2, per_shard=2)
    old = pa.table({"id": ["old"], "task": ["denoise"], "status": ["failed"], "error": ["x"]})
    pq.write_table(old, join(out, "results", "part-old-00000.parquet"))
    no_trace = pa.table({"id": pa.array([], pa.string())})
    pq.write_table(no_trace, join(out, "traces", "part-old-00000.parquet"))
    compact(Storage(), out, "o")
    rows = {r["id"]: r for r in read_results(Storage(), out).to_pylist()}
    assert set(rows) == {*ids, "old"} and rows["old"]["error_kind"] is None
    assert read_results(Storage(), out).schema.names == RESULT_SCHEMA.names


def test_readers_ignore_sources_a_crash_left_and_resume_deletes_them(tmp_path):
    out = str(tmp_path / "out")
    ids = write_shards(out, shards=4, per_shard=3)
    saved = {f: {n: (tmp_path / "out" / f / n).read_bytes() for n in names(out, f)}
             for f in ("results", "traces")}  # fmt: skip
    compact(Storage(), out, "c")
    for folder, files in saved.items():  # as if killed before deleting the sources
        for name, data in files.items():
            (tmp_path / "out" / folder / name).write_bytes(data)
    assert len(names(out, "results")) == 5
    assert len(result_shards(Storage(), out)) == 1
    assert_each_once(out, ids)
    assert compaction.remove_replaced(Storage(), out) == 8
    assert names(out, "results") == names(out, "traces") == ["compact-c-00000.parquet"]
    assert_each_once(out, ids)


def test_dropping_failed_rows_of_a_compacted_shard_keeps_what_it_replaces(tmp_path):
    out = str(tmp_path / "out")
    writer = ShardWriter(Storage(), out, flush_rows=2, compact_every=0)
    for job_id, status in [("a", "ok"), ("b", "failed"), ("c", "ok"), ("d", "failed")]:
        writer.add(outcome(job_id, status))
    source = tmp_path / "out" / "results" / names(out, "results")[0]  # holds a, b
    data = source.read_bytes()
    compact(Storage(), out, "d")
    source.write_bytes(data)  # left by a crash
    uri = join(out, "results", "compact-d-00000.parquet")
    assert drop_failed_rows(Storage(), out, ["b", "c"]) == 1
    assert REPLACES_KEY in pq.read_schema(uri).metadata  # without it, the source would count
    assert sorted(read_results(Storage(), out).column("id").to_pylist()) == ["a", "c", "d"]


def test_the_writer_compacts_as_it_goes(tmp_path):
    out = str(tmp_path / "out")
    writer = ShardWriter(Storage(), out, flush_rows=2, compact_every=3)
    ids = [f"w{i}" for i in range(12)]
    for job_id in ids:
        writer.add(outcome(job_id))
    writer.flush()
    # 6 flushes: compacted after the 3rd (3 -> 1) and after the 6th (1 + 3 -> 1)
    assert names(out, "results") == [f"compact-{writer.run_tag}-0002-00000.parquet"]
    assert_each_once(out, ids)


def test_a_failed_compaction_does_not_stop_the_writer(tmp_path, monkeypatch):
    out = str(tmp_path / "out")

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(compaction, "compact", broken)
    writer = ShardWriter(Storage(), out, flush_rows=1, compact_every=1)
    for job_id in ("x", "y"):
        writer.add(outcome(job_id))
    assert writer.broken is None and len(names(out, "results")) == 2


def test_dropped_rows_lose_their_traces_and_a_rerun_has_one_of_each(tmp_path):
    out = str(tmp_path / "out")
    ids = write_shards(out, shards=3, per_shard=2)
    assert drop_rows(Storage(), out, ["j0000", "j0003"]) == 2
    kept = [i for i in ids if i not in ("j0000", "j0003")]
    assert_each_once(out, kept)
    writer = ShardWriter(Storage(), out, compact_every=0)
    writer.add(outcome("j0000"))  # run again
    writer.flush()
    assert_each_once(out, [*kept, "j0000"])
    compact(Storage(), out, "r")
    assert_each_once(out, [*kept, "j0000"])
    assert read_columns(Storage(), out, ["id", "spec"]).column_names == ["id", "spec"]


# ---- parallel reads -------------------------------------------------------------------------


def test_parallel_map_keeps_order_bounds_what_is_in_flight_and_raises(monkeypatch):
    submitted = []

    class Counting(shards.ThreadPoolExecutor):
        def submit(self, fn, /, *args, **kwargs):
            submitted.append(args)
            return super().submit(fn, *args, **kwargs)

    monkeypatch.setattr(shards, "ThreadPoolExecutor", Counting)
    results = parallel_map(lambda n: n * n, range(100), workers=4)
    assert [next(results) for _ in range(3)] == [0, 1, 4]
    assert len(submitted) <= 3 + 2 * 4  # not the 100 at once: results are streamed
    assert list(results) == [n * n for n in range(3, 100)]

    def fail(n: int) -> int:
        if n == 7:
            raise ValueError("shard 7 is corrupt")
        return n

    with pytest.raises(ValueError, match="shard 7"):
        list(parallel_map(fail, range(20), workers=4))


# ---- infrastructure failures: retried by a plain rerun -------------------------------------


def _prepare(tmp_path, out: str, ids: list[str], retry_failed: bool = False):
    rows = [{"id": i, "task": "denoise", "image": "x.png"} for i in ids]
    manifest = write_manifest(tmp_path / "m.parquet", rows)
    storage = Storage()
    info = inspect_manifest(storage, manifest)
    summary = RunSummary(manifest_rows=info.num_rows)
    config = RunConfig(manifest, WorkerConfig(out), retry_failed=retry_failed)
    finished = _prepare_out(storage, config, info, summary).finished
    return dict(zip(ids, finished.to_pylist(), strict=True)), summary


def test_infrastructure_failures_are_pending_again_without_the_flag(tmp_path):
    out = str(tmp_path / "out")
    writer = ShardWriter(Storage(), out, compact_every=0)
    writer.add(outcome("ok", "ok"))
    writer.add(outcome("infra", "failed", KIND_INFRA, steps=0))
    writer.add(outcome("bad", "failed", KIND_JOB, steps=0))
    writer.add(outcome("both", "failed", KIND_INFRA, steps=0))
    writer.add(outcome("both", "failed", KIND_JOB, steps=0))  # one final failure: final
    writer.flush()
    old = pa.table({"id": ["older"], "status": ["failed"], "error": ["x"]})  # no error_kind
    pq.write_table(old, join(out, "results", "part-old-00000.parquet"))
    prior = read_prior(Storage(), out)
    assert prior.retryable.to_pylist() == ["infra"]

    ids = ["ok", "infra", "bad", "both", "older", "new"]
    finished, summary = _prepare(tmp_path, out, ids)
    assert finished == {"ok": True, "infra": False, "bad": True, "both": True, "older": True,
                        "new": False}  # fmt: skip
    assert (summary.skipped_ok, summary.skipped_failed, summary.pending) == (1, 3, 2)
    assert "infra" not in read_results(Storage(), out).column("id").to_pylist()  # row dropped


def test_retry_failed_still_retries_every_failure(tmp_path):
    out = str(tmp_path / "out")
    writer = ShardWriter(Storage(), out, compact_every=0)
    writer.add(outcome("infra", "failed", KIND_INFRA, steps=0))
    writer.add(outcome("bad", "failed", KIND_JOB, steps=0))
    writer.flush()
    finished, summary = _prepare(tmp_path, out, ["infra", "bad"], retry_failed=True)
    assert finished == {"infra": False, "bad": False}
    assert (summary.skipped_failed, summary.pending) == (0, 2)
    assert read_results(Storage(), out).num_rows == 0


def test_resume_compacts_small_shards(tmp_path):
    out = str(tmp_path / "out")
    ids = write_shards(out, shards=5, per_shard=2)
    finished, summary = _prepare(tmp_path, out, [*ids, "new"])
    assert summary.pending == 1 and not finished["new"]
    assert len(names(out, "results")) == 1 and names(out, "results")[0].startswith("compact-")
    assert_each_once(out, ids)
