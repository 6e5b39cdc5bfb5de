"""Which shards under OUT/results are live, and reading many shards at once.

A compacted results shard (``compact-<tag>-<n>.parquet``, see compaction.py) names in its
Parquet schema metadata (REPLACES_KEY, a JSON list) the shards whose rows it now holds. A crash
after it was written and before its sources were deleted leaves those sources in place: every
reader ignores a shard that some listed shard replaces, so each row is seen exactly once, and
the next run deletes them. Only ``compact-`` shards carry such a list, so the live set costs a
listing plus one footer read per compacted shard (they are few and large).

Reads go through a thread pool (workers_for): on S3 a small shard costs round trips, not
bandwidth, so READ_WORKERS (16) at a time; a local disk is CPU-bound, LOCAL_READ_WORKERS (4).
A shard is fetched whole in one request (storage.read_bytes, with the storage layer's
retries). A reader racing a run's compaction (e.g. `dippipe report` while the run goes) can
find a listed shard gone: it lists again (FileNotFoundError after RELIST_TRIES).
"""

from __future__ import annotations

import collections
import json
import posixpath
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.retry import call_with_retry
from pipeline.storage import Storage, join, protocol_of

T = TypeVar("T")
R = TypeVar("R")

# Shards read at once (threads). Object stores are latency-bound: many in flight. A local disk
# is CPU-bound (Parquet footers): more threads than a few only contend for the GIL.
READ_WORKERS = 16
LOCAL_READ_WORKERS = 4
COMPACT_PREFIX = "compact-"
REPLACES_KEY = b"dippipe.replaces"
SUFFIX = ".parquet"
RELIST_TRIES = 5


def name_of(uri: str) -> str:
    return posixpath.basename(uri)


def workers_for(uri: str) -> int:
    return LOCAL_READ_WORKERS if protocol_of(uri) == "file" else READ_WORKERS


def parallel_map(
    function: Callable[[T], R], items: Iterable[T], workers: int | None = None
) -> Iterator[R]:
    """`function` over `items` on `workers` threads (None: READ_WORKERS), results in order;
    at most 2 x workers are in flight or waiting, so a long list is streamed, never held
    whole. The first error is raised (the calls not started yet are cancelled)."""
    items = list(items)
    workers = READ_WORKERS if workers is None else workers
    if workers <= 1 or len(items) <= 1:
        yield from map(function, items)
        return
    with ThreadPoolExecutor(max_workers=min(workers, len(items))) as pool:
        queue: collections.deque[Future[R]] = collections.deque()
        rest = iter(items)
        try:
            for item in rest:
                queue.append(pool.submit(function, item))
                if len(queue) >= 2 * workers:
                    break
            while queue:
                result = queue.popleft().result()
                for item in rest:
                    queue.append(pool.submit(function, item))
                    break
                yield result
        finally:
            for future in queue:
                future.cancel()


def read_shard(storage: Storage, uri: str, columns: Iterable[str] | None = None) -> pa.Table:
    """One shard, in one request (a GET on S3), with the `columns` it has (a shard of an
    older version may lack some); its schema metadata is kept."""
    data = storage.read_bytes(uri)  # retried on transient errors
    parquet = pq.ParquetFile(pa.BufferReader(data))
    names = None if columns is None else [c for c in columns if c in parquet.schema_arrow.names]
    return parquet.read(columns=names, use_threads=False)  # shards are read in parallel


def replaces(metadata: dict[bytes, bytes] | None) -> list[str]:
    """The shard names a compacted shard's schema metadata says it replaces."""
    if not metadata or REPLACES_KEY not in metadata:
        return []
    return [str(name) for name in json.loads(metadata[REPLACES_KEY])]


def _footer_replaces(storage: Storage, uri: str) -> list[str]:
    fs, path = storage.resolve(uri)

    def read() -> list[str]:
        with fs.open(path, "rb") as handle:
            return replaces(pq.read_schema(handle).metadata)

    return call_with_retry(read, storage.retry_policy, f"read {uri}")


def results_folder(out: str) -> str:
    return join(out, "results")


def traces_folder(out: str) -> str:
    return join(out, "traces")


def live_shards(storage: Storage, out: str) -> tuple[list[str], set[str]]:
    """(URIs of the live results shards, names of every shard a compacted shard replaces)."""
    for _ in range(RELIST_TRIES):
        listed = storage.list_files(results_folder(out), SUFFIX)
        compacted = [u for u in listed if name_of(u).startswith(COMPACT_PREFIX)]
        try:
            footers = parallel_map(
                lambda u: _footer_replaces(storage, u), compacted, workers_for(out)
            )
            replaced = {n for names in footers for n in names}
        except FileNotFoundError:  # compacted again since the listing: list again
            continue
        return [u for u in listed if name_of(u) not in replaced], replaced
    raise FileNotFoundError(f"results shards under {out} keep changing while being read")


def read_live(
    storage: Storage, out: str, columns: Iterable[str] | None = None
) -> list[tuple[str, pa.Table]]:
    """(name, table) of every live results shard, read in one parallel pass (replaced shards
    are read too, then dropped: after a clean compaction there are none). The tables' schema
    metadata is removed, so they concatenate."""
    columns = None if columns is None else list(columns)
    for _ in range(RELIST_TRIES):
        listed = storage.list_files(results_folder(out), SUFFIX)
        try:
            tables = list(
                parallel_map(lambda u: read_shard(storage, u, columns), listed, workers_for(out))
            )
        except FileNotFoundError:  # a shard compacted away since the listing
            continue
        replaced = {n for t in tables for n in replaces(t.schema.metadata)}
        return [
            (name_of(u), t.replace_schema_metadata(None))
            for u, t in zip(listed, tables, strict=True)
            if name_of(u) not in replaced
        ]
    raise FileNotFoundError(f"results shards under {out} keep changing while being read")


def list_sizes(storage: Storage, folder: str) -> dict[str, int]:
    """name -> bytes of the visible shards directly under `folder` (one listing)."""
    fs, path = storage.resolve(folder)

    def listing() -> list[dict]:
        if not fs.exists(path):
            return []
        fs.invalidate_cache(path)
        return fs.ls(path, detail=True)

    sizes = {}
    for entry in call_with_retry(listing, storage.retry_policy, f"list {folder}"):
        name = name_of(entry["name"])
        if name.endswith(SUFFIX) and not name.startswith(".") and entry.get("type") != "directory":
            sizes[name] = int(entry.get("size") or 0)
    return sizes


def remove_all(storage: Storage, uris: Iterable[str]) -> int:
    """Remove each URI (a missing one is fine), several at a time."""
    uris = list(uris)
    return sum(1 for _ in parallel_map(storage.remove, uris, workers_for(uris[0]) if uris else 1))
