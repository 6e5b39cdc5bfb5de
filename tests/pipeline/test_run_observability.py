"""What a run shows outside its own log: Ray metrics a Prometheus scrape sees, and the
refusal of a local OUT on a worker of another machine."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from pipeline.runner import RunConfig, RunError, _placement_check
from pipeline.worker import WORKER_HOOK, WorkerConfig
from tests.support.builders import tiny_image, write_manifest, write_png
from tests.support.gate import GATE_FILE, GATE_JOB
from tests.support.network import free_port

REPOSITORY = Path(__file__).resolve().parents[2]


def _scrape(port: int) -> str:
    try:
        return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    except OSError:
        return ""


def _samples(text: str, name: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(name)]


@pytest.mark.ray
def test_a_run_exports_its_metrics_to_prometheus(tmp_path):
    """A real `dippipe run` (its own embedded Ray, in a subprocess) with --metrics-port: while
    its second job is held at a gate, a scrape shows the first one finished and timed."""
    image = write_png(tmp_path / "a.png", tiny_image(0, 16))
    rows = [{"id": name, "task": "denoise", "image": image} for name in ("first", "held")]
    manifest = write_manifest(tmp_path / "m.parquet", rows)
    port, gate = free_port(), tmp_path / "gate"
    env = {**os.environ, WORKER_HOOK: "tests.support.gate:install", GATE_JOB: "held",
           GATE_FILE: str(gate), "PYTHONPATH": str(REPOSITORY), "OMP_NUM_THREADS": "1"}  # fmt: skip
    command = [sys.executable, "-c", "from pipeline.cli import app; app()",
               "run", manifest, "--out", str(tmp_path / "o"), "--gpus", "0", "--workers", "1",
               "--fake-fit-seconds", "0", "--no-progress", "--metrics-port", str(port)]  # fmt: skip
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        finished, deadline = [], time.monotonic() + 120
        while not finished and process.poll() is None and time.monotonic() < deadline:
            text = _scrape(port)
            finished = [
                s for s in _samples(text, "ray_dippipe_jobs_finished") if 'status="ok"' in s
            ]
            time.sleep(0.5)
        assert finished, "no dippipe_jobs_finished sample while the run was held"
        assert finished[0].split()[-1] == "1.0"  # the first job; the held one is not done
        assert _samples(text, "ray_dippipe_job_seconds_count"), text[-2000:]
        assert _samples(text, "ray_dippipe_jobs_running")
    finally:
        gate.touch()
        output = process.communicate(timeout=120)[0].decode()
    assert process.returncode == 0, output[-3000:]


def _config(out: str, shared: bool = False) -> RunConfig:
    return RunConfig("m.parquet", WorkerConfig(out), shared_out=shared)


def test_a_local_out_is_refused_for_a_worker_on_another_machine(tmp_path):
    check = _placement_check(_config(str(tmp_path)))
    assert check is not None
    with pytest.raises(RunError, match="--shared-out") as refused:
        check({"worker": "worker-3", "node": "203.0.113.9"})
    assert "worker-3" in str(refused.value) and "203.0.113.9" in str(refused.value)


def test_a_local_worker_a_shared_out_or_an_object_store_out_pass(tmp_path):
    import ray

    here = ray.util.get_node_ip_address()
    _placement_check(_config(str(tmp_path)))({"worker": "worker-0", "node": here})  # type: ignore[misc]
    _placement_check(_config(f"file://{tmp_path}"))({"worker": "w", "node": here})  # type: ignore[misc]
    assert _placement_check(_config(str(tmp_path), shared=True)) is None
    assert _placement_check(_config("s3://bucket/out")) is None
    assert _placement_check(_config("memory://out")) is None  # relayed by the driver
