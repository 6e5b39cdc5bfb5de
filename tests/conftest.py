"""Shared fixtures: real services, started once per session. Builders and tools for tests are
in tests/support/ (``from tests.support.builders import tiny_image``).

- ``worker_fault_hook`` (automatic): every Fitter of the session, in this process or a Ray
  worker, runs tests/support/worker_faults.py's hook, inert until a test sets a fault variable.
  The repository root goes on PYTHONPATH so every process started from here can import it.
- ``s3_endpoint``: moto's S3 server on 127.0.0.1 (a free port), as a subprocess. The AWS
  variables are set in this process before Ray starts, so Ray workers inherit them.
- ``ray_local``: a local Ray with 2 CPUs and 2 logical GPUs, a short private temp dir and no
  dashboard. The pipeline sees it initialised and joins it instead of starting its own.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.worker import WORKER_HOOK
from tests.support.network import free_port, wait_http

REPOSITORY = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def worker_fault_hook() -> Iterator[None]:
    """Set before any Ray starts, so that its workers inherit both variables."""
    path = os.pathsep.join(p for p in (str(REPOSITORY), os.environ.get("PYTHONPATH")) if p)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(WORKER_HOOK, "tests.support.worker_faults:install")
        patch.setenv("PYTHONPATH", path)
        yield


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in _AWS_ENV}
    os.environ.update(
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing-secret-value",
        AWS_REGION="us-east-1",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_ENDPOINT_URL=endpoint,
    )
    try:
        wait_http(endpoint)
        yield endpoint
    finally:
        server.terminate()
        server.wait(timeout=10)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


_AWS_ENV = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_ENDPOINT_URL",
)


@pytest.fixture(scope="session")
def ray_local(s3_endpoint: str) -> Iterator[None]:
    """Depends on s3_endpoint so the AWS variables exist before the workers start."""
    import ray

    temp_dir = tempfile.mkdtemp(prefix="dpr-", dir="/tmp")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    ray.init(
        address="local",
        num_cpus=2,
        num_gpus=2,
        _temp_dir=temp_dir,
        include_dashboard=False,
        logging_level="WARNING",
    )
    try:
        yield
    finally:
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture
def s3_bucket(s3_endpoint: str) -> str:
    """A fresh, empty bucket; returns 's3://name'."""
    import boto3

    name = f"dippipe-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(Bucket=name)
    return f"s3://{name}"
