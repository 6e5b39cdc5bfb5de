"""The one place that talks to fsspec: bytes, Parquet, listings and atomic writes.

Every URI the pipeline touches (local path, ``s3://bucket/key``, ``memory://x``) goes through
:class:`Storage`, so local and object storage behave the same to the rest of the package.

Atomicity: object stores (S3, memory) make a single PUT visible all at once, so they get one
``pipe_file``. A local file is written under a hidden temporary name in the same folder and then
renamed over the target (``os.replace`` is atomic on POSIX), so a reader never sees half a PNG
or half a Parquet file.
"""

from __future__ import annotations

import io
import os
import posixpath
import uuid
from dataclasses import asdict, dataclass
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

# Bytes fetched to read an image header; enough for PNG and nearly every JPEG.
HEADER_BYTES = 1 << 16


@dataclass(frozen=True)
class StorageOptions:
    """S3 settings. Names only, never credentials: keys stay in the AWS environment/profile."""

    endpoint_url: str | None = None
    region: str | None = None
    anonymous: bool = False
    profile: str | None = None

    @classmethod
    def from_env(cls, **overrides: Any) -> StorageOptions:
        """CLI values win; otherwise the standard AWS variables (what botocore reads too)."""
        env = os.environ
        values = {
            "endpoint_url": env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL"),
            "region": env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION"),
            "anonymous": env.get("DIPPIPE_S3_ANONYMOUS", "") in ("1", "true", "yes"),
            "profile": env.get("AWS_PROFILE"),
        }
        values.update({k: v for k, v in overrides.items() if v not in (None, False)})
        return cls(**values)

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


# File systems that live inside one process: Ray workers cannot see the driver's, so the driver
# reads their inputs and writes their outputs (see worker.py).
PROCESS_LOCAL_PROTOCOLS = ("memory",)


def is_process_local(uri: str | None) -> bool:
    return bool(uri) and protocol_of(uri) in PROCESS_LOCAL_PROTOCOLS


def protocol_of(uri: str) -> str:
    return uri.split("://", 1)[0] if "://" in uri else "file"


def join(base: str, *parts: str) -> str:
    """Join URI parts with '/', whatever the protocol (local paths included)."""
    return posixpath.join(base.rstrip("/") if base != "/" else base, *parts)


class Storage:
    """fsspec file systems by protocol, created once and reused (s3fs sessions are costly)."""

    def __init__(self, options: StorageOptions | None = None) -> None:
        self.options = options or StorageOptions()
        self._filesystems: dict[str, fsspec.AbstractFileSystem] = {}

    def resolve(self, uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
        protocol = protocol_of(uri)
        if protocol not in self._filesystems:
            fs, _ = url_to_fs(uri, **self.options.fsspec_kwargs(protocol))
            self._filesystems[protocol] = fs
        fs = self._filesystems[protocol]
        return fs, fs._strip_protocol(uri)

    def exists(self, uri: str) -> bool:
        fs, path = self.resolve(uri)
        return fs.exists(path)

    def is_dir(self, uri: str) -> bool:
        fs, path = self.resolve(uri)
        return fs.isdir(path)

    def read_bytes(self, uri: str) -> bytes:
        fs, path = self.resolve(uri)
        return fs.cat_file(path)

    def read_head(self, uri: str, size: int = HEADER_BYTES) -> bytes:
        """The first `size` bytes (a header), without downloading the whole object."""
        fs, path = self.resolve(uri)
        return fs.cat_file(path, start=0, end=size)

    def write_bytes(self, uri: str, data: bytes) -> None:
        """Write so the target appears whole or not at all."""
        fs, path = self.resolve(uri)
        if not isinstance(fs, LocalFileSystem):
            fs.pipe_file(path, data)  # one PUT: atomic on object stores
            return
        folder, name = os.path.split(path)
        os.makedirs(folder or ".", exist_ok=True)
        tmp = os.path.join(folder, f".{name}.{uuid.uuid4().hex[:12]}.tmp")
        try:
            with open(tmp, "wb") as handle:
                handle.write(data)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    def remove(self, uri: str) -> None:
        fs, path = self.resolve(uri)
        if fs.exists(path):
            fs.rm_file(path)

    def list_files(self, folder_uri: str, suffix: str = "") -> list[str]:
        """URIs of the visible files directly under a folder (hidden temp files are skipped)."""
        fs, path = self.resolve(folder_uri)
        if not fs.exists(path):
            return []
        fs.invalidate_cache(path)
        names = sorted(fs.ls(path, detail=False))
        base = folder_uri.rstrip("/")
        return [
            join(base, posixpath.basename(name))
            for name in names
            if name.endswith(suffix) and not posixpath.basename(name).startswith(".")
        ]

    def open_parquet(self, uri: str) -> pq.ParquetFile:
        """A streaming reader: row groups and batches are read on demand."""
        fs, path = self.resolve(uri)
        return pq.ParquetFile(fs.open(path, "rb"))

    def read_parquet(self, uri: str, columns: list[str] | None = None) -> pa.Table:
        fs, path = self.resolve(uri)
        with fs.open(path, "rb") as handle:
            return pq.read_table(handle, columns=columns)

    def write_parquet(self, uri: str, table: pa.Table) -> None:
        buffer = io.BytesIO()
        pq.write_table(table, buffer, compression="zstd")
        self.write_bytes(uri, buffer.getvalue())
