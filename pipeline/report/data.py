"""What the report reads for the shown jobs only: run.json, their manifest rows, their traces.

Results do not record the input and reference URIs; the manifest does, and run.json records
the manifest's URI. Both the manifest and the trace shards are streamed batch by batch and
filtered by id, so their size does not matter; only the trace shards that hold a shown job are
opened at all.
"""

from __future__ import annotations

import collections
import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dip_core import INPUT_ROLES
from pipeline.manifest import iter_manifest_columns
from pipeline.storage import Storage, join

log = logging.getLogger("dippipe")
BATCH_ROWS = 65536
INPUT_COLUMNS = tuple(role.name for role in INPUT_ROLES)  # the manifest's image columns
TRACE_COLUMNS = ("id", "step", "energy", "psnr")


@dataclass(frozen=True)
class Trace:
    steps: np.ndarray
    energy: np.ndarray
    psnr: np.ndarray | None  # None when the job had no reference


def read_run_info(storage: Storage, out: str) -> dict | None:
    """OUT/run.json, or None when it is missing or unreadable (the report still works)."""
    try:
        return json.loads(storage.read_bytes(join(out, "run.json")))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        log.warning("unreadable run.json in %s (%s)", out, error)
        return None


def _filtered_batches(
    storage: Storage, uri: str, columns: Iterable[str], ids: pa.Array
) -> Iterable[pa.Table]:
    """Rows of a Parquet file whose id is in `ids`, one batch at a time."""
    with storage.open_parquet(uri) as parquet:
        present = [c for c in columns if c in parquet.schema_arrow.names]
        for batch in parquet.iter_batches(batch_size=BATCH_ROWS, columns=present):
            table = pa.Table.from_batches([batch])
            wanted = table.filter(pc.is_in(table.column("id"), value_set=ids))
            if wanted.num_rows:
                yield wanted


def read_inputs(storage: Storage, manifest: str, ids: list[str]) -> dict[str, dict]:
    """id -> {image, reference, mask, guide} (URIs or None) for `ids`, from the manifest."""
    found: dict[str, dict] = {}
    value_set = pa.array(ids, pa.string())
    columns = ["id", *INPUT_COLUMNS]
    for batch in iter_manifest_columns(storage, manifest, columns, BATCH_ROWS):  # file/folder/glob
        table = batch.filter(pc.is_in(batch.column("id"), value_set=value_set))
        for row in table.to_pylist():
            found[row["id"]] = {c: row.get(c) for c in INPUT_COLUMNS}
    return found


def read_traces(storage: Storage, out: str, shard_of: dict[str, str]) -> dict[str, Trace]:
    """Traces of the jobs in `shard_of` (id -> results shard name), one traces shard each."""
    by_shard: dict[str, list[str]] = collections.defaultdict(list)
    for job_id, shard in shard_of.items():
        by_shard[shard].append(job_id)
    parts: dict[str, list[pa.Table]] = collections.defaultdict(list)
    for shard, ids in sorted(by_shard.items()):
        uri = join(out, "traces", shard)
        value_set = pa.array(ids, pa.string())
        try:
            tables = list(_filtered_batches(storage, uri, TRACE_COLUMNS, value_set))
        except (OSError, pa.ArrowInvalid) as error:
            log.warning("traces shard %s unreadable (%s)", uri, error)
            continue
        for table in tables:
            for job_id in pc.unique(table.column("id")).to_pylist():
                parts[job_id].append(table.filter(pc.equal(table.column("id"), job_id)))
    return {job_id: _trace(pa.concat_tables(tables)) for job_id, tables in parts.items()}


def _trace(table: pa.Table) -> Trace:
    table = table.sort_by("step")
    psnr = table.column("psnr") if "psnr" in table.column_names else None
    has_psnr = psnr is not None and psnr.null_count < len(psnr)
    return Trace(
        steps=table.column("step").to_numpy(zero_copy_only=False).astype(np.int64),
        energy=_floats(table.column("energy")),
        psnr=_floats(psnr) if has_psnr else None,
    )


def _floats(column: pa.ChunkedArray) -> np.ndarray:
    """Nulls become NaN, which the plots skip."""
    return np.asarray(column.cast(pa.float64()).to_numpy(zero_copy_only=False), dtype=np.float64)
