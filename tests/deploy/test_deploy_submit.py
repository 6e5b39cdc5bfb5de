"""The RayJob's submission path for real: `ray job submit` of deploy/entrypoint.sh to a Ray head's
Jobs API (what KubeRay's submitter pod does), against a loopback S3, stopped mid-run with
`ray job stop`, and resubmitted.

One Ray head on a loopback IP of its own, with its dashboard (tests/support/ray_nodes.py), and
moto's S3 server (the `s3_endpoint` fixture). The S3 settings reach the job the way the head
pod's Secret does in production, as environment: here through `--runtime-env-json` env_vars
(the head itself is started without them), so the driver and its fitting workers only work if
the job's environment carries them. `--fake-fit-seconds` makes every job last a known time.

The submissions, in order:
1. the RayJob's entrypoint (DIPPIPE_RAYJOB set: owner id rayjob/<namespace>/<name>), stopped
   mid-run by `ray job stop` as production stops it (SIGTERM, RAY_JOB_STOP_WAIT_TIME_S from
   rayjob.yaml): dippipe writes what it finished, releases the lock and exits 130, which the
   entrypoint passes on (README table: retried, resumes);
2. the same, its driver then killed outright (SIGKILL to the `dippipe run` process): what a
   deleted pod or a lost head does to it. The entrypoint reports 137 and the Ray job FAILS
   (README table: retried); the lock stays behind. A retry on Kubernetes runs on a new head
   with a new host name; this machine has one host name, so the test writes another into the
   lock (everything else in it, its fresh heartbeat included, is the killed run's own);
3. an interactive submission (no DIPPIPE_RAYJOB, so no owner): refused by the live-looking
   lock, dippipe exits 3 (OUT locked: exit_codes.py) and so does the entrypoint: the Ray job
   FAILS (README table: a RayJob would retry, and find the lock free once its owner is gone);
4. the RayJob's entrypoint again: same owner id, but the lock's heartbeat is fresh by the
   storage's clock (rewritten at step 2; moto's LastModified cannot be set back, so it is not
   aged here), so it waits until the lock has had no heartbeat for OWNER_TAKEOVER_SECONDS
   (75 s; a live old attempt would keep it fresh), then takes it over, resumes and finishes:
   exit 0, job SUCCEEDED, every job exactly once, no lock left.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pytest
import yaml

from pipeline.images import encode_png
from pipeline.lock import OWNER_TAKEOVER_SECONDS
from pipeline.manifest import MANIFEST_SCHEMA
from pipeline.storage import Storage, StorageOptions, join
from tests.support.builders import tiny_image
from tests.support.processes import cmdline, descendants
from tests.support.ray_nodes import BIN, RayHead, ray_env, start_head
from tests.support.results import assert_exactly_once, results

pytestmark = [
    pytest.mark.ray,
    pytest.mark.s3,
    pytest.mark.slow,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc; Linux only"),
]

REPO = Path(__file__).resolve().parents[2]
RAYJOB = yaml.safe_load((REPO / "deploy" / "kuberay" / "rayjob.yaml").read_text())
HEAD_IP = "127.0.0.6"  # not the multinode test's .2 / .3
NAMESPACE = "batch"
JOBS = 24
FIT_SECONDS = 0.5  # per job, 2 workers: about 6 s of work in all
STOP_AFTER = 4  # new output images before each stop: the run is well under way, far from done
AWS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION", "AWS_DEFAULT_REGION",
       "AWS_ENDPOINT_URL")  # fmt: skip


def _head_env(name: str) -> str:
    """An env value of the RayJob's head container (deploy/kuberay/rayjob.yaml)."""
    head = RAYJOB["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    (container,) = head["containers"]
    return next(e["value"] for e in container["env"] if e["name"] == name)


@pytest.fixture
def head() -> Iterator[RayHead]:
    # 3 logical CPUs: the two fitting workers (--cpus-per-worker 1) and room for the job's
    # supervisor actor. The head gets no AWS variable (ray_env drops them).
    node = start_head(HEAD_IP, ray_env(), num_cpus=3)
    try:
        node.wait_ready(seconds=120)
        yield node
    finally:
        node.stop()


def _ray(head: RayHead, *args: str, timeout: float = 120) -> str:
    done = subprocess.run(
        [str(BIN / "ray"), "job", args[0], "--address", head.dashboard, *args[1:]],
        env=head.env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    assert done.returncode == 0, f"ray job {args[0]}: {done.stdout[-2000:]}{done.stderr[-3000:]}"
    return done.stdout + done.stderr


def _submit(head: RayHead, entrypoint: str, env_vars: dict[str, str]) -> str:
    """`ray job submit --no-wait ... -- ENTRYPOINT` as KubeRay's submitter runs it: through a
    shell, so the entrypoint reaches `ray` as words, which Ray joins back (quoting each) and
    runs with /bin/sh on the head; `VAR=value` in front stays an assignment."""
    submission = f"dippipe-{uuid.uuid4().hex[:8]}"
    runtime_env = json.dumps({"env_vars": env_vars})
    _ray(head, "submit", "--no-wait", "--submission-id", submission,
         "--runtime-env-json", runtime_env, "--", *shlex.split(entrypoint))  # fmt: skip
    return submission


def _status(head: RayHead, submission: str) -> dict:
    """The Jobs API's view of one submission (GET /api/jobs/<id>), as KubeRay polls it."""
    import urllib.request

    request = urllib.request.Request(
        f"{head.dashboard}/api/jobs/{submission}",
        headers={"Authorization": f"Bearer {head.env['RAY_AUTH_TOKEN']}"},
    )
    with urllib.request.urlopen(request, timeout=10) as answer:
        return json.load(answer)


def _wait_end(head: RayHead, submission: str, seconds: float) -> dict:
    deadline = time.monotonic() + seconds
    while (info := _status(head, submission))["status"] in ("PENDING", "RUNNING"):
        if time.monotonic() > deadline:
            _ray(head, "stop", submission)
            pytest.fail(f"{submission} still {info['status']} after {seconds}s:\n"
                        f"{_logs(head, submission)[-5000:]}")  # fmt: skip
        time.sleep(0.2)
    return info


def _logs(head: RayHead, submission: str) -> str:
    return _ray(head, "logs", submission)


def _images(storage: Storage, out: str) -> int:
    """Output PNGs under OUT/images/<task>/, as S3 lists them now (no listing cache)."""
    fs, path = storage.resolve(join(out, "images"))
    fs.invalidate_cache()
    return sum(name.endswith(".png") for name in fs.find(path))


def _wait_images(head: RayHead, submission: str, storage: Storage, out: str, count: int) -> None:
    """Until OUT holds `count` PNGs (jobs done), the job still running: the stop is then
    mid-run by what the run did, not by a guessed delay."""
    deadline = time.monotonic() + 120
    while _images(storage, out) < count:
        info = _status(head, submission)
        assert info["status"] in ("PENDING", "RUNNING"), (
            f"{submission} ended before the stop: {info}\n{_logs(head, submission)[-5000:]}"
        )
        assert time.monotonic() < deadline, f"fewer than {count} images after 120 s"
        time.sleep(0.1)


def _drivers(head: RayHead) -> list[int]:
    """PIDs of the `dippipe run` processes (the Ray job's driver) under our head, not of the
    entrypoint script that started them."""
    return [
        pid
        for pid in descendants(head.process.pid)
        if " run " in cmdline(pid)
        and "dippipe" in cmdline(pid)
        and "entrypoint.sh" not in cmdline(pid)
    ]


def _lock(storage: Storage, out: str) -> dict | None:
    """OUT's lock as S3 holds it now: a GET, never a (cached) listing."""
    try:
        return json.loads(storage.read_bytes(join(out, ".lock")))
    except FileNotFoundError:
        return None


def test_submit_stop_resubmit_resumes_and_takes_over_the_lock(
    head: RayHead, s3_bucket: str, s3_endpoint: str
):
    marks = [("start", time.monotonic())]  # step timings, printed at the end (pytest -s)
    storage = Storage(StorageOptions.from_env(endpoint_url=s3_endpoint))
    ids = [f"job-{i:02d}" for i in range(JOBS)]
    image = join(s3_bucket, "in", "a.png")
    storage.write_bytes(image, encode_png(tiny_image(1)))
    rows = [{"id": i, "task": "denoise", "image": image, "iterations": 5} for i in ids]
    manifest, out = join(s3_bucket, "manifest.parquet"), join(s3_bucket, "out")
    storage.write_parquet(manifest, pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA))

    # The RayJob's own entrypoint words (DIPPIPE_RAYJOB=<name> dippipe-entrypoint ...) with
    # the script itself for the image's `dippipe-entrypoint`, and this test's run options:
    # CPU workers instead of GPUs, every row flushed at once, jobs of a known length.
    prefix = shlex.split(RAYJOB["spec"]["entrypoint"])[0]
    name = prefix.split("=", 1)[1]
    assert prefix == f"DIPPIPE_RAYJOB={RAYJOB['metadata']['name']}"
    command = [str(REPO / "deploy" / "entrypoint.sh"), manifest, "--out", out,
               "--address", "auto", "--gpus", "0", "--workers", "2", "--cpus-per-worker", "1",
               "--flush-rows", "1", "--fake-fit-seconds", str(FIT_SECONDS), "--no-progress",
               "--worker-wait", "60"]  # fmt: skip
    entrypoint = shlex.join(command)
    aws = {key: s3_endpoint if key == "AWS_ENDPOINT_URL" else _aws(key) for key in AWS}
    # As on the head pod: the namespace (downward API) and Ray's stop grace from rayjob.yaml.
    job_env = {**aws, "DIPPIPE_NAMESPACE": NAMESPACE,
               "RAY_JOB_STOP_WAIT_TIME_S": _head_env("RAY_JOB_STOP_WAIT_TIME_S")}  # fmt: skip
    owner = f"rayjob/{NAMESPACE}/{name}"

    # 1. Stopped as `kubectl delete rayjob` stops it: SIGTERM, time to flush.
    first = _submit(head, f"{prefix} {entrypoint}", job_env)
    _wait_images(head, first, storage, out, STOP_AFTER)
    _ray(head, "stop", first)  # waits until the job has stopped
    log = _logs(head, first)
    assert _wait_end(head, first, 30)["status"] == "STOPPED", log[-3000:]
    assert "dippipe-entrypoint: dippipe exited 130 (interrupted; a rerun resumes); exiting 130" in (
        " ".join(log.split())
    ), log[-3000:]  # fmt: skip
    assert _lock(storage, out) is None, "a graceful stop must release the lock"
    done_first = {r["id"] for r in results(out, storage) if r["status"] == "ok"}
    assert STOP_AFTER <= len(done_first) < JOBS, sorted(done_first)

    marks.append(("1 stop", time.monotonic()))

    # 2. Lost as a deleted pod or a dead head loses it: the driver killed outright, no
    #    signal handler runs, the lock stays behind. The entrypoint reports the kill (137) and
    #    fails the Ray job, which KubeRay retries.
    second = _submit(head, f"{prefix} {entrypoint}", job_env)
    _wait_images(head, second, storage, out, len(done_first) + STOP_AFTER)
    held = _lock(storage, out)
    assert held is not None and held["owner"] == owner, held
    (driver,) = _drivers(head)
    os.kill(driver, signal.SIGKILL)
    info, log = _wait_end(head, second, 60), " ".join(_logs(head, second).split())
    assert info["status"] == "FAILED" and info["driver_exit_code"] == 137, (info, log[-3000:])
    assert "dippipe exited 137 (killed or crashed (signal 9)); exiting 137" in log, log[-3000:]
    left = _lock(storage, out)
    assert left is not None and left["run_id"] == held["run_id"], left
    # The retry's head has another host name (see the module docstring).
    assert left["host"] == socket.gethostname()
    storage.write_bytes(
        join(out, ".lock"), json.dumps({**left, "host": "head-of-attempt-2"}).encode()
    )

    marks.append(("2 kill", time.monotonic()))

    # 3. No owner id: the lock looks alive and is someone else's: exit 3, passed on.
    third = _submit(head, entrypoint, job_env)
    info, log = _wait_end(head, third, 90), " ".join(_logs(head, third).split())
    assert info["status"] == "FAILED", log[-3000:]
    assert "dippipe exited 3 (stopped by the infrastructure (storage, OUT" in log, log[-3000:]
    assert "in use by another dippipe run" in log, log[-3000:]
    assert _lock(storage, out)["run_id"] == held["run_id"]  # type: ignore[index]

    marks.append(("3 no owner", time.monotonic()))

    # 4. The RayJob's retry: waits for its own lock to go quiet (up to OWNER_TAKEOVER_SECONDS
    #    after step 2's write), takes it over, resumes, finishes.
    fourth = _submit(head, f"{prefix} {entrypoint}", job_env)
    info, log = (
        _wait_end(head, fourth, 120 + OWNER_TAKEOVER_SECONDS),
        " ".join(_logs(head, fourth).split()),
    )
    assert info["status"] == "SUCCEEDED", log[-5000:]
    assert "(same owner) to release the lock" in log, log[-5000:]  # it waited, then took over
    assert "taking over the lock" in log and f"same owner (DIPPIPE_OWNER_ID={owner})" in log, log[
        -5000:
    ]
    assert "dippipe-entrypoint: dippipe exited 0 (every job ok)" in log, log[-3000:]

    # Nothing lost, nothing duplicated: one ok row per job, one PNG per job, no lock.
    by_id = assert_exactly_once(out, ids, storage)
    assert {r["status"] for r in by_id.values()} == {"ok"}
    assert _images(storage, out) == JOBS
    assert _lock(storage, out) is None
    summary = json.loads(storage.read_bytes(join(out, "run.json")))["summary"]
    assert summary["skipped_ok"] >= len(done_first) and summary["failed"] == 0, summary
    marks.append(("4 takeover", time.monotonic()))
    print(" ".join(f"{name}: {t - marks[i][1]:.1f}s" for i, (name, t) in enumerate(marks[1:])))


def _aws(key: str) -> str:
    import os

    return os.environ[key]  # set by the s3_endpoint fixture
