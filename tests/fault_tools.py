"""Tools for the fault-injection tests: real processes, real file systems, real sockets.

Only processes that the tests start are ever signalled: children found through /proc from a
PID we hold (descendants, or the session of a process started with ``start_new_session``).
Never a name-based kill: other Ray clusters may run on the same machine.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.outputs import read_results
from pipeline.storage import Storage

DIPPIPE = [sys.executable, "-c", "from pipeline.cli import app; app()"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --------------------------------------------------------------------------- processes


def _stat(pid: int) -> list[str] | None:
    """/proc/<pid>/stat fields after the command name: [state, ppid, pgrp, session, ...]."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            return handle.read().rsplit(b")", 1)[1].decode().split()
    except OSError:
        return None


def _all_pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return handle.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def descendants(pid: int) -> list[int]:
    """Every live process below `pid` (children, grandchildren, ...)."""
    children: dict[int, list[int]] = {}
    for other in _all_pids():
        fields = _stat(other)
        if fields and fields[0] != "Z":
            children.setdefault(int(fields[1]), []).append(other)
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def session_members(session_id: int) -> list[int]:
    """Live processes of a session (a child started with start_new_session=True leads one)."""
    members = []
    for pid in _all_pids():
        fields = _stat(pid)
        if fields and fields[0] != "Z" and int(fields[3]) == session_id:
            members.append(pid)
    return members


def fit_actor_pids(root: int, running_only: bool = True) -> list[int]:
    """Our FitActor worker processes below `root` ('ray::FitActor.run' while fitting)."""
    title = "ray::FitActor.run" if running_only else "ray::FitActor"
    return [pid for pid in descendants(root) if cmdline(pid).startswith(title)]


def ray_temp_dirs(pids: list[int]) -> set[str]:
    """The /tmp/dpr-* Ray temp dirs named on these processes' command lines."""
    found = set()
    for pid in pids:
        found.update(re.findall(r"(/tmp/dpr-[A-Za-z0-9_]+)", cmdline(pid)))
    return found


def kill_session(leader: int) -> None:
    """SIGKILL what is left of a session we started, and remove its Ray temp dir."""
    members = session_members(leader)
    temp_dirs = ray_temp_dirs(members)
    for pid in members:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 15
    while session_members(leader) and time.monotonic() < deadline:
        time.sleep(0.1)
    for folder in temp_dirs:
        shutil.rmtree(folder, ignore_errors=True)


def start_dippipe(*args: str, env: dict | None = None) -> subprocess.Popen:
    """`dippipe ARGS` in its own session (so it and its embedded Ray can be cleaned up)."""
    return subprocess.Popen(
        [*DIPPIPE, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env=env,
    )


def finish(process: subprocess.Popen, timeout: float = 180) -> str:
    try:
        output = process.communicate(timeout=timeout)[0].decode(errors="replace")
    finally:
        kill_session(process.pid)
    return output


# --------------------------------------------------------------------------- outputs


def results(out: str, storage: Storage | None = None) -> list[dict]:
    storage = storage or Storage()
    if "://" not in out and not (Path(out) / "results").exists():
        return []
    return read_results(storage, out).to_pylist()


def assert_exactly_once(out: str, ids: list[str], storage: Storage | None = None) -> dict:
    rows = results(out, storage)
    found = [row["id"] for row in rows]
    assert sorted(found) == sorted(ids), f"missing {set(ids) - set(found)}, rows {sorted(found)}"
    return {row["id"]: row for row in rows}


def assert_no_partial_files(out: Path) -> None:
    """Nothing hidden (temporary files, a lock) and every PNG / Parquet file readable."""
    import pyarrow.parquet as pq

    from pipeline.images import decode_image

    hidden = [p for p in out.rglob(".*") if p.is_file()]
    assert not hidden, f"left behind: {hidden}"
    for path in out.rglob("*.png"):
        decode_image(path.read_bytes())
    for path in out.rglob("*.parquet"):
        pq.read_table(path)


# --------------------------------------------------------------------------- file systems


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


# --------------------------------------------------------------------------- network

PROXY_CODE = """
import asyncio, sys

async def pipe(reader, writer):
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except Exception:
        pass
    finally:
        writer.close()

async def handle(client_reader, client_writer):
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", int(sys.argv[2]))
    except OSError:
        client_writer.close()
        return
    await asyncio.gather(pipe(client_reader, writer), pipe(reader, client_writer))

async def main():
    server = await asyncio.start_server(handle, "127.0.0.1", int(sys.argv[1]))
    print("ready", flush=True)
    await server.serve_forever()

asyncio.run(main())
"""


class TcpProxy:
    """The S3 endpoint the pipeline sees: a TCP forwarder to moto in its own process.

    Stopping it (SIGKILL) makes the endpoint vanish exactly as a crashed server does
    (connections reset, new ones refused) while moto's store, behind it, survives, as a real
    S3 / MinIO keeps its data across a restart. Started again on the same port."""

    def __init__(self, target_port: int) -> None:
        self.port, self.target_port = free_port(), target_port
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        deadline = time.monotonic() + 20
        while True:  # the port may linger a moment after a kill
            self.process = subprocess.Popen(
                [sys.executable, "-c", PROXY_CODE, str(self.port), str(self.target_port)],
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
            )
            if self.process.stdout.readline().strip() == b"ready":
                return
            self.process.wait()
            if time.monotonic() > deadline:
                raise RuntimeError("the proxy could not listen again")
            time.sleep(0.2)

    def kill(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
