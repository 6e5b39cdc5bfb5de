"""Whose fault is an error: the job's own, or the infrastructure's (the worker, its node, storage).

The class decides what happens to the job (scheduler.py):

- ``KIND_JOB``: the job's input or params are wrong (missing or undecodable file, a bad value,
  out of GPU memory after the low-memory retry). Running it again gives the same error, so it
  is committed at once as a ``failed`` row. Anything not listed below is the job's, and so are
  these CUDA errors, whatever class torch raises them as (``OutOfMemoryError``,
  ``AcceleratorError``, ``RuntimeError``), checked before the infrastructure's markers:

  - out of GPU memory, as the job's size asks for it: ``CUDA out of memory``, ``CUDA error:
    out of memory``, ``CUBLAS_STATUS_ALLOC_FAILED`` (cuBLAS's workspace; worker.py retries
    all of them with less memory first, :func:`is_out_of_memory`);
  - what the input's shape asks of a kernel that cannot do it: ``CUDNN_STATUS_NOT_SUPPORTED``
    and ``CUDA error: invalid configuration argument`` (a launch grid out of bounds).
- ``KIND_INFRA``: the job met a broken worker, node or service. Never committed on first sight:
  the job goes back to the queue and the error counts against the worker that had it. Errors
  of this class:

  - CUDA errors other than the job's own above (``torch.AcceleratorError``, a
    ``RuntimeError`` naming a CUDA / cuBLAS / cuDNN / NCCL error, a device-side assert, an
    illegal memory access, an ECC error). Most leave the process's CUDA context unusable
    ("sticky"), so even one caused by the job's data poisons the worker; a job that causes
    it everywhere ends failed with ``KIND_INFRA`` after ``max_attempts`` workers.
  - out of host memory (``MemoryError``);
  - credentials or permissions when reading inputs or writing outputs (``PermissionError``,
    which s3fs raises for AccessDenied; botocore's missing or expired credentials and
    ClientErrors with an access or token code); a full or read-only disk;
  - storage unavailable past the retries (``StorageUnavailableError``, retry.py);
  - Ray objects lost with the node or process that held them (``ObjectLostError`` and its
    subclasses such as ``OwnerDiedError``, ``NodeDiedError``, ``RaySystemError``).

The search looks through the exception's causes and context, as retry.py does: an
infrastructure error wrapped by a library is still one; but a job error raised ``from None``
(e.g. "image not found") hides its cause on purpose and stays the job's.
"""

from __future__ import annotations

import errno

import ray
import torch

from pipeline.errors import causes
from pipeline.outputs import KIND_INFRA, KIND_JOB
from pipeline.retry import StorageUnavailableError

# Substrings of a RuntimeError's message that mean the device or its libraries failed.
CUDA_MARKERS = (
    "CUDA error",
    "CUDA driver",
    "CUBLAS_STATUS",
    "CUDNN_STATUS",
    "cuDNN error",
    "NCCL error",
    "device-side assert",
    "illegal memory access",
    "unspecified launch failure",
    "uncorrectable ECC error",
)
# Substrings of a CUDA error's message that mean the job's own size or shape (module docstring).
OUT_OF_MEMORY_MARKERS = (
    "CUDA out of memory",
    "CUDA error: out of memory",
    "CUBLAS_STATUS_ALLOC_FAILED",
)
JOB_CUDA_MARKERS = (
    *OUT_OF_MEMORY_MARKERS,
    "CUDNN_STATUS_NOT_SUPPORTED",
    "invalid configuration argument",
)
# botocore exception class names for credentials that are missing, incomplete or expired.
CREDENTIAL_CLASS_NAMES = frozenset(
    {
        "NoCredentialsError",
        "PartialCredentialsError",
        "CredentialRetrievalError",
        "NoAuthTokenError",
        "TokenRetrievalError",
        "UnauthorizedSSOTokenError",
        "SSOTokenLoadError",
    }
)
# S3 / STS error codes (botocore ClientError) that mean "this node may not do that".
ACCESS_CODES = frozenset(
    {
        "AccessDenied",
        "AllAccessDisabled",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "ExpiredToken",
        "ExpiredTokenException",
        "InvalidToken",
        "TokenRefreshRequired",
        "Forbidden",
        "403",
        "401",
    }
)
DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})
LOST_OBJECTS = (
    ray.exceptions.ObjectLostError,  # OwnerDiedError, ObjectReconstructionFailedError...
    ray.exceptions.NodeDiedError,
    ray.exceptions.LocalRayletDiedError,
    ray.exceptions.RaySystemError,
)
_ACCELERATOR_ERROR = getattr(torch, "AcceleratorError", None)  # torch >= 2.8


def classify(error: BaseException) -> str:
    """``KIND_INFRA`` when the error, or an exception it wraps, is the infrastructure's
    (module docstring); else ``KIND_JOB``."""
    if any(_infrastructure_here(current) for current in causes(error)):
        return KIND_INFRA
    return KIND_JOB


def is_out_of_memory(error: BaseException) -> bool:
    """The device ran out of memory for this job (its size): torch's OutOfMemoryError or a
    CUDA / cuBLAS allocation error raised as a plain RuntimeError or AcceleratorError."""
    if isinstance(error, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(error, RuntimeError) and any(m in str(error) for m in OUT_OF_MEMORY_MARKERS)


def _infrastructure_here(error: BaseException) -> bool:
    if isinstance(error, torch.cuda.OutOfMemoryError):
        return False  # the job's own size (worker.py retries it with less memory first)
    if isinstance(error, RuntimeError) and any(m in str(error) for m in JOB_CUDA_MARKERS):
        return False  # the job's own size or shape, whatever the class (module docstring)
    if _ACCELERATOR_ERROR is not None and isinstance(error, _ACCELERATOR_ERROR):
        return True
    if isinstance(error, RuntimeError) and any(m in str(error) for m in CUDA_MARKERS):
        return True
    if isinstance(error, (MemoryError, PermissionError, StorageUnavailableError, *LOST_OBJECTS)):
        return True
    if isinstance(error, OSError) and error.errno in DISK_ERRNOS:
        return True
    if any(cls.__name__ in CREDENTIAL_CLASS_NAMES for cls in type(error).__mro__):
        return True
    response = getattr(error, "response", None)  # botocore ClientError
    if isinstance(response, dict):
        code = str(response.get("Error", {}).get("Code", ""))
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        return code in ACCESS_CODES or int(status) in (401, 403)
    return False


def is_infrastructure(error: BaseException) -> bool:
    return classify(error) == KIND_INFRA
