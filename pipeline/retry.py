"""Retrying transient storage errors: which errors, how often, how long.

A transient error is one a later identical request may not get: the endpoint refused or
dropped the connection, a timeout, S3 answering 5xx / SlowDown / throttling, a busy or stale
network file. Those are retried with exponential backoff and jitter, a bounded number of
times; every other error (not found, permission denied, disk full, a corrupt file) is raised
at once, since waiting would not change it and the job should fail with that reason.

botocore and s3fs retry some of these internally too (a few seconds); this layer is the one
the user bounds and sees: ``--io-retries`` / ``DIPPIPE_IO_RETRIES`` (tries after the first)
and ``DIPPIPE_IO_RETRY_WAIT`` (the first wait, doubled each time up to ``max_wait``).
"""

from __future__ import annotations

import errno
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from pipeline.errors import DippipeError, causes
from pipeline.safetext import printable

log = logging.getLogger("dippipe")
T = TypeVar("T")

TRANSIENT_ERRNOS = frozenset(
    code
    for code in (
        errno.EAGAIN,
        errno.EBUSY,
        errno.ETIMEDOUT,
        errno.ECONNRESET,
        errno.ECONNREFUSED,
        errno.ECONNABORTED,
        errno.EHOSTUNREACH,
        errno.ENETUNREACH,
        errno.ENETDOWN,
        errno.EPIPE,
        getattr(errno, "ESTALE", None),  # NFS
        getattr(errno, "EREMOTEIO", None),  # s3fs: S3 InternalError
    )
    if code is not None
)
# Never retried, even when a cause below them looks transient.
PERMANENT = (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError)
# botocore / aiohttp / urllib3 / http.client error classes that mean "try again".
TRANSIENT_CLASS_NAMES = frozenset(
    {
        "EndpointConnectionError",
        "ConnectionClosedError",
        "ConnectTimeoutError",
        "ReadTimeoutError",
        "ProxyConnectionError",
        "HTTPClientError",
        "ResponseStreamingError",
        "IncompleteReadError",
        "ClientConnectorError",
        "ClientOSError",
        "ServerDisconnectedError",
        "ClientPayloadError",
        "ServerTimeoutError",
        "IncompleteRead",
        "RemoteDisconnected",
        "ProtocolError",
        "FSTimeoutError",
    }
)
TRANSIENT_S3_CODES = frozenset(
    {
        "SlowDown",
        "ServiceUnavailable",
        "InternalError",
        "RequestTimeout",
        "RequestTimeTooSkewed",
        "Throttling",
        "ThrottlingException",
        "RequestLimitExceeded",
        "503",
        "500",
    }
)


class StorageUnavailableError(DippipeError, OSError):
    """A transient storage error that outlasted every retry."""


@dataclass(frozen=True)
class RetryPolicy:
    retries: int = 5  # tries after the first one
    wait: float = 1.0  # seconds before the first retry; doubled each time
    max_wait: float = 30.0  # cap of one wait

    def delays(self) -> list[float]:
        """The nominal waits before retry 1, 2, ... (each gets up to 25% jitter)."""
        return [min(self.max_wait, self.wait * 2**n) for n in range(max(0, self.retries))]


def is_transient(error: BaseException) -> bool:
    """True for errors a retry may cure; looks through the exception's causes."""
    for current in causes(error):
        if isinstance(current, (*PERMANENT, StorageUnavailableError)):
            return False  # StorageUnavailableError: already retried to exhaustion below us
        if _transient_here(current):
            return True
    return False


def _transient_here(error: BaseException) -> bool:
    if isinstance(error, (ConnectionError, TimeoutError)):
        return True
    if isinstance(error, OSError) and error.errno in TRANSIENT_ERRNOS:
        return True
    if any(cls.__name__ in TRANSIENT_CLASS_NAMES for cls in type(error).__mro__):
        return True
    response = getattr(error, "response", None)  # botocore ClientError
    if isinstance(response, dict):
        code = str(response.get("Error", {}).get("Code", ""))
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        return code in TRANSIENT_S3_CODES or int(status) >= 500
    return False


def call_with_retry(
    function: Callable[[], T],
    policy: RetryPolicy,
    what: str,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """`function()`, retried on transient errors as `policy` says; `what` names the operation
    in logs and in the final error (e.g. "read s3://bucket/a.png")."""
    started = time.monotonic()
    delays = policy.delays()
    for attempt in range(len(delays) + 1):
        try:
            return function()
        except Exception as error:
            if not is_transient(error):
                raise
            if attempt == len(delays):
                seconds = time.monotonic() - started
                raise StorageUnavailableError(
                    errno.EIO,
                    f"storage unavailable: {printable(what)} failed {attempt + 1} times in "
                    f"{seconds:.0f} s (last error {describe(error)})",
                ) from error
            delay = delays[attempt] * (1 + 0.25 * random.random())
            log.warning(
                "storage: %s failed (%s); retry %d of %d in %.1f s",
                printable(what),
                describe(error),
                attempt + 1,
                len(delays),
                delay,
            )
            sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover


def describe(error: BaseException) -> str:
    """'Type: first line of the message', short enough for a log line."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return printable(f"{type(error).__name__}: {text}" if text else type(error).__name__, 300)
