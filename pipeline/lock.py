"""One run at a time per OUT: the ``OUT/.lock`` object.

Two runs on the same OUT would both run the pending jobs (duplicate rows) and one would delete
the other's fresh trace shard as an orphan. So ``dippipe run`` first creates ``OUT/.lock``
(JSON: run id, host, pid, process start, heartbeat time), atomically: a hard link on local
disks, a conditional PUT (``If-None-Match: *``) on S3 (see Storage.create_exclusive). While the
run lasts a thread rewrites the heartbeat every ``heartbeat_seconds`` (at most
``HEARTBEAT_MAX_SECONDS``, 30 s); at the end the lock is removed.

Ages are measured by the storage's clock: the lock object's modification time against that of
a probe object written now, both as the storage reports them, so no writer's clock is trusted
(a host whose clock runs an hour late neither steals a live lock nor keeps a dead one). Only
when the storage cannot report a modification time is the heartbeat's own timestamp used.

A second run finds the lock and stops with a message naming the holder, unless the lock is
stale, which it then takes over (with a warning):
- same host and the holder's process is gone (killed, crashed), or
- the same owner, and no heartbeat for more than ``OWNER_TAKEOVER_SECONDS`` (75 s: two and a
  half of the longest heartbeat interval, so a live holder, refreshing every 30 s at most, is
  never taken over). The owner is ``$DIPPIPE_OWNER_ID``, set, non-empty and equal to the
  holder's: an orchestrator sets it to the identity of one logical job (deploy/entrypoint.sh:
  the RayJob's namespace and name), so a retry of that job on a fresh cluster, whose driver
  has a new host name and cannot see the old process, takes a dead attempt's lock over within
  about a minute instead of after ``stale_seconds``. The old attempt may still be running
  (KubeRay can start the retry while the old head pod is in its termination grace period,
  its driver flushing): while the same owner's heartbeat is fresh the retry waits (polling
  every ``OWNER_POLL_SECONDS``) for the lock to be released or to go quiet, up to
  ``stale_seconds``, and is then refused like anyone else. Never when that holder is a live
  process on this very host; or
- no heartbeat for more than ``stale_seconds`` (default 10 min), by the storage's clock; or
- ``--force-unlock`` (for a holder known to be dead on another host, sooner than the timeout).

A run that finds its lock gone or someone else's sets ``OutLock.lost`` and calls ``on_lost``
(default: interrupt the main thread like Ctrl-C). Its caller must then write nothing more to
OUT (no final flush, no compaction): the new holder owns OUT. ``OutLock.still_held()`` reads
the lock again on demand, for a check right before such a write.

Limits, documented rather than hidden: taking over a stale lock is remove-then-create, so two
runs taking over the same stale lock at the same instant could both succeed; each heartbeat
then checks that the lock is still its own and stops the run that lost it. The heartbeat
checks ownership immediately before each rewrite, but the storage offers no conditional
overwrite (no compare-and-swap: Storage has no ``If-Match`` write), so a holder stalled for
more than ``OWNER_TAKEOVER_SECONDS`` (or ``stale_seconds``) whose read still shows its own lock
can overwrite a takeover that lands between that read and its write (one storage round trip,
longer while the write is being retried). The taker's next heartbeat then finds the old run's
lock and stops the taker, so one holder remains, but both may write results until then (up to
one heartbeat interval). S3-compatible stores that ignore ``If-None-Match`` give no exclusion
at creation (AWS S3, MinIO and moto honour it).
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
HEARTBEAT_MAX_SECONDS = 30.0  # the longest interval between two heartbeats of a holder
# A same owner's lock is taken over after this long without a heartbeat (storage's clock):
# 2.5 heartbeat intervals, so a live holder (even one slow write late) is never taken over.
OWNER_TAKEOVER_SECONDS = 2.5 * HEARTBEAT_MAX_SECONDS
OWNER_POLL_SECONDS = 5.0  # how often a same-owner retry looks again at a fresh lock
# The identity of one logical job across its retries (module docstring); empty = none.
OWNER_ENV = "DIPPIPE_OWNER_ID"
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
    heartbeat_unix: float  # the writer's clock: shown to people, trusted only as a fallback
    owner: str = ""  # $DIPPIPE_OWNER_ID of the holder; absent in locks of older versions

    @classmethod
    def parse(cls, data: bytes) -> LockInfo | None:
        try:
            values = json.loads(data)
            fields = {name: values[name] for name in cls.__dataclass_fields__ if name != "owner"}
            return cls(**fields, owner=str(values.get("owner") or ""))
        except (ValueError, TypeError, KeyError):
            return None

    def encode(self) -> bytes:
        return json.dumps(asdict(self), indent=2).encode()

    def describe(self, now: float) -> str:
        if self.pid < 0:
            return "an unreadable lock file"
        age = max(0.0, now - self.heartbeat_unix)
        owner = f", owner {printable(self.owner, 120)}" if self.owner else ""
        return (
            f"run {printable(self.run_id, 80)} on host {printable(self.host, 80)}, "
            f"pid {self.pid}{owner}, started {printable(self.started_at, 40)}, "
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
        owner: str | None = None,
        owner_takeover_seconds: float = OWNER_TAKEOVER_SECONDS,
        owner_wait_seconds: float | None = None,
    ) -> None:
        self.storage, self.out = storage, out
        self.uri = join(out, LOCK_NAME)
        self.stale_seconds, self.force = stale_seconds, force
        # Never longer than HEARTBEAT_MAX_SECONDS: OWNER_TAKEOVER_SECONDS relies on it.
        self.heartbeat_seconds = min(
            HEARTBEAT_MAX_SECONDS, heartbeat_seconds or max(0.5, stale_seconds / 10)
        )
        self.owner_takeover_seconds = owner_takeover_seconds
        # How long a same-owner retry waits for a fresh lock to be released or to go quiet.
        self.owner_wait_seconds = (
            stale_seconds if owner_wait_seconds is None else owner_wait_seconds
        )
        self.on_lost = on_lost or _interrupt_main
        self.owner = (os.environ.get(OWNER_ENV, "") if owner is None else owner).strip()
        self.run_id = f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:8]}"
        self.started_at = _now_iso()
        self.took_over: LockInfo | None = None
        # True once this run found its lock gone or someone else's: write nothing more to OUT.
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
            owner=self.owner,
        )

    def read(self) -> LockInfo | None:
        """The lock as stored, None if there is none; an unparsable one reads as stale."""
        try:
            data = self.storage.read_bytes(self.uri)
        except FileNotFoundError:
            return None
        return LockInfo.parse(data) or LockInfo("(unreadable lock)", "?", -1, None, "?", "?", 0.0)

    def acquire(self) -> None:
        retries, waiting_since = 0, None
        while True:
            try:
                self.storage.create_exclusive(self.uri, self.info().encode())
            except FileExistsError:
                holder = self.read()
                if holder is not None and holder.run_id == self.run_id:
                    break  # our own first try landed before a retry of the PUT
                if holder is not None:
                    reason = self._stale_reason(holder)
                    if reason is None and self._same_owner_elsewhere(holder):
                        # Maybe the previous attempt, still stopping: wait for it to release
                        # the lock or to go quiet (module docstring), not at once.
                        if waiting_since is None:
                            waiting_since = time.monotonic()
                            log.warning(
                                "waiting up to %.0f s for %s (same owner) to release the lock "
                                "on %s or to go %.0f s without a heartbeat",
                                self.owner_wait_seconds,
                                holder.describe(time.time()),
                                printable(self.out),
                                self.owner_takeover_seconds,
                            )
                        waited = time.monotonic() - waiting_since
                        if waited < self.owner_wait_seconds:
                            time.sleep(min(OWNER_POLL_SECONDS, self.owner_wait_seconds - waited))
                            continue
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
                retries += 1  # released meanwhile, or taken over: try again
                if retries >= 3:
                    raise OutLockedError(
                        f"another run keeps taking the lock {printable(self.uri)}"
                    ) from None
                continue
            except OSError as error:
                raise OutLockedError(
                    f"cannot create the lock {printable(self.uri)}, so nothing was run: "
                    f"{describe(error)}"
                ) from None
            break
        _HELD_HERE.add(self.run_id)
        self._thread = threading.Thread(target=self._heartbeat, name="dippipe-lock", daemon=True)
        self._thread.start()

    def _alive_here(self, holder: LockInfo) -> bool:
        return holder.host == socket.gethostname() and process_alive(
            holder.pid, holder.process_start
        )

    def _same_owner_elsewhere(self, holder: LockInfo) -> bool:
        """The holder is this run's owner (a previous attempt of the same logical job) and not
        a live process on this host."""
        return bool(self.owner) and holder.owner == self.owner and not self._alive_here(holder)

    def _stale_reason(self, holder: LockInfo) -> str | None:
        if self.force:
            return "--force-unlock"
        if holder.pid < 0:
            return "the lock file is unreadable"
        here = holder.host == socket.gethostname()
        if here and holder.pid == os.getpid() and holder.run_id not in _HELD_HERE:
            return "it names this process, which no longer holds it"
        if here and not self._alive_here(holder):
            return "its process is gone"
        age, clock = self.storage_age(), "the storage's clock"
        if age is None:  # the storage reports no modification times: the writer's clock
            age, clock = time.time() - holder.heartbeat_unix, "the lock writer's clock"
        if self._same_owner_elsewhere(holder) and age > self.owner_takeover_seconds:
            return (
                f"it belongs to the same owner ({OWNER_ENV}={printable(self.owner, 120)}) "
                f"and had no heartbeat for {age:.0f} s by {clock} "
                f"(more than {self.owner_takeover_seconds:.0f} s)"
            )
        if age > self.stale_seconds:
            return f"no heartbeat for {age:.0f} s by {clock} (more than {self.stale_seconds:.0f} s)"
        return None

    def storage_age(self) -> float | None:
        """Seconds since the lock was last written, read off the storage's clock alone: the
        lock's modification time against that of a probe object written now (a hidden temp
        name, so a probe left by a crash is swept like any temp file). None if the storage
        cannot tell (no lock, no modification times, the probe cannot be written)."""
        probe = join(self.out, f".lock-clock.{uuid.uuid4().hex[:12]}.tmp")
        try:
            written = self._modified(self.uri)
            self.storage.write_bytes(probe, b"")
            try:
                now = self._modified(probe)
            finally:
                self.storage.remove(probe)
        except Exception as error:  # any storage trouble: fall back, never crash the check
            log.debug("no storage clock for %s: %s", printable(self.uri), describe(error))
            return None
        return max(0.0, now - written)

    def _modified(self, uri: str) -> float:
        fs, path = self.storage.resolve(uri)
        fs.invalidate_cache(path)  # s3fs caches listings: ask the storage itself
        stamp = fs.modified(path)
        if stamp.tzinfo is None:  # fsspec returns UTC; some backends leave it naive
            stamp = stamp.replace(tzinfo=timezone.utc)
        return stamp.timestamp()

    def _locked_message(self, holder: LockInfo) -> str:
        owner = ""
        if self._same_owner_elsewhere(holder):
            owner = (
                f" It has the same owner ({OWNER_ENV}) and kept its heartbeat for the "
                f"{self.owner_wait_seconds:.0f} s waited; a dead one is taken over after "
                f"{self.owner_takeover_seconds:.0f} s without a heartbeat."
            )
        return (
            f"{printable(self.out)} is in use by another dippipe run "
            f"({holder.describe(time.time())}). Two runs on one OUT would run the same jobs "
            f"twice. Wait for it to finish, or use another --out. If that run is dead, its "
            f"lock is taken over after {self.stale_seconds:.0f} s without a heartbeat, or at "
            f"once with --force-unlock.{owner}"
        )

    def still_held(self) -> bool:
        """Read the lock now: whether it is still this run's. False (and ``lost`` set) once it
        is gone or another run's; a storage error leaves the answer to ``lost``. Meant for a
        check right before a final write to OUT, fresher than the last heartbeat."""
        if self.lost:
            return False
        try:
            holder = self.read()
        except Exception as error:
            log.warning("cannot read the lock on %s: %s", printable(self.out), describe(error))
            return not self.lost
        if holder is None or holder.run_id != self.run_id:
            self.lost = True
        return not self.lost

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.heartbeat_seconds):
            try:
                payload = self.info().encode()  # built first: the check is right before the write
                holder = self.read()
                if holder is None or holder.run_id != self.run_id:
                    self.lost = True
                    who = "nobody" if holder is None else holder.describe(time.time())
                    self.on_lost(f"this run lost the lock on {printable(self.out)} (now: {who})")
                    return
                if self._stop.is_set():  # released meanwhile: rewrite nothing
                    return
                # Not a compare-and-swap (the storage has none): see the module docstring.
                self.storage.write_bytes(self.uri, payload)
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
            self.lost = True
            log.warning("the lock on %s is no longer this run's: left in place", self.out)


def _interrupt_main(message: str) -> None:
    """Default on_lost: stop the run like Ctrl-C (finished jobs are kept; rerun resumes)."""
    log.error("%s; stopping this run", message)
    _thread.interrupt_main()


def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
