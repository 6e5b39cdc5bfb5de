"""Size-aware feeding: a bounded look-ahead over the job stream, so that packs stay full.

A worker with several lanes (``--fits-per-gpu``) packs the fits of its concurrent jobs into one
network only when their *bucket* matches (network, padded height and width; packing.py); a job
of another bucket waits until the pack drains. Fed in manifest order, a mixed-size manifest
therefore runs mostly one fit per pack. The scheduler instead keeps a small buffer of the next
jobs of the manifest (:class:`Lookahead`), learns each one's size from its image header (a few
KiB read by a small thread pool, :class:`KeyReader`; the driver never decodes an image), and
gives a worker's free lane a job whose key matches what that worker already runs.

The key (:func:`job_key`) approximates the bucket: ``(task, scale, params, width, height)`` of
the input image (params as canonical JSON). Images of different sizes that pad to the same size
get different keys (a missed match). Jobs of one key usually share a bucket, not always: an
inpainting network depends on its mask's kind, and a tiled image with a side shorter than a
tile has tiles of another shape; a wrong match only costs occupancy (the job waits for the pack
to drain), never a result. An image the worker will cut into tiles (``WorkerConfig.tile_size``
> 0 and more pixels than ``tile_above``) is keyed by the tile size instead: all its tiles, and
those of every other such image, share one bucket. The worker also tiles by its memory, which
the driver does not model: such images keep their own size as key. A header that cannot be
read or parsed (missing file, corrupt file, any storage error) gives the key
:data:`UNKNOWN`; a header beyond the first 64 KiB (a TIFF's directory, which libtiff writes
after the pixels) is found by a second look that reads ranges on demand. An UNKNOWN job
matches no other and is still run (its worker reports what is wrong with it, if anything):
the run never fails for a header.

Picking (:meth:`Lookahead.pick`), for a free lane of a worker:

1. Retries come first (the scheduler's ``retry`` queue, before the buffer).
2. Fairness: the oldest buffered job is taken as soon as it has been passed over ``max_passes``
   times (a younger job picked before it). Every job is so taken after at most ``max_passes``
   picks once it is the oldest: none starves in the buffer.
3. A worker with no job running takes the oldest buffered job (manifest order), even one whose
   header is still being read: the first job never waits for a read. So does a worker whose
   last job's key is UNKNOWN: for those jobs feeding falls back to manifest order.
4. A worker that runs jobs takes the oldest buffered job whose key equals the key of the job it
   was given last (the pack it fills, or the one queued to follow it). None matching, or that
   key still being read: the lane stays free for now, rather than queue a job that would wait
   for this worker's pack to drain (and keep it from taking a matching job later); it is
   offered again as jobs end or headers arrive. The price: when a pack drains, the next one
   starts once its first job is sent and loaded (a round trip and an image read), not at once.

The buffer holds ``depth x lanes`` jobs (all workers' lanes together; ``RunConfig.lookahead``,
default 4; 0 turns look-ahead off: manifest order, no header reads) and ``max_passes`` defaults
to the buffer's size. It is only used when a worker has more than one lane: with one lane there
is nothing to pack, and no header is read. The driver holds at most the buffer, the reads in
flight and one Parquet batch, whatever the manifest's size; resume is unchanged (the stream
yields only jobs without a result, and a job that leaves the buffer is run).
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Hashable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pipeline.images import ImageDecodeError, image_size, is_tiff, tiff_size_from_file
from pipeline.manifest import Job
from pipeline.storage import Storage

if TYPE_CHECKING:  # the driver's feeding needs nothing else from the worker module
    from pipeline.worker import WorkerConfig

DEFAULT_DEPTH = 4  # buffered jobs per lane (RunConfig.lookahead)
DEFAULT_READERS = 4  # threads reading headers


class _Marker:
    """A key that equals only itself and matches no job (compared by identity)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


PENDING: Any = _Marker("PENDING")  # the header is still being read
UNKNOWN: Any = _Marker("UNKNOWN")  # no usable header: the job is its own bucket


@dataclass(eq=False)
class Entry:
    """One buffered job; ``key`` is set (once, possibly from a reader thread) when known."""

    job: Job
    seq: int  # manifest order among buffered jobs
    key: Hashable = PENDING
    passes: int = 0  # times a younger job was picked before this one

    @property
    def matchable(self) -> bool:
        return self.key is not PENDING and self.key is not UNKNOWN


class Lookahead:
    """The bounded buffer and its picking rule (see the module's docstring); no I/O, no Ray."""

    def __init__(self, capacity: int, max_passes: int | None = None) -> None:
        self.capacity = max(1, capacity)
        self.max_passes = self.capacity if max_passes is None else max(0, max_passes)
        self.entries: list[Entry] = []  # oldest first
        self._seq = 0
        self.picks = 0
        self.matched = 0  # picks that matched the worker's key
        self.forced = 0  # picks made by the fairness bound

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def room(self) -> int:
        return self.capacity - len(self.entries)

    def add(self, job: Job, key: Hashable = PENDING) -> Entry:
        entry = Entry(job, self._seq, key)
        self._seq += 1
        self.entries.append(entry)
        return entry

    def pending(self) -> int:
        return sum(entry.key is PENDING for entry in self.entries)

    def pick(self, target: Hashable | None) -> Entry | None:
        """The job for a free lane whose worker last took a job of key ``target`` (None: the
        worker runs nothing), or None to leave the lane free for now."""
        if not self.entries:
            return None
        oldest = self.entries[0]
        if oldest.passes >= self.max_passes:
            if target is not None and target is not UNKNOWN and oldest.key != target:
                self.forced += 1  # the fairness bound overrode the match
            return self._take(0)
        if target is None or target is UNKNOWN:
            return self._take(0)
        if target is PENDING:
            return None
        for index, entry in enumerate(self.entries):
            if entry.matchable and entry.key == target:
                self.matched += 1
                return self._take(index)
        return None

    def _take(self, index: int) -> Entry:
        for older in self.entries[:index]:
            older.passes += 1
        self.picks += 1
        return self.entries.pop(index)


def job_key(job: Job, size: tuple[int, int], config: WorkerConfig) -> Hashable:
    """The look-ahead key of a job whose input image is ``size`` = (width, height)."""
    params = job.params
    with contextlib.suppress(ValueError, RecursionError):  # bad params: the worker says why
        params = json.dumps(json.loads(params), sort_keys=True) if params else None
    width, height = size
    tile = int(getattr(config, "tile_size", 0) or 0)
    above = getattr(config, "tile_above", None)
    if tile > 0 and above is not None and width * height > above:
        return (job.task, job.scale, params, "tile", tile)
    return (job.task, job.scale, params, width, height)


def read_key(storage: Storage, job: Job, config: WorkerConfig) -> Hashable:
    """The job's key from its image's header; UNKNOWN when that cannot be read or parsed."""
    if not job.image:
        return UNKNOWN
    try:
        head = storage.read_head(job.image)
        try:
            size = image_size(head)
        except ImageDecodeError:
            if not is_tiff(head):
                raise
            with storage.open_read(job.image) as file:  # its IFD lies after its pixels
                size = tiff_size_from_file(file)
        return job_key(job, size, config)
    except Exception:  # ImageDecodeError, a missing file, storage errors: never fail the run
        return UNKNOWN


class KeyReader:
    """Reads the keys of buffered jobs on a few threads; the driver's loop never waits."""

    def __init__(self, storage: Storage, config: WorkerConfig, threads: int = DEFAULT_READERS):
        self.storage, self.config = storage, config
        self.pool = ThreadPoolExecutor(max(1, threads), thread_name_prefix="dippipe-heads")
        self._lock = threading.Lock()
        self.reads = 0
        self.unknown = 0
        self.seconds = 0.0  # summed over the reader threads

    def submit(self, entry: Entry) -> Future[None]:
        return self.pool.submit(self._read, entry)

    def _read(self, entry: Entry) -> None:
        started = time.perf_counter()
        key = read_key(self.storage, entry.job, self.config)
        with self._lock:
            self.reads += 1
            self.unknown += key is UNKNOWN
            self.seconds += time.perf_counter() - started
        entry.key = key

    def stats(self) -> dict[str, Any]:
        with self._lock:
            mean = self.seconds / self.reads if self.reads else None
            return {"header_reads": self.reads, "unknown": self.unknown, "mean_read_s": mean}

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
