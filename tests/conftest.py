"""Shared fixtures: real services, started once per session.

- ``s3_endpoint``: moto's S3 server on 127.0.0.1 (a free port), as a subprocess. The AWS
  variables are set in this process before Ray starts, so Ray workers inherit them.
- ``ray_local``: a local Ray with 2 CPUs and 2 logical GPUs, a short private temp dir and no
  dashboard. The pipeline sees it initialised and joins it instead of starting its own.
- small builders for images and manifests (``write_png``, ``write_manifest``).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.images import encode_png

TINY_PARAMS = '{"channels": 8, "depth": 3, "input_depth": 8}'


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_http(url: str, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            urllib.request.urlopen(url, timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    port = _free_port()
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
        _wait_http(endpoint)
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


def tiny_image(seed: int, size: int = 24, channels: int = 3) -> np.ndarray:
    """A smooth synthetic image (C, H, W) in [0, 1]: gradients plus a square."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / max(size - 1, 1)
    planes = [(a * x + b * y + c) % 1.0 for a, b, c in rng.random((channels, 3))]
    image = np.stack(planes).astype(np.float32)
    image[:, size // 4 : size // 2, size // 4 : size // 2] = 0.9
    return image


def write_png(
    path: Path | str, pixels: np.ndarray, alpha: np.ndarray | None = None, bits: int = 8
) -> str:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_bytes(encode_png(pixels, alpha, bits))
    return str(path)


def write_manifest(path: Path | str, rows: list[dict]) -> str:
    """A manifest from dicts: absent optional columns stay absent, as users write them."""
    columns = list(dict.fromkeys(key for row in rows for key in row))  # first-seen order
    pq.write_table(pa.table({c: [row.get(c) for row in rows] for c in columns}), str(path))
    return str(path)
