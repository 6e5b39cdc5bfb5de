"""File systems that misbehave for real: a small tmpfs, a full disk, a folder nobody may
write in (root included)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import struct
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A small tmpfs mounted at `path` (needs root or CAP_SYS_ADMIN; skips otherwise)."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        capture_output=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill_disk(path: Path, leave: int = 0) -> Path:
    """Fill the file system of `path` until `leave` bytes are free; returns the filler."""
    filler = path / "filler.bin"
    with open(filler, "ab") as handle:
        while True:
            free = shutil.disk_usage(path).free - leave
            if free <= 0:
                break
            try:
                handle.write(b"\0" * min(free, 1 << 20))
                handle.flush()
            except OSError:
                break
    return filler


FS_IOC_GETFLAGS, FS_IOC_SETFLAGS, FS_IMMUTABLE_FL = 0x80086601, 0x40086602, 0x00000010


def _set_immutable(path: Path, on: bool) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        flags = struct.unpack("l", fcntl.ioctl(fd, FS_IOC_GETFLAGS, struct.pack("l", 0)))[0]
        flags = flags | FS_IMMUTABLE_FL if on else flags & ~FS_IMMUTABLE_FL
        fcntl.ioctl(fd, FS_IOC_SETFLAGS, struct.pack("l", flags))
    finally:
        os.close(fd)


@contextlib.contextmanager
def unwritable(path: Path) -> Iterator[Path]:
    """Nobody may create files in `path` for the duration: chmod 555 for an ordinary user;
    for root (whom modes do not stop) the file system's immutable flag, which gives EPERM."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        path.chmod(0o555)
        try:
            yield path
        finally:
            path.chmod(0o755)
        return
    try:
        _set_immutable(path, True)
    except OSError as error:
        pytest.skip(f"running as root and {path} cannot be made immutable: {error}")
    try:
        with tempfile.NamedTemporaryFile(dir=path):
            pass
        _set_immutable(path, False)
        pytest.skip("the immutable flag does not stop root here")
    except PermissionError:
        pass
    try:
        yield path
    finally:
        _set_immutable(path, False)


def count_ranged_reads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Make ``Storage.open_read``'s file objects count the bytes they read; returns the list
    that each read appends its size to (what a ranged look at a header really costs)."""
    from pipeline.storage import Storage

    sizes: list[int] = []
    open_read = Storage.open_read

    class Counting:
        def __init__(self, file) -> None:
            self.file = file

        def read(self, size: int = -1) -> bytes:
            data = self.file.read(size)
            sizes.append(len(data))
            return data

        def __getattr__(self, name: str):
            return getattr(self.file, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc) -> None:
            self.file.close()

    monkeypatch.setattr(
        Storage, "open_read", lambda self, uri, *a: Counting(open_read(self, uri, *a))
    )
    return sizes
