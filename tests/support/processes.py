"""Processes the tests start, and only those: found through /proc from a PID we hold
(descendants, or the session of a process started with ``start_new_session``) and signalled by
PID. Never a name-based kill: other Ray clusters may run on the same machine."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time

DIPPIPE = [sys.executable, "-c", "from pipeline.cli import app; app()"]


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
