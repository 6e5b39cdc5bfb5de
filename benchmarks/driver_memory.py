"""Driver memory for a large manifest: what `dippipe run` holds before and while scheduling.

Builds a manifest of N rows (default one million) and, in this process, measures the peak
resident memory of the driver's own steps: inspecting the manifest (schema, id checks),
reading earlier results for resume, and streaming every pending job. A second pass puts
N ``ok`` result rows under OUT first, as a rerun of a finished run sees. No Ray, no fits:
those run in the workers, not in the driver.

    python -m benchmarks.driver_memory --rows 1000000
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.manifest import MANIFEST_SCHEMA, inspect_manifest
from pipeline.outputs import RESULT_SCHEMA
from pipeline.runner import RunConfig, _prepare_out, pending_jobs
from pipeline.spec import spec_fingerprints
from pipeline.storage import Storage
from pipeline.summary import RunSummary
from pipeline.worker import WorkerConfig


def memory_mib(field: str) -> float:
    """VmRSS (now) or VmHWM (peak) of this process, from /proc."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_manifest(path: Path, rows: int) -> None:
    ids = [f"photo-{i:08d}" for i in range(rows)]
    table = pa.table(
        {
            "id": ids,
            "task": ["denoise"] * rows,
            "image": [f"s3://archive/scans/{i}.png" for i in ids],
            "iterations": pa.array([1800] * rows, pa.int32()),
        }
    )
    schema = pa.schema([MANIFEST_SCHEMA.field(name) for name in table.column_names])
    pq.write_table(table.cast(schema), path)


def write_ok_results(out: Path, manifest: Path) -> None:
    rows = pq.read_table(manifest)
    ids = rows.column("id")
    n = len(ids)
    columns = {f.name: pa.nulls(n, f.type) for f in RESULT_SCHEMA}
    columns["id"], columns["status"] = ids, pa.array(["ok"] * n)
    columns["spec"] = spec_fingerprints(rows, None)  # as the run recorded them: none changed
    (out / "results").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns, schema=RESULT_SCHEMA), out / "results" / "part-0.parquet")


def measure(storage: Storage, manifest: Path, out: Path) -> tuple[int, float, float]:
    """(jobs streamed, seconds, peak MiB) for one driver pass."""
    started = time.perf_counter()
    info = inspect_manifest(storage, str(manifest))
    summary = RunSummary(manifest_rows=info.num_rows)
    config = RunConfig(str(manifest), WorkerConfig(str(out)))
    resume = _prepare_out(storage, config, info, summary)
    # As the run streams them: jobs made for the pending rows, finished ones spec-checked.
    jobs = sum(1 for _ in pending_jobs(storage, info, resume.finished, None, resume.recorded,
                                       summary))  # fmt: skip
    return jobs, time.perf_counter() - started, memory_mib("VmHWM")


def measure_in_child(manifest: Path, out: Path) -> str:
    """A fresh process, so the peak is the driver's alone (not this script's set-up)."""
    command = [
        sys.executable,
        "-m",
        "benchmarks.driver_memory",
        "--measure",
        str(manifest),
        str(out),
    ]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"measurement failed:\n{done.stderr[-2000:]}")
    return done.stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--measure", nargs=2, metavar=("MANIFEST", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        start = memory_mib("VmRSS")
        jobs, seconds, peak = measure(Storage(), Path(args.measure[0]), Path(args.measure[1]))
        print(f"{jobs:,} pending jobs streamed in {seconds:.1f} s; peak {peak:.0f} MiB, "
              f"{peak - start:+.0f} MiB over {start:.0f} MiB resident after imports")  # fmt: skip
        return
    with tempfile.TemporaryDirectory() as tmp:
        manifest, out = Path(tmp) / "manifest.parquet", Path(tmp) / "out"
        write_manifest(manifest, args.rows)
        print(f"manifest: {args.rows:,} rows, {manifest.stat().st_size / 2**20:.1f} MiB on disk")
        print("fresh run:", measure_in_child(manifest, out))
        write_ok_results(out, manifest)
        print(f"rerun over {args.rows:,} ok results:", measure_in_child(manifest, out))


if __name__ == "__main__":
    main()
