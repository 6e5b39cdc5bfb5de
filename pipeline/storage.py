"""The one place that talks to fsspec: bytes, Parquet, listings and atomic writes.

Every URI the pipeline touches (local path, ``s3://bucket/key``, ``memory://x``) goes through
:class:`Storage`, so local and object storage behave the same to the rest of the package.

Atomicity: object stores (S3, memory) make a single PUT visible all at once, so they get one
``pipe_file``. A local file is written under a hidden temporary name in the same folder and then
renamed over the target (``os.replace`` is atomic on POSIX), so a reader never sees half a PNG
or half a Parquet file.

Transient errors (connection refused or reset, timeouts, S3 5xx / throttling) are retried
with exponential backoff, a bounded number of times (``StorageOptions.retries`` /
``retry_wait``; see retry.py); other errors (not found, permission denied, disk full) are
raised at once, so a job fails with its real reason.

Exclusive creation (:meth:`Storage.create_exclusive`, used by the OUT lock): a hard link on
local disks, a conditional PUT (``If-None-Match: *``) on S3, the file system's own "create"
mode elsewhere (atomic for memory://, a check-then-write for the rest).
"""

from __future__ import annotations

import contextlib
import io
import os
import posixpath
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

from pipeline.retry import RetryPolicy, call_with_retry, is_transient

T = TypeVar("T")

# Bytes fetched to read an image header; enough for PNG and nearly every JPEG.
HEADER_BYTES = 1 << 16


@dataclass(frozen=True)
class StorageOptions:
    """S3 settings. Names only, never credentials: keys stay in the AWS environment/profile."""

    endpoint_url: str | None = None
    region: str | None = None
    anonymous: bool = False
    profile: str | None = None
    # Transient errors: tries after the first, and the first wait (doubled each time).
    retries: int = 5
    retry_wait: float = 1.0

    @classmethod
    def from_env(cls, **overrides: Any) -> StorageOptions:
        """CLI values win; otherwise the standard AWS variables (what botocore reads too)
        and DIPPIPE_IO_RETRIES / DIPPIPE_IO_RETRY_WAIT."""
        env = os.environ
        values = {
            "endpoint_url": env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL"),
            "region": env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION"),
            "anonymous": env.get("DIPPIPE_S3_ANONYMOUS", "") in ("1", "true", "yes"),
            "profile": env.get("AWS_PROFILE"),
            "retries": _env_number("DIPPIPE_IO_RETRIES", int, cls.retries),
            "retry_wait": _env_number("DIPPIPE_IO_RETRY_WAIT", float, cls.retry_wait),
        }
        values.update({k: v for k, v in overrides.items() if v is not None and v is not False})
        values["retries"] = max(0, int(values["retries"]))
        values["retry_wait"] = max(0.0, float(values["retry_wait"]))
        return cls(**values)

    def retry_policy(self) -> RetryPolicy:
        return RetryPolicy(retries=self.retries, wait=self.retry_wait)

    def fsspec_kwargs(self, protocol: str) -> dict[str, Any]:
        if protocol not in ("s3", "s3a"):
            return {}
        client: dict[str, Any] = {}
        if self.endpoint_url:
            client["endpoint_url"] = self.endpoint_url
        if self.region:
            client["region_name"] = self.region
        kwargs: dict[str, Any] = {"anon": self.anonymous, "client_kwargs": client}
        if self.profile:
            kwargs["profile"] = self.profile
        return kwargs

    def public(self) -> dict[str, Any]:
        """What may be written to run.json and logs."""
        return asdict(self)


def _env_number(name: str, kind: type, default: Any) -> Any:
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        return kind(value)
    except ValueError:
        raise ValueError(f"{name} must be a number, got {value!r}") from None


# File systems that live inside one process: Ray workers cannot see the driver's, so the driver
# reads their inputs and writes their outputs (see worker.py).
PROCESS_LOCAL_PROTOCOLS = ("memory",)


def is_process_local(uri: str | None) -> bool:
    return bool(uri and protocol_of(uri) in PROCESS_LOCAL_PROTOCOLS)


def is_local_path(uri: str) -> bool:
    """A path of this machine's file system (a plain path or file://)."""
    return protocol_of(uri) in ("file", "local")


def protocol_of(uri: str) -> str:
    return uri.split("://", 1)[0] if "://" in uri else "file"


def join(base: str, *parts: str) -> str:
    """Join URI parts with '/', whatever the protocol (local paths included)."""
    return posixpath.join(base.rstrip("/") if base != "/" else base, *parts)


class Storage:
    """fsspec file systems by protocol, created once and reused (s3fs sessions are costly).

    Every operation is retried on transient errors as ``options.retries`` / ``retry_wait``
    say; all of them are idempotent (a write replaces the whole target)."""

    def __init__(self, options: StorageOptions | None = None) -> None:
        self.options = options or StorageOptions()
        self.retry_policy = self.options.retry_policy()
        self._filesystems: dict[str, fsspec.AbstractFileSystem] = {}

    def resolve(self, uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
        protocol = protocol_of(uri)
        if protocol not in self._filesystems:
            fs, _ = url_to_fs(uri, **self.options.fsspec_kwargs(protocol))
            self._filesystems[protocol] = fs
        fs = self._filesystems[protocol]
        return fs, fs._strip_protocol(uri)

    def _retrying(self, what: str, function: Callable[[], T]) -> T:
        return call_with_retry(function, self.retry_policy, what)

    def exists(self, uri: str) -> bool:
        fs, path = self.resolve(uri)
        return self._retrying(f"check {uri}", lambda: fs.exists(path))

    def is_dir(self, uri: str) -> bool:
        fs, path = self.resolve(uri)
        return self._retrying(f"check {uri}", lambda: fs.isdir(path))

    def read_bytes(self, uri: str) -> bytes:
        fs, path = self.resolve(uri)
        return self._retrying(f"read {uri}", lambda: fs.cat_file(path))

    def read_head(self, uri: str, size: int = HEADER_BYTES) -> bytes:
        """The first `size` bytes (a header), without downloading the whole object."""
        fs, path = self.resolve(uri)
        return self._retrying(f"read {uri}", lambda: fs.cat_file(path, start=0, end=size))

    def open_read(self, uri: str, block_size: int = HEADER_BYTES) -> Any:
        """A file object that reads `block_size` ranges on demand (a header found anywhere in
        a large object, without downloading it). Only the open is retried, not its reads."""
        fs, path = self.resolve(uri)
        return self._retrying(f"open {uri}", lambda: fs.open(path, "rb", block_size=block_size))

    def write_bytes(self, uri: str, data: bytes) -> None:
        """Write so the target appears whole or not at all."""
        fs, path = self.resolve(uri)
        if isinstance(fs, LocalFileSystem):
            self._retrying(f"write {uri}", lambda: _write_local(path, data))
        else:  # one PUT: atomic on object stores
            self._retrying(f"write {uri}", lambda: fs.pipe_file(path, data))

    def create_exclusive(self, uri: str, data: bytes) -> None:
        """Write `data` to `uri` only if nothing is there; FileExistsError otherwise.

        Atomic on local disks and S3 (If-None-Match: *). A retried S3 PUT whose first try
        landed raises FileExistsError: callers read the object back to tell it is theirs."""
        fs, path = self.resolve(uri)
        if isinstance(fs, LocalFileSystem):
            self._retrying(f"create {uri}", lambda: _create_local(path, data))
        else:
            self._retrying(f"create {uri}", lambda: fs.pipe_file(path, data, mode="create"))

    def remove(self, uri: str) -> None:
        fs, path = self.resolve(uri)

        def remove() -> None:
            with contextlib.suppress(FileNotFoundError):
                fs.rm_file(path)

        self._retrying(f"remove {uri}", remove)

    def list_files(self, folder_uri: str, suffix: str = "") -> list[str]:
        """URIs of the visible files directly under a folder (hidden temp files are skipped)."""
        fs, path = self.resolve(folder_uri)

        def names() -> list[str]:
            if not fs.exists(path):
                return []
            fs.invalidate_cache(path)
            return sorted(fs.ls(path, detail=False))

        base = folder_uri.rstrip("/")
        return [
            join(base, posixpath.basename(name))
            for name in self._retrying(f"list {folder_uri}", names)
            if name.endswith(suffix) and not posixpath.basename(name).startswith(".")
        ]

    def open_parquet(self, uri: str) -> pq.ParquetFile:
        """A streaming reader: row groups and batches are read on demand."""
        fs, path = self.resolve(uri)
        return self._retrying(f"open {uri}", lambda: pq.ParquetFile(fs.open(path, "rb")))

    def iter_parquet_batches(
        self, uri: str, batch_size: int, columns: list[str] | None = None
    ) -> Iterator[pa.RecordBatch]:
        """Record batches in file order; a transient error mid-file reopens the file and
        skips the rows already yielded (same retry bounds as every other operation)."""
        done, failures = 0, 0
        delays = self.retry_policy.delays()
        while True:
            try:
                parquet = self.open_parquet(uri)
                for batch in _skip_rows(
                    parquet.iter_batches(batch_size=batch_size, columns=columns), done
                ):
                    yield batch
                    done += batch.num_rows
                return
            except Exception as error:
                if not is_transient(error) or failures >= len(delays):
                    raise
                time.sleep(delays[failures])
                failures += 1

    def read_parquet(self, uri: str, columns: list[str] | None = None) -> pa.Table:
        fs, path = self.resolve(uri)

        def read() -> pa.Table:
            with fs.open(path, "rb") as handle:
                return pq.read_table(handle, columns=columns)

        return self._retrying(f"read {uri}", read)

    def write_parquet(self, uri: str, table: pa.Table) -> None:
        buffer = io.BytesIO()
        pq.write_table(table, buffer, compression="zstd")
        self.write_bytes(uri, buffer.getvalue())


def _skip_rows(batches: Iterator[pa.RecordBatch], skip: int) -> Iterator[pa.RecordBatch]:
    for batch in batches:
        if skip >= batch.num_rows:
            skip -= batch.num_rows
            continue
        yield batch.slice(skip) if skip else batch
        skip = 0


def _temp_name(path: str) -> str:
    """A hidden name beside `path`: list_files skips it, sweep_temp_files removes leftovers."""
    folder, name = os.path.split(path)
    return os.path.join(folder, f".{name}.{uuid.uuid4().hex[:12]}.tmp")


def _write_local(path: str, data: bytes) -> None:
    """Write a hidden temporary file, then rename it over the target (atomic on POSIX)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = _temp_name(path)
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _create_local(path: str, data: bytes) -> None:
    """Write a hidden temporary file, then hard-link it to the target: the link fails if the
    target exists, and a reader never sees the target half written."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = _temp_name(path)
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise
        except OSError:  # no hard links here (some network file systems): O_EXCL instead
            with open(path, "xb") as handle:
                handle.write(data)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


TEMP_SUFFIX = ".tmp"


def is_temp_name(name: str) -> bool:
    """Our temporary names: '.<target>.<12 hex>.tmp'."""
    parts = name.rsplit(".", 2)
    return (
        name.startswith(".")
        and name.endswith(TEMP_SUFFIX)
        and len(parts) == 3
        and len(parts[1]) == 12
        and all(c in "0123456789abcdef" for c in parts[1])
    )
