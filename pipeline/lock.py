"""One run at a time per OUT: the ``OUT/.lock`` object.

Two runs on the same OUT would both run the pending jobs (duplicate rows) and one would delete
the other's fresh trace shard as an orphan. So ``dippipe run`` first creates ``OUT/.lock``
(JSON: run id, host, pid, process start, heartbeat time), atomically: a hard link on local
disks, a conditional PUT (``If-None-Match: *``) on S3 (see Storage.create_exclusive). While the
run lasts a thread rewrites the heartbeat; at the end the lock is removed.

A second run finds the lock and stops with a message naming the holder, unless the lock is
stale, which it then takes over (with a warning):
- same host and the holder's process is gone (killed, crashed), or
- the heartbeat is older than ``stale_seconds`` (default 10 min; hosts' clocks must agree to
  well within that), or
- ``--force-unlock`` (for a holder known to be dead on another host, sooner than the timeout).

Limits, documented rather than hidden: taking over a stale lock is remove-then-create, so two
runs taking over the same stale lock at the same instant could both succeed; each heartbeat
then checks that the lock is still its own and stops the run that lost it. S3-compatible stores
that ignore ``If-None-Match`` give no exclusion at creation (AWS S3, MinIO and moto honour it).
"""

from __future__ import annotations

import _thread
import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone

from pipeline.errors import DippipeError
from pipeline.retry import describe
from pipeline.safetext import printable
from pipeline.storage import Storage, join

log = logging.getLogger("dippipe")
LOCK_NAME = ".lock"
DEFAULT_STALE_SECONDS = 600.0
_HELD_HERE: set[str] = set()  # run ids of the locks this process holds now


class OutLockedError(DippipeError, RuntimeError):
    """Another live run holds OUT's lock, or the lock cannot be created."""


@dataclass(frozen=True)
class LockInfo:
    run_id: str
    host: str
    pid: int
    process_start: str | None  # /proc start time of pid: tells a reused pid from the holder
    started_at: str
    heartbeat_at: str
    heartbeat_unix: float

    @classmethod
    def parse(cls, data: bytes) -> LockInfo | None:
        try:
            values = json.loads(data)
            return cls(**{name: values[name] for name in cls.__dataclass_fields__})
        except (ValueError, TypeError, KeyError):
            return None

    def encode(self) -> bytes:
        return json.dumps(asdict(self), indent=2).encode()

    def describe(self, now: float) -> str:
        if self.pid < 0:
            return "an unreadable lock file"
        age = max(0.0, now - self.heartbeat_unix)
        return (
            f"run {printable(self.run_id, 80)} on host {printable(self.host, 80)}, "
            f"pid {self.pid}, started {printable(self.started_at, 40)}, "
            f"last heartbeat {age:.0f} s ago"
        )


def process_start(pid: int) -> str | None:
    """The start time of a process (Linux /proc, clock ticks since boot), or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            fields = handle.read().rsplit(b")", 1)[1].split()
        return fields[19].decode()
    except (OSError, IndexError):
        return None


def process_alive(pid: int, start: str | None) -> bool:
    """Whether `pid` still runs here and is the same process (same start time)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: alive
    now_start = process_start(pid)
    return start is None or now_start is None or now_start == start


class OutLock:
    """``with OutLock(storage, out):`` holds OUT for one run (see the module docstring)."""

    def __init__(
        self,
        storage: Storage,
        out: str,
        *,
        stale_seconds: float = DEFAULT_STALE_SECONDS,
        force: bool = False,
        heartbeat_seconds: float | None = None,
        on_lost: Callable[[str], None] | None = None,
    ) -> None:
        self.storage, self.out = storage, out
        self.uri = join(out, LOCK_NAME)
        self.stale_seconds, self.force = stale_seconds, force
        self.heartbeat_seconds = heartbeat_seconds or max(0.5, min(30.0, stale_seconds / 10))
        self.on_lost = on_lost or _interrupt_main
        self.run_id = f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:8]}"
        self.started_at = _now_iso()
        self.took_over: LockInfo | None = None
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> OutLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def info(self) -> LockInfo:
        pid = os.getpid()
        return LockInfo(
            run_id=self.run_id,
            host=socket.gethostname(),
            pid=pid,
            process_start=process_start(pid),
            started_at=self.started_at,
            heartbeat_at=_now_iso(),
            heartbeat_unix=time.time(),
        )

    def read(self) -> LockInfo | None:
        """The lock as stored, None if there is none; an unparsable one reads as stale."""
        try:
            data = self.storage.read_bytes(self.uri)
        except FileNotFoundError:
            return None
        return LockInfo.parse(data) or LockInfo("(unreadable lock)", "?", -1, None, "?", "?", 0.0)

    def acquire(self) -> None:
        for _ in range(3):
            try:
                self.storage.create_exclusive(self.uri, self.info().encode())
            except FileExistsError:
                holder = self.read()
                if holder is None:
                    continue  # released meanwhile: try again
                if holder.run_id == self.run_id:
                    break  # our own first try landed before a retry of the PUT
                reason = self._stale_reason(holder)
                if reason is None:
                    raise OutLockedError(self._locked_message(holder)) from None
                log.warning(
                    "taking over the lock on %s from %s: %s",
                    printable(self.out),
                    holder.describe(time.time()),
                    reason,
                )
                self.took_over = holder
                self.storage.remove(self.uri)
                continue
            except OSError as error:
                raise OutLockedError(
                    f"cannot create the lock {printable(self.uri)}, so nothing was run: "
                    f"{describe(error)}"
                ) from None
            break
        else:
            raise OutLockedError(f"another run keeps taking the lock {printable(self.uri)}")
        _HELD_HERE.add(self.run_id)
        self._thread = threading.Thread(target=self._heartbeat, name="dippipe-lock", daemon=True)
        self._thread.start()

    def _stale_reason(self, holder: LockInfo) -> str | None:
        if self.force:
            return "--force-unlock"
        if holder.pid < 0:
            return "the lock file is unreadable"
        here = holder.host == socket.gethostname()
        if here and holder.pid == os.getpid() and holder.run_id not in _HELD_HERE:
            return "it names this process, which no longer holds it"
        if here and not process_alive(holder.pid, holder.process_start):
            return "its process is gone"
        age = time.time() - holder.heartbeat_unix
        if age > self.stale_seconds:
            return f"no heartbeat for {age:.0f} s (more than {self.stale_seconds:.0f} s)"
        return None

    def _locked_message(self, holder: LockInfo) -> str:
        return (
            f"{printable(self.out)} is in use by another dippipe run "
            f"({holder.describe(time.time())}). Two runs on one OUT would run the same jobs "
            f"twice. Wait for it to finish, or use another --out. If that run is dead, its "
            f"lock is taken over after {self.stale_seconds:.0f} s without a heartbeat, or at "
            f"once with --force-unlock."
        )

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.heartbeat_seconds):
            try:
                holder = self.read()
                if holder is None or holder.run_id != self.run_id:
                    self.lost = True
                    who = "nobody" if holder is None else holder.describe(time.time())
                    self.on_lost(f"this run lost the lock on {printable(self.out)} (now: {who})")
                    return
                self.storage.write_bytes(self.uri, self.info().encode())
            except Exception as error:  # storage down for a while: keep trying
                log.warning("lock heartbeat on %s failed: %s", printable(self.out), describe(error))

    def release(self) -> None:
        _HELD_HERE.discard(self.run_id)
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        if self.lost:
            return
        with contextlib.suppress(Exception):
            holder = self.read()
            if holder is not None and holder.run_id == self.run_id:
                self.storage.remove(self.uri)
                return
            log.warning("the lock on %s is no longer this run's: left in place", self.out)


def _interrupt_main(message: str) -> None:
    """Default on_lost: stop the run like Ctrl-C (finished jobs are kept; rerun resumes)."""
    log.error("%s; stopping this run", message)
    _thread.interrupt_main()


def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
