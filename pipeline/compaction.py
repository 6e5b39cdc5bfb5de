"""Compaction: many small results / traces shards become a few large ones, crash-safe.

Runs only under OUT's lock (one writer), at resume (runner._prepare_out) and from the
ShardWriter every COMPACT_EVERY flushes. Small live shards (results + traces bytes under
SMALL_BYTES) are taken in name order, in groups of at most GROUP_SHARDS shards and GROUP_BYTES
bytes, so one compaction never holds more than a bounded amount of rows. Per group:

1. read the sources' results and traces (in parallel);
2. write ``traces/compact-<tag>-<n>.parquet`` (a crash here: an orphan traces shard, swept
   at the next start, like any other);
3. write ``results/compact-<tag>-<n>.parquet`` with the sources' names in its schema metadata
   (shards.REPLACES_KEY): the commit point; from now on every reader ignores the sources;
4. delete the sources' results and traces shards (a crash here: they linger, ignored, and the
   next compaction or run start deletes them, remove_replaced).

So at every instant each row is in exactly one live shard.
"""

from __future__ import annotations

import io
import json
import logging
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.outputs import RESULT_SCHEMA, TRACE_SCHEMA
from pipeline.shards import (
    COMPACT_PREFIX,
    REPLACES_KEY,
    list_sizes,
    live_shards,
    name_of,
    parallel_map,
    read_shard,
    remove_all,
    results_folder,
    traces_folder,
    workers_for,
)
from pipeline.storage import Storage, join

log = logging.getLogger("dippipe")

# A group: at most this many source shards and bytes (results + traces as stored). 64 MiB of
# zstd Parquet is a few hundred MiB in memory at most, read and rewritten in a few seconds.
GROUP_SHARDS = 1000
GROUP_BYTES = 64 << 20
# Trace rows per Parquet row group of a compacted traces shard (what the report reads at once).
ROW_GROUP_ROWS = 1 << 18
# Shards at least this large are left alone: they are already "few".
SMALL_BYTES = GROUP_BYTES // 4
# Source bytes compacted at resume, before the first job: little, since it delays that job
# (~0.7 s here) and saves that resume almost nothing (the same rows are read either way). What
# is left, e.g. the 10k shards a run of the old flush policy left, is compacted by the run's
# writer every COMPACT_EVERY flushes: RUN_BUDGET, or what it flushed since, if more (so it
# keeps up with itself and drains the backlog), a few seconds of the driver loop each time;
# the next resume finds few shards.
RESUME_BUDGET = 16 << 20
RUN_BUDGET = 2 * GROUP_BYTES
# The writer compacts after this many flushes of its own (at FLUSH_SECONDS each, at most
# about every hour and a half on a slow cluster; after every 100k jobs on a fast one).
COMPACT_EVERY = 50


@dataclass
class Compacted:
    groups: int = 0
    sources: int = 0  # results shards replaced
    rows: int = 0  # result rows moved
    bytes: int = 0  # source bytes read (results + traces)
    removed: int = 0  # leftovers of an earlier, interrupted compaction deleted
    left: int = 0  # small shards left for later (over the budget)


def remove_replaced(storage: Storage, out: str) -> int:
    """Delete the results and traces shards that a compacted shard replaces and that a crash
    left behind. Returns how many files went."""
    _, replaced = live_shards(storage, out)
    if not replaced:
        return 0
    lingering = [
        join(folder, name)
        for folder in (results_folder(out), traces_folder(out))  # results first: then
        for name in list_sizes(storage, folder)  # a traces one left is an orphan
        if name in replaced
    ]
    return remove_all(storage, lingering)


def plan(storage: Storage, out: str, cap: int = GROUP_BYTES) -> list[list[tuple[str, int]]]:
    """Groups of small live shards to compact, each of at most GROUP_SHARDS shards and `cap`
    bytes: [(name, results + traces bytes), ...]."""
    live, _ = live_shards(storage, out)
    results = list_sizes(storage, results_folder(out))
    traces = list_sizes(storage, traces_folder(out))
    small = [
        (name, size)
        for name in sorted(name_of(u) for u in live)
        if (size := results.get(name, 0) + traces.get(name, 0)) < SMALL_BYTES
    ]
    groups: list[list[tuple[str, int]]] = []
    group: list[tuple[str, int]] = []
    total = 0
    for name, size in small:
        if group and (len(group) >= GROUP_SHARDS or total + size > cap):
            groups.append(group)
            group, total = [], 0
        group.append((name, size))
        total += size
    groups.append(group)
    return [g for g in groups if len(g) > 1]  # one shard alone gains nothing


def compact(storage: Storage, out: str, tag: str, budget: int | None = None) -> Compacted:
    """Delete what an interrupted compaction left, then compact small shards, group by group,
    at most `budget` source bytes (None: all of them). Compacted shards are named
    ``compact-<tag>-<n>.parquet``: `tag` must be new (a run id, a counter)."""
    done = Compacted(removed=remove_replaced(storage, out))
    groups = plan(storage, out, GROUP_BYTES if budget is None else min(GROUP_BYTES, budget))
    for number, group in enumerate(groups):
        size = sum(size for _, size in group)
        if budget is not None and done.bytes + size > budget:
            done.left += sum(len(g) for g in groups[number:])
            break
        names = [name for name, _ in group]
        done.rows += compact_group(storage, out, names, f"{COMPACT_PREFIX}{tag}-{number:05d}")
        done.groups += 1
        done.sources += len(names)
        done.bytes += size
    return done


def compact_group(storage: Storage, out: str, names: list[str], target: str) -> int:
    """Steps 1-4 of the module docstring for one group; returns its result rows."""
    target += ".parquet"
    results = [
        _conform(table, RESULT_SCHEMA)
        for table in parallel_map(
            lambda n: read_shard(storage, join(results_folder(out), n)), names, workers_for(out)
        )
    ]
    table = pa.concat_tables(results, promote_options="permissive")
    table = table.replace_schema_metadata({REPLACES_KEY: json.dumps(names).encode()})
    ids = {name: t.column("id") for name, t in zip(names, results, strict=True)}
    storage.write_bytes(join(traces_folder(out), target), _traces_bytes(storage, out, ids))
    storage.write_parquet(join(results_folder(out), target), table)  # the commit point
    remove_all(storage, [join(results_folder(out), n) for n in names])
    remove_all(storage, [join(traces_folder(out), n) for n in names])
    return table.num_rows


def _traces_bytes(storage: Storage, out: str, ids: dict[str, pa.ChunkedArray]) -> bytes:
    """The sources' traces as one zstd Parquet file, written shard by shard (the memory held
    is the output and a few sources, not every source decoded at once). Only the trace rows
    of ids still in the source's results shard are kept (outputs.drop_rows)."""

    def read(name: str) -> pa.Table | None:
        try:
            table = read_shard(storage, join(traces_folder(out), name))
        except FileNotFoundError:  # never written by our protocol; lost some other way
            log.warning("traces shard %s is missing; its jobs keep no trace", name)
            return None
        return table.filter(pc.is_in(table.column("id"), value_set=ids[name]))

    buffer = io.BytesIO()
    with pq.ParquetWriter(buffer, TRACE_SCHEMA, compression="zstd") as writer:
        pending: list[pa.Table] = []
        for table in parallel_map(read, list(ids), workers_for(out)):
            if table is not None and table.num_rows:
                pending.append(_conform(table, TRACE_SCHEMA, extra=False))
            if sum(t.num_rows for t in pending) >= ROW_GROUP_ROWS:
                writer.write_table(pa.concat_tables(pending))
                pending = []
        if pending:
            writer.write_table(pa.concat_tables(pending))
    return buffer.getvalue()


def _conform(table: pa.Table, schema: pa.Schema, extra: bool = True) -> pa.Table:
    """`schema`'s columns in its order (missing ones, from older versions, become nulls),
    then, with `extra`, any others the shard has; no schema metadata."""
    if table.schema.equals(schema):  # what this version writes: nothing to do
        return table.replace_schema_metadata(None)
    present = set(table.column_names)
    columns = [
        table.column(f.name).cast(f.type) if f.name in present else pa.nulls(table.num_rows, f.type)
        for f in schema
    ]
    fields = list(schema)
    for other in table.schema if extra else ():
        if other.name not in schema.names:
            columns.append(table.column(other.name))
            fields.append(other)
    return pa.Table.from_arrays(columns, schema=pa.schema(fields))
