"""Soak: many tiny jobs on N logical GPUs while faults are injected; nothing may be lost.

1,000 real (tiny) fits by default, each on its own 8 px image, on a local Ray that declares
4 logical GPUs (4 fitting workers). While the run goes on:

- worker kills: a thread SIGKILLs a random FitActor process of this run at random times
  (exponential gaps, mean ``--kill-every`` s); only processes below this one are touched;
- bad inputs: a share of the jobs (``--bad-share``) gets a truncated PNG, random bytes, a
  missing file, a decompression bomb, NaN params or an all-zero mask;
- systemic faults, injected in the workers by tests/support/worker_faults.py (a worker hook):
  one worker slot raises a CUDA error on every job, forever (``--cuda-worker``; its
  replacements keep its name: a bad node), another cannot read inputs, without credentials
  (``--no-credentials-worker``), and one good job stalls (no progress) the first time it
  runs (``--stall-job``), past ``--stall-seconds``.

Then it checks the outputs against the manifest and prints: jobs/s, faults injected, jobs
retried, infrastructure errors retried, jobs lost (must be 0), duplicate rows (must be 0),
jobs with an unexpected outcome (must be 0: every bad input failed with its own message as
a "job" error, no good job failed for the infrastructure, the stalled job ended ok), driver
peak memory; and reruns the command to check it has nothing left to do.

    python -m benchmarks.soak                      # 1,000 jobs, 4 logical GPUs
    python -m benchmarks.soak --jobs 200 --fake-fit-seconds 0.01
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import shutil
import signal
import struct
import tempfile
import threading
import time
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import ray
from rich.console import Console
from rich.table import Table

from pipeline.images import encode_png
from pipeline.manifest import MANIFEST_SCHEMA
from pipeline.outputs import KIND_DIED, KIND_JOB, read_results
from pipeline.runner import RunConfig, run
from pipeline.storage import Storage
from pipeline.worker import WORKER_HOOK, WorkerConfig
from tests.support import worker_faults as faults

REPOSITORY = Path(__file__).resolve().parents[1]

TINY = '{"channels": 4, "depth": 2, "input_depth": 4, "skip_channels": 2}'
# kind -> (row changes, substring of the expected error; None = must end ok)
KINDS = {
    "good": ({}, None),
    "truncated": ({"image": "truncated.png"}, "not a readable"),
    "garbage": ({"image": "garbage.png"}, "not a readable"),
    "missing": ({"image": "missing.png"}, "image not found"),
    "bomb": ({"image": "bomb.png"}, "more than the limit"),
    "nan-params": ({"params": '{"lr": NaN}'}, "lr must be a finite number"),
    "zero-mask": ({"task": "inpaint", "mask": "zeros.png"}, "mask has no known pixel"),
}


def make_inputs(folder: Path, jobs: int, bad_share: float, iterations: int, rng) -> dict:
    """Inputs and manifest; returns {id: kind}."""
    pixels = rng.random((3, 8, 8)).astype(np.float32)
    good = encode_png(pixels)
    (folder / "good.png").write_bytes(good)
    (folder / "truncated.png").write_bytes(good[: len(good) // 2])
    (folder / "garbage.png").write_bytes(rng.bytes(300))
    (folder / "zeros.png").write_bytes(encode_png(np.zeros((1, 8, 8), np.float32)))
    (folder / "bomb.png").write_bytes(_png_header(100_000, 100_000))
    bad_kinds = [k for k in KINDS if k != "good"]
    kinds, rows = {}, []
    for i in range(jobs):
        kind = str(rng.choice(bad_kinds)) if rng.random() < bad_share else "good"
        changes, _ = KINDS[kind]
        job_id = f"soak-{i:05d}"
        row = {"id": job_id, "task": "denoise", "image": "good.png", "iterations": iterations}
        row |= {"params": TINY, **changes}
        for column in ("image", "mask"):
            if row.get(column):
                row[column] = str(folder / row[column])
        kinds[job_id] = kind
        rows.append(row)
    table = pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA)
    Storage().write_parquet(str(folder / "manifest.parquet"), table)
    return kinds


def _png_header(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 1024)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    )


def _fit_actors() -> list[int]:
    """FitActor worker processes below this process (its own Ray), found through /proc."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat", "rb") as handle:
                    fields = handle.read().rsplit(b")", 1)[1].split()
                children.setdefault(int(fields[1]), []).append(int(name))
            except (OSError, IndexError):
                continue
    found, todo = [], [os.getpid()]
    while todo:
        for child in children.get(todo.pop(), []):
            todo.append(child)
            try:
                with open(f"/proc/{child}/cmdline", "rb") as handle:
                    if handle.read().startswith(b"ray::FitActor"):
                        found.append(child)
            except OSError:
                continue
    return found


class Killer(threading.Thread):
    """SIGKILLs a random FitActor of this run every ~mean_gap seconds (exponential gaps),
    sparing the one with the stalled job (its pid in ``stall_marker``): the stall check
    must be what stops it."""

    def __init__(self, mean_gap: float, max_kills: int, seed: int, stall_marker: Path) -> None:
        super().__init__(daemon=True)
        self.stall_marker = stall_marker
        self.mean_gap, self.max_kills = mean_gap, max_kills
        self.random = random.Random(seed)
        self.stop, self.kills = threading.Event(), 0

    def _stalled(self) -> int | None:
        try:
            return int(self.stall_marker.read_text())
        except (OSError, ValueError):
            return None

    def run(self) -> None:
        while self.kills < self.max_kills and not self.stop.wait(
            self.random.expovariate(1 / self.mean_gap)
        ):
            actors = [pid for pid in _fit_actors() if pid != self._stalled()]
            if actors:
                try:
                    os.kill(self.random.choice(actors), signal.SIGKILL)
                    self.kills += 1
                except ProcessLookupError:
                    pass


class MemorySampler(threading.Thread):
    """The driver's resident memory, sampled every 20 ms."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.stop, self.start_mb = threading.Event(), _rss_mb()
        self.peak_mb = self.start_mb

    def run(self) -> None:
        while not self.stop.wait(0.02):
            self.peak_mb = max(self.peak_mb, _rss_mb())


def _rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


# The scheduler's warnings about the faults it handled: what each counts, the words it has.
LOGGED = {
    "infra_errors": ("met an infrastructure error",),
    "stalls": ("made no progress", "killing its worker"),
}


class LogCounter(logging.Handler):
    """Counts the scheduler's warnings that LOGGED names."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.counts = Counter[str]()

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        for name, words in LOGGED.items():
            self.counts[name] += all(word in message for word in words)


def check(out: str, kinds: dict[str, str], stall_job: str | None = None) -> dict:
    rows = read_results(Storage(), out).to_pylist()
    seen = Counter(row["id"] for row in rows)
    by_id = {row["id"]: row for row in rows}
    unexpected, killed_out = [], 0
    for job_id, kind in kinds.items():
        row = by_id.get(job_id)
        if row is None:
            continue
        expected, error = KINDS[kind][1], row["error"] or ""
        if expected is None and row["status"] != "ok":
            if row["error_kind"] == KIND_DIED and job_id != stall_job:
                killed_out += 1  # killed every time it ran alone: failed, with that reason
            else:  # an infrastructure failure or a timeout of a good job: never expected
                unexpected.append((job_id, kind, row["error_kind"], error))
        elif expected is not None and (expected not in error or row["error_kind"] != KIND_JOB):
            unexpected.append((job_id, kind, row["error_kind"], error))
    return {
        "rows": len(rows),
        "lost": len(set(kinds) - set(seen)),
        "duplicates": sum(count - 1 for count in seen.values()),
        "ok": sum(row["status"] == "ok" for row in rows),
        "failed": sum(row["status"] != "ok" for row in rows),
        "retried_jobs": sum((row["attempts"] or 1) > 1 for row in rows),
        "extra_attempts": sum((row["attempts"] or 1) - 1 for row in rows),
        "failed_by_kills": killed_out,
        "failed_infrastructure": sum(row["error_kind"] == "infrastructure" for row in rows),
        "stall_job_attempts": by_id.get(stall_job or "", {}).get("attempts"),
        "unexpected": len(unexpected),
        "unexpected_examples": unexpected[:5],
    }


def inject_faults(args: argparse.Namespace, folder: Path, kinds: dict[str, str]) -> str | None:
    """Set the fault variables (the scheduler hands DIPPIPE_* variables to the workers);
    returns the job that stalls once (the good one in the middle of the manifest)."""
    os.environ[faults.FAULT_CUDA_WORKERS] = args.cuda_worker
    os.environ[faults.FAULT_NO_CREDENTIALS_WORKERS] = args.no_credentials_worker
    good = [job_id for job_id, kind in kinds.items() if kind == "good"]
    stall_job = good[len(good) // 2] if args.stall_job and good else None
    if stall_job:
        os.environ[faults.FAULT_STALL_JOB] = stall_job
        os.environ[faults.FAULT_STALL_MARKER] = str(folder / "stalled")
    return stall_job


def soak(args: argparse.Namespace, folder: Path) -> dict:
    rng = np.random.default_rng(args.seed)
    kinds = make_inputs(folder, args.jobs, args.bad_share, args.iterations, rng)
    stall_job = inject_faults(args, folder, kinds)
    worker = WorkerConfig(
        out=str(folder / "out"),
        device="cpu",
        sync_every=1000,
        fake_fit_seconds=args.fake_fit_seconds,
    )
    config = RunConfig(
        manifest=str(folder / "manifest.parquet"),
        worker=worker,
        gpus=args.gpus,
        cpus_per_worker=0.5,
        max_attempts=args.max_attempts,
        flush_rows=64,
        show_progress=False,
        stall_seconds=args.stall_seconds,
    )
    memory = MemorySampler()
    killer = Killer(args.kill_every, args.max_kills, args.seed, folder / "stalled")
    counter = LogCounter()
    logging.getLogger("dippipe").addHandler(counter)
    memory.start()
    killer.start()
    started = time.monotonic()
    try:
        summary = run(config, Console(quiet=True))
    finally:
        killer.stop.set()
        killer.join()
        logging.getLogger("dippipe").removeHandler(counter)
    wall = time.monotonic() - started
    memory.stop.set()
    memory.join()
    figures = check(config.out, kinds, stall_job)
    stalled = (folder / "stalled").exists()
    if stall_job and (not stalled or counter.counts["stalls"] != 1):
        figures["unexpected"] += 1  # not injected, or not stopped by the stall check
        figures["unexpected_examples"].append((stall_job, "stall", None, "did not stall"))
    again = run(config, Console(quiet=True))  # the same command: must find nothing to do
    figures.update(
        jobs=args.jobs,
        workers=args.gpus,
        wall_seconds=wall,
        busy_seconds=summary.busy_seconds,
        jobs_per_second=args.jobs / max(summary.busy_seconds, 1e-9),
        kills_sent=killer.kills,
        cuda_worker=args.cuda_worker,
        no_credentials_worker=args.no_credentials_worker,
        stall_job=stall_job,
        stalled=stalled,
        infra_errors_retried=counter.counts["infra_errors"],
        stalls_seen=counter.counts["stalls"],
        worker_deaths_seen=summary.worker_deaths,
        bad_inputs=sum(kind != "good" for kind in kinds.values()),
        bad_inputs_by_kind=dict(Counter(k for k in kinds.values() if k != "good")),
        rerun_pending=again.pending,
        rows_after_rerun=check(config.out, kinds)["rows"],
        driver_rss_start_mb=memory.start_mb,
        driver_rss_peak_mb=memory.peak_mb,
        fit="fake" if args.fake_fit_seconds is not None else f"real, {args.iterations} steps",
    )
    return figures


def table(f: dict) -> Table:
    out = Table(title=f"soak: {f['jobs']} jobs, {f['workers']} logical GPUs, fits {f['fit']}")
    out.add_column("what")
    out.add_column("value", justify="right")
    lines = [
        ("jobs/s (busy period)", f"{f['jobs_per_second']:.1f}"),
        ("wall seconds", f"{f['wall_seconds']:.1f}"),
        ("faults injected: worker SIGKILLs", f["kills_sent"]),
        ("faults injected: bad inputs", f"{f['bad_inputs']} {f['bad_inputs_by_kind']}"),
        ("faults injected: CUDA errors forever on", f["cuda_worker"] or "-"),
        ("faults injected: no credentials on", f["no_credentials_worker"] or "-"),
        ("faults injected: stalled once", f"{f['stall_job']} (stalled: {f['stalled']})"),
        ("infrastructure errors retried", f["infra_errors_retried"]),
        ("stalls seen (worker killed)", f["stalls_seen"]),
        ("worker processes replaced (died, retired, killed)", f["worker_deaths_seen"]),
        ("jobs retried (attempts > 1)", f["retried_jobs"]),
        ("extra attempts", f["extra_attempts"]),
        ("result rows", f["rows"]),
        ("ok / failed", f"{f['ok']} / {f['failed']}"),
        ("failed because every attempt was killed", f["failed_by_kills"]),
        ("failed for the infrastructure (must be 0)", f["failed_infrastructure"]),
        ("stalled job: attempts (ok)", f["stall_job_attempts"]),
        ("jobs lost (must be 0)", f["lost"]),
        ("duplicate rows (must be 0)", f["duplicates"]),
        ("unexpected outcomes (must be 0)", f["unexpected"]),
        ("rerun: jobs pending / rows after", f"{f['rerun_pending']} / {f['rows_after_rerun']}"),
        ("driver RSS at start (MB)", f"{f['driver_rss_start_mb']:.0f}"),
        ("driver peak RSS during the run (MB)", f"{f['driver_rss_peak_mb']:.0f}"),
    ]
    for name, value in lines:
        out.add_row(name, str(value))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--gpus", type=int, default=4, help="logical GPUs = fitting workers")
    parser.add_argument("--iterations", type=int, default=3, help="steps of each real fit")
    parser.add_argument("--fake-fit-seconds", type=float, default=None)
    parser.add_argument("--kill-every", type=float, default=4.0, help="mean seconds per kill")
    parser.add_argument("--max-kills", type=int, default=40)
    parser.add_argument("--bad-share", type=float, default=0.05)
    parser.add_argument("--max-attempts", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cuda-worker", default="worker-1", help="'' for none")
    parser.add_argument("--no-credentials-worker", default="worker-2", help="'' for none")
    parser.add_argument("--stall-job", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--stall-seconds", type=float, default=10.0)
    parser.add_argument("--json", default="bench-out/soak.json")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="dps-"))
    temp_dir = tempfile.mkdtemp(prefix="dpr-", dir="/tmp")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    # The fault-injecting worker hook (inject_faults), importable by every worker process.
    os.environ[WORKER_HOOK] = "tests.support.worker_faults:install"
    path = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPOSITORY), path) if p)
    ray.init(
        address="local",
        num_cpus=max(2, args.gpus // 2),
        num_gpus=args.gpus,
        _temp_dir=temp_dir,
        include_dashboard=False,
        logging_level="WARNING",
    )
    try:
        figures = soak(args, folder)
    finally:
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)
        shutil.rmtree(folder, ignore_errors=True)
    Console().print(table(figures))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(figures, indent=2))
    print(f"wrote {args.json}")
    healthy = figures["lost"] == 0 and figures["duplicates"] == 0 and figures["unexpected"] == 0
    healthy = healthy and figures["failed_infrastructure"] == 0
    return 0 if healthy and figures["rerun_pending"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
