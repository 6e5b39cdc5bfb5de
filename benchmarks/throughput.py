"""The pipeline's own overhead: scaling over N workers with jobs of a known, fixed cost.

Each job runs the real path (manifest streaming, dispatch, input read + decode in the worker,
PNG encode + atomic write, result and trace shards on the driver) except the fit, which is
replaced by a sleep of exactly T seconds (the runner's benchmark-only ``fake_fit_seconds``).
N logical GPUs are declared to a local Ray, so one machine measures the scheduling of N GPU
workers. Reported per N:

- throughput (jobs/s) over the busy period (first job handed out -> last result written);
- scaling efficiency = throughput / (N x single-worker throughput);
- per-job overhead = N x busy / jobs - T: the time a worker spends per job beyond its fit,
  as a share of T (goal: < 2 % of a 30 s job; >= 95 % efficiency at 8 workers).

    python -m benchmarks.throughput --job-seconds 2 --jobs-per-worker 4 --workers 1,2,4,8
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import pyarrow as pa
import ray
from rich.console import Console
from rich.table import Table

from pipeline.images import encode_png
from pipeline.manifest import MANIFEST_SCHEMA
from pipeline.runner import RunConfig, run
from pipeline.storage import Storage
from pipeline.worker import WorkerConfig


def make_manifest(folder: Path, jobs: int, size: int) -> str:
    """`jobs` denoise rows over one small PNG (input reads still happen per job)."""
    import numpy as np

    image = folder / "input.png"
    pixels = np.random.default_rng(0).random((3, size, size), dtype=np.float32)
    Storage().write_bytes(str(image), encode_png(pixels))
    rows = [{"id": f"job-{i:05d}", "task": "denoise", "image": str(image)} for i in range(jobs)]
    manifest = folder / f"manifest-{jobs}.parquet"
    Storage().write_parquet(str(manifest), pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA))
    return str(manifest)


def measure(workers: int, job_seconds: float, jobs_per_worker: int, size: int, root: Path):
    jobs = workers * jobs_per_worker
    folder = Path(tempfile.mkdtemp(dir=root))
    config = RunConfig(
        manifest=make_manifest(folder, jobs, size),
        worker=WorkerConfig(str(folder / "out"), fake_fit_seconds=job_seconds),
        gpus=workers,
        cpus_per_worker=0.25,
        show_progress=False,
    )
    summary = run(config, Console(quiet=True))
    assert summary.ok == jobs, f"{summary.failed} jobs failed"
    busy = summary.busy_seconds
    per_job = workers * busy / jobs
    return {
        "workers": workers,
        "jobs": jobs,
        "job_seconds": job_seconds,
        "busy_seconds": busy,
        "throughput_jobs_per_s": jobs / busy,
        "per_job_overhead_s": per_job - job_seconds,
        "overhead_share": (per_job - job_seconds) / job_seconds,
    }


def table(rows: list[dict]) -> Table:
    base = rows[0]["throughput_jobs_per_s"] / rows[0]["workers"]
    out = Table(title="pipeline overhead (fixed-cost jobs, logical GPUs)")
    for name in ("N", "jobs", "T (s)", "busy (s)", "jobs/s", "N x 1-worker", "efficiency",
                 "overhead/job (ms)", "overhead share"):  # fmt: skip
        out.add_column(name, justify="right")
    for row in rows:
        ideal = base * row["workers"]
        row["scaling_efficiency"] = row["throughput_jobs_per_s"] / ideal
        out.add_row(
            str(row["workers"]),
            str(row["jobs"]),
            f"{row['job_seconds']:.1f}",
            f"{row['busy_seconds']:.2f}",
            f"{row['throughput_jobs_per_s']:.3f}",
            f"{ideal:.3f}",
            f"{100 * row['scaling_efficiency']:.1f} %",
            f"{1000 * row['per_job_overhead_s']:.0f}",
            f"{100 * row['overhead_share']:.2f} %",
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--job-seconds", type=float, default=2.0)
    parser.add_argument("--jobs-per-worker", type=int, default=4)
    parser.add_argument("--workers", default="1,2,4,8")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--json", default="bench-out/throughput.json")
    args = parser.parse_args()
    counts = [int(n) for n in args.workers.split(",")]
    root = Path(tempfile.mkdtemp(prefix="dpb-"))
    temp_dir = tempfile.mkdtemp(prefix="dpr-", dir="/tmp")
    ray.init(
        address="local",
        num_cpus=max(counts),
        num_gpus=max(counts),
        _temp_dir=temp_dir,
        include_dashboard=False,
        logging_level="WARNING",
    )
    try:
        rows = [
            measure(n, args.job_seconds, args.jobs_per_worker, args.image_size, root)
            for n in counts
        ]
    finally:
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)
        shutil.rmtree(root, ignore_errors=True)
    Console().print(table(rows))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(rows, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
