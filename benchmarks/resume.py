"""Resume over what a long run really leaves: many small results and traces shards.

Writes an OUT as the pipeline's ShardWriter leaves it after JOBS finished jobs flushed a few
rows at a time: SHARDS results shards of JOBS / SHARDS full RESULT_SCHEMA rows (2% failed),
each with its traces shard (STEPS trace rows a job: a real fit records every step, 1,800 or
more; fewer keep this benchmark's disk use modest, and the results, which resume reads, are
the same). The manifest holds those jobs and PENDING new ones after them.

Then, in this process, it times:
- reading every results shard's ids, one after the other (the old read_prior) and in
  parallel (shards.parallel_map, READ_WORKERS threads): the ratio;
- the first resume: runner._prepare_out (orphan sweep, compaction up to its budget, reading
  earlier results) plus the first pending job of pending_jobs: time to first job;
- compacting the rest (what the run's writer does, RUN_BUDGET at a time), here at once;
- the second resume, over the compacted OUT.

Locally (a temporary folder) and, with --s3, against a moto S3 server on 127.0.0.1 that it
starts (--s3-jobs / --s3-shards scale that part: moto takes uploads slowly).

    python -m benchmarks.resume --jobs 1000000 --shards 10000 --s3 --s3-shards 2000
"""

from __future__ import annotations

import argparse
import io
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.compaction import compact
from pipeline.manifest import MANIFEST_SCHEMA, inspect_manifest
from pipeline.outputs import KIND_JOB, RESULT_SCHEMA, TRACE_SCHEMA, read_prior
from pipeline.runner import RunConfig, _prepare_out, pending_jobs
from pipeline.shards import parallel_map, workers_for
from pipeline.storage import Storage, StorageOptions, join
from pipeline.summary import RunSummary
from pipeline.worker import WorkerConfig


def job_id(i: int) -> str:
    return f"photo-{i:08d}"


def manifest_bytes(jobs: int, pending: int) -> bytes:
    ids = [job_id(i) for i in range(jobs + pending)]
    table = pa.table(
        {
            "id": ids,
            "task": ["denoise"] * len(ids),
            "image": [f"s3://archive/scans/{i}.png" for i in ids],
            "iterations": pa.array([1800] * len(ids), pa.int32()),
        }
    )
    schema = pa.schema([MANIFEST_SCHEMA.field(name) for name in table.column_names])
    buffer = io.BytesIO()
    pq.write_table(table.cast(schema), buffer)
    return buffer.getvalue()


def shard_tables(first: int, rows: int, steps: int, rng) -> tuple[pa.Table, pa.Table]:
    """Results and traces of jobs first .. first + rows - 1, as the writer writes them."""
    ids = [job_id(first + k) for k in range(rows)]
    failed = rng.random(rows) < 0.02
    now = datetime(2026, 12, 1, tzinfo=timezone.utc) + timedelta(seconds=first)
    seconds = rng.uniform(60, 240, rows)
    results = {
        "id": ids,
        "task": ["denoise"] * rows,
        "status": np.where(failed, "failed", "ok").tolist(),
        "error": [
            f"image not found: s3://archive/scans/{i}.png" if f else None
            for i, f in zip(ids, failed, strict=True)
        ],
        "output": [None if f else f"{i}.png" for i, f in zip(ids, failed, strict=True)],
        "iterations": np.where(failed, 0, 1800).astype(np.int32),
        "energy": rng.uniform(1e-3, 1e-2, rows),
        "psnr": rng.uniform(24, 36, rows),
        "seconds": seconds,
        "seed": rng.integers(0, 2**31, rows),
        "device": ["cuda:0"] * rows,
        "attempts": np.ones(rows, np.int32),
        "stopped_at": rng.integers(900, 1800, rows).astype(np.int32),
        "stop_reason": ["auto"] * rows,
        "worker": [f"worker-{k % 64}" for k in range(rows)],
        "node": [f"10.0.{k % 8}.{k % 200}" for k in range(rows)],
        "finished_at": [now + timedelta(seconds=float(s)) for s in np.cumsum(seconds)],
        "notes": [None] * rows,
        "tiles": np.ones(rows, np.int32),
        "peak_rss": rng.integers(2 << 30, 6 << 30, rows),
        "error_kind": [KIND_JOB if f else None for f in failed],
        "run_id": ["20261201T000000-abcdef"] * rows,
        "spec": [f"{rng.integers(0, 2**63):016x}" for _ in range(rows)],
    }
    ok_ids = [i for i, f in zip(ids, failed, strict=True) if not f]
    n = len(ok_ids) * steps
    traces = {
        "id": np.repeat(ok_ids, steps).tolist(),
        "step": np.tile(np.arange(steps, dtype=np.int32), len(ok_ids)),
        "energy": rng.uniform(1e-3, 1e-1, n),
        "psnr": rng.uniform(10, 36, n),
        "stop_stat": rng.uniform(0, 1e-4, n),
    }
    return (
        pa.table(results, schema=RESULT_SCHEMA),
        pa.table(traces, schema=TRACE_SCHEMA),
    )


def write_out(storage: Storage, out: str, jobs: int, shards: int, steps: int) -> None:
    rows = jobs // shards

    def write(index: int) -> None:
        results, traces = shard_tables(index * rows, rows, steps, np.random.default_rng(index))
        name = f"part-20261201T000000-abcdef-{index:05d}.parquet"
        storage.write_parquet(join(out, "traces", name), traces)
        storage.write_parquet(join(out, "results", name), results)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(write, range(shards)))


def counts(storage: Storage, out: str) -> str:
    results = len(storage.list_files(join(out, "results")))
    traces = len(storage.list_files(join(out, "traces")))
    return f"{results:,} results + {traces:,} traces shards"


def read_ids(storage: Storage, uris: list[str], workers: int) -> int:
    tables = parallel_map(lambda u: storage.read_parquet(u, ["id", "status"]), uris, workers)
    return sum(t.num_rows for t in tables)


def resume(storage: Storage, manifest: str, out: str) -> tuple[float, float, str]:
    """(seconds to inspect the manifest, seconds of _prepare_out + the first pending job,
    that job's id)."""
    started = time.perf_counter()
    info = inspect_manifest(storage, manifest)
    inspected = time.perf_counter()
    summary = RunSummary(manifest_rows=info.num_rows)
    finished = _prepare_out(storage, RunConfig(manifest, WorkerConfig(out)), info, summary).finished
    first = next(pending_jobs(storage, info, finished))
    return inspected - started, time.perf_counter() - inspected, first.id


def bench(storage: Storage, base: str, jobs: int, shards: int, steps: int, pending: int) -> None:
    manifest, out = join(base, "manifest.parquet"), join(base, "out")
    started = time.perf_counter()
    storage.write_bytes(manifest, manifest_bytes(jobs, pending))
    write_out(storage, out, jobs, shards, steps)
    print(f"  wrote {jobs:,} jobs in {counts(storage, out)} ({jobs // shards} jobs, "
          f"{steps} trace rows a job) in {time.perf_counter() - started:.1f} s")  # fmt: skip
    uris = storage.list_files(join(out, "results"))
    threads = workers_for(out)
    for label, workers in (("serial", 1), (f"parallel ({threads} threads)", threads)):
        began = time.perf_counter()
        rows = read_ids(storage, uris, workers)
        took = time.perf_counter() - began
        print(f"  read id+status of {len(uris):,} shards, {label}: {took:.2f} s ({rows:,} rows)")
        if workers == 1:
            serial = took
    print(f"  parallel / serial speed-up: {serial / took:.1f}x")
    began = time.perf_counter()
    prior = read_prior(storage, out)
    print(f"  read_prior as resume runs it (parallel, one GET a shard): "
          f"{time.perf_counter() - began:.2f} s ({len(prior.ok):,} ok ids)")  # fmt: skip
    inspect_s, ready_s, first = resume(storage, manifest, out)
    print(f"  first resume (compacts up to RESUME_BUDGET): {ready_s:.2f} s to the first "
          f"pending job ({first}); manifest checks before it {inspect_s:.2f} s; "
          f"now {counts(storage, out)}")  # fmt: skip
    began = time.perf_counter()
    done = compact(storage, out, "bench")
    print(f"  the rest, as the run's writer compacts it (here at once): {done.sources:,} "
          f"shards, {done.bytes / 2**20:.0f} MiB in {time.perf_counter() - began:.1f} s; "
          f"now {counts(storage, out)}")  # fmt: skip
    inspect_s, ready_s, first = resume(storage, manifest, out)
    print(f"  second resume: {ready_s:.2f} s to the first pending job ({first}); manifest "
          f"checks before it {inspect_s:.2f} s")  # fmt: skip


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def moto_server():
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update(
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing-secret-value",
        AWS_REGION="us-east-1",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_ENDPOINT_URL=endpoint,
    )
    try:
        for _ in range(150):  # up to 30 s for the server to answer
            try:
                urllib.request.urlopen(endpoint, timeout=1).close()
                break
            except OSError:
                time.sleep(0.2)
        yield endpoint
    finally:
        server.terminate()
        server.wait(timeout=10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=1_000_000, help="finished jobs")
    parser.add_argument("--shards", type=int, default=10_000, help="their results shards")
    parser.add_argument("--steps", type=int, default=20, help="trace rows per ok job")
    parser.add_argument("--pending", type=int, default=1000, help="new jobs in the manifest")
    parser.add_argument("--s3", action="store_true", help="also on a loopback moto server")
    parser.add_argument("--s3-jobs", type=int, default=None, help="default: --jobs")
    parser.add_argument("--s3-shards", type=int, default=None, help="default: --shards")
    args = parser.parse_args()
    print(f"local disk ({os.cpu_count()} CPUs):")
    with tempfile.TemporaryDirectory() as tmp:
        bench(Storage(), tmp, args.jobs, args.shards, args.steps, args.pending)
    if args.s3:
        import boto3

        jobs, shards = args.s3_jobs or args.jobs, args.s3_shards or args.shards
        with moto_server() as endpoint:
            boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bench")
            print(f"S3 (moto on {endpoint}):")
            bench(Storage(StorageOptions.from_env()), "s3://bench/run", jobs, shards,
                  args.steps, args.pending)  # fmt: skip


if __name__ == "__main__":
    main()
