"""faults.py: which errors are a job's own (committed as failed) and which are the
infrastructure's (retried elsewhere): one test per class, and the Fitter's use of it."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
import ray
import torch
from botocore.exceptions import ClientError, NoCredentialsError

from dip_core import DipInputError
from pipeline.faults import classify
from pipeline.images import ImageDecodeError
from pipeline.manifest import Job
from pipeline.outputs import KIND_INFRA, KIND_JOB
from pipeline.retry import StorageUnavailableError
from pipeline.worker import Fitter, JobInputError, WorkerConfig
from tests.support.builders import TINY_PARAMS, tiny_image, write_png


def _client_error(code: str, status: int = 400) -> ClientError:
    response = {"Error": {"Code": code, "Message": code},
                "ResponseMetadata": {"HTTPStatusCode": status}}  # fmt: skip
    return ClientError(response, "GetObject")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "error",
    [
        DipInputError("unknown task 'x'"),
        JobInputError("image not found: a.png"),
        ImageDecodeError("not a readable PNG"),
        ValueError("lr must be a finite number"),
        KeyError("channels"),
        FileNotFoundError(errno.ENOENT, "missing"),
        torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"),
        RuntimeError("shape mismatch: [3, 16, 16] vs [1, 16, 16]"),
        _client_error("NoSuchKey", 404),
        OSError(errno.EIO, "a corrupt file"),
    ],
)
def test_a_jobs_own_errors(error):
    assert classify(error) == KIND_JOB


@pytest.mark.parametrize(
    "error",
    [
        torch.AcceleratorError("CUDA error: unspecified launch failure"),
        RuntimeError("CUDA error: an illegal memory access was encountered"),
        RuntimeError("CUDA error: misaligned address"),
        RuntimeError("CUBLAS_STATUS_EXECUTION_FAILED when calling `cublasSgemm`"),
        RuntimeError("cuDNN error: CUDNN_STATUS_INTERNAL_ERROR"),
        RuntimeError("CUDA error: device-side assert triggered"),
    ],
)
def test_cuda_errors_other_than_out_of_memory(error):
    assert classify(error) == KIND_INFRA


# The tail torch appends to every CUDA error it checks (c10/cuda/CUDAException.cpp).
CUDA_TAIL = (
    "\nCUDA kernel errors might be asynchronously reported at some other API call, so the "
    "stacktrace below might be incorrect.\nFor debugging consider passing "
    "CUDA_LAUNCH_BLOCKING=1\nCompile with `TORCH_USE_CUDA_DSA` to enable device-side "
    "assertions.\n"
)
CUDNN_NOT_SUPPORTED = (
    "cuDNN error: CUDNN_STATUS_NOT_SUPPORTED. This error may appear if you passed in a "
    "non-contiguous input."
)


@pytest.mark.parametrize(
    "error",
    [
        # Out of memory for the job's size: torch >= 2.8 raises AcceleratorError, older a
        # RuntimeError; cuBLAS's workspace when its handle is created.
        torch.AcceleratorError("CUDA error: out of memory" + CUDA_TAIL),
        RuntimeError("CUDA error: out of memory" + CUDA_TAIL),
        RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"),
        # What the input's shape asks of a kernel.
        RuntimeError(CUDNN_NOT_SUPPORTED),
        torch.AcceleratorError("CUDA error: invalid configuration argument" + CUDA_TAIL),
        RuntimeError("CUDA error: invalid configuration argument" + CUDA_TAIL),
    ],
)
def test_cuda_errors_of_the_jobs_own_size_or_shape_are_the_jobs(error):
    assert classify(error) == KIND_JOB


@pytest.mark.parametrize(
    "error",
    [
        torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        torch.AcceleratorError("CUDA error: out of memory" + CUDA_TAIL),
        RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"),
    ],
)
def test_a_fit_out_of_device_memory_however_raised_is_refitted_with_less(tmp_path, error):
    image = write_png(tmp_path / "in.png", tiny_image(0, 16))
    fitter = Fitter(WorkerConfig(out=str(tmp_path / "out"), device="cpu", sync_every=5))
    raised: list[str] = []

    def once(job_id: str, step: int) -> None:
        if not raised:
            raised.append(job_id)
            raise error

    fitter.step_listeners.append(once)
    job = Job("j", "denoise", 0, 5, {"image": image}, iterations=10, params=TINY_PARAMS)
    row = fitter.run(job).row
    assert raised == ["j"] and row["status"] == "ok" and row["iterations"] == 10, row


def test_out_of_host_memory():
    assert classify(MemoryError()) == KIND_INFRA


@pytest.mark.parametrize(
    "error",
    [
        NoCredentialsError(),
        _client_error("AccessDenied", 403),
        _client_error("ExpiredToken", 400),
        PermissionError(errno.EACCES, "Permission denied: '/out/images/ab'"),
        OSError(errno.ENOSPC, "No space left on device"),
    ],
)
def test_credentials_permissions_and_full_disks(error):
    assert classify(error) == KIND_INFRA


def test_storage_unavailable_past_the_retries():
    assert classify(StorageUnavailableError(errno.EIO, "storage unavailable: read")) == KIND_INFRA


@pytest.mark.parametrize(
    "error",
    [
        ray.exceptions.ObjectLostError("ab" * 14, "owner", "call site"),
        ray.exceptions.OwnerDiedError("ab" * 14, "owner", "call site"),
        ray.exceptions.NodeDiedError("node 1 died"),
    ],
)
def test_lost_objects_and_nodes(error):
    assert classify(error) == KIND_INFRA


def test_the_cause_chain_is_searched_but_a_job_error_from_none_hides_it():
    try:
        try:
            raise NoCredentialsError()
        except NoCredentialsError as cause:
            raise OSError("read failed") from cause
    except OSError as wrapped:
        assert classify(wrapped) == KIND_INFRA
    try:
        try:
            raise PermissionError("denied")
        except PermissionError:
            raise JobInputError("image not found: a.png") from None
    except JobInputError as hidden:
        assert classify(hidden) == KIND_JOB


def test_the_fitter_marks_each_failed_row_with_its_kind(tmp_path: Path):
    image = write_png(tmp_path / "in.png", tiny_image(0, 16))
    fitter = Fitter(WorkerConfig(out=str(tmp_path / "out"), fake_fit_seconds=0.0))
    missing = fitter.run(Job("m", "denoise", 0, 5, {"image": str(tmp_path / "nope.png")}))
    assert missing.row["status"] == "failed" and missing.row["error_kind"] == KIND_JOB

    def no_credentials(uri: str) -> bytes:
        raise NoCredentialsError()

    fitter.storage.read_bytes = no_credentials  # type: ignore[method-assign]
    infra = fitter.run(Job("c", "denoise", 0, 5, {"image": image}))
    assert infra.row["status"] == "failed" and infra.row["error_kind"] == KIND_INFRA
    assert "NoCredentialsError" in infra.row["error"]
