"""The manifest: its Parquet schema, streaming reads and validation.

Two kinds of problem, handled differently (see the contract):
- manifest-level (not Parquet, empty, missing or mistyped column, duplicate / unsafe ids) stop
  the run before any work: :func:`inspect_manifest` raises :class:`ManifestError` naming rows;
- per-job (unknown task, missing per-task column, bad params, ...) become that job's failed row:
  :func:`job_problems` lists them without any I/O, for the worker and for ``validate``.

Reads stream with ``ParquetFile.iter_batches``: the driver holds one batch of rows at a time,
plus the ``id`` column once (needed to find duplicates), so a million-row manifest is cheap.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from dip_core import TASKS, DipInputError, check_params
from pipeline.storage import Storage

MANIFEST_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("task", pa.string(), nullable=False),
        pa.field("image", pa.string(), nullable=False),
        pa.field("mask", pa.string()),
        pa.field("guide", pa.string()),
        pa.field("reference", pa.string()),
        pa.field("scale", pa.int32()),
        pa.field("iterations", pa.int32()),
        pa.field("seed", pa.int64()),
        pa.field("params", pa.string()),
    ]
)
# Rows as read: task or image may still be null there (a per-job problem, not a crash).
_READ_SCHEMA = pa.schema([field.with_nullable(True) for field in MANIFEST_SCHEMA])
REQUIRED_COLUMNS = ("id", "task", "image")
TASK_REQUIRED_COLUMNS = {"inpaint": "mask", "flash_no_flash": "guide", "super_resolution": "scale"}
ID_PATTERN = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
MAX_LISTED = 20  # rows named per problem in an error message
BATCH_ROWS = 1024


class ManifestError(ValueError):
    """The manifest as a whole is unusable; `problems` says why, naming rows."""

    def __init__(self, uri: str, problems: list[str]) -> None:
        self.uri, self.problems = uri, problems
        super().__init__(f"manifest {uri}: " + "; ".join(problems))


@dataclass(frozen=True)
class Job:
    """One manifest row, with the seed resolved (the manifest's, or one derived from the id)."""

    id: str
    task: str
    image: str
    row: int
    seed: int
    mask: str | None = None
    guide: str | None = None
    reference: str | None = None
    scale: int | None = None
    iterations: int | None = None
    params: str | None = None

    def parsed_params(self) -> dict[str, Any] | None:
        if self.params is None or not self.params.strip():
            return None
        try:
            value = json.loads(self.params)
        except json.JSONDecodeError as error:
            raise DipInputError(f"params is not valid JSON ({error.msg})") from None
        if not isinstance(value, dict):
            raise DipInputError(f"params must be a JSON object, got {type(value).__name__}")
        return value


@dataclass(frozen=True)
class ManifestInfo:
    uri: str
    num_rows: int
    columns: tuple[str, ...]
    ignored_columns: tuple[str, ...]


def derive_seed(job_id: str) -> int:
    """A stable non-negative int63 from the id, so a rerun reproduces the same result."""
    return int.from_bytes(hashlib.sha256(job_id.encode()).digest()[:8], "big") >> 1


def inspect_manifest(storage: Storage, uri: str) -> ManifestInfo:
    """All manifest-level checks; raises ManifestError before any work is started."""
    try:
        parquet = storage.open_parquet(uri)
    except FileNotFoundError:
        raise ManifestError(uri, ["file not found"]) from None
    except (pa.ArrowInvalid, OSError) as error:
        raise ManifestError(uri, [f"not a Parquet file ({error})"]) from None
    schema = parquet.schema_arrow
    problems = _column_problems(schema)
    if parquet.metadata.num_rows == 0:
        problems.append("the manifest has no rows")
    if not problems:
        ids = storage.read_parquet(uri, columns=["id"]).column("id")
        problems += id_problems(ids.cast(pa.string()))
    if problems:
        raise ManifestError(uri, problems)
    known = tuple(name for name in schema.names if name in MANIFEST_SCHEMA.names)
    ignored = tuple(name for name in schema.names if name not in MANIFEST_SCHEMA.names)
    return ManifestInfo(uri, parquet.metadata.num_rows, known, ignored)


def _column_problems(schema: pa.Schema) -> list[str]:
    problems = [
        f"missing required column '{name}'" for name in REQUIRED_COLUMNS if name not in schema.names
    ]
    for field in MANIFEST_SCHEMA:
        if field.name in schema.names and not _castable(schema.field(field.name).type, field.type):
            found = schema.field(field.name).type
            problems.append(f"column '{field.name}' has type {found}, expected {field.type}")
    return problems


def _castable(found: pa.DataType, wanted: pa.DataType) -> bool:
    if pa.types.is_null(found):
        return True
    if pa.types.is_string(wanted):
        return pa.types.is_string(found) or pa.types.is_large_string(found)
    return pa.types.is_integer(found)


def _rows(mask: pa.Array, ids: pa.ChunkedArray) -> str:
    """'row 3 ('../x'), row 9 (None)' for the first rows where mask is true."""
    rows = pc.indices_nonzero(mask).to_pylist()
    named = [f"row {r} ({ids[r].as_py()!r})" for r in rows[:MAX_LISTED]]
    more = f" and {len(rows) - MAX_LISTED} more" if len(rows) > MAX_LISTED else ""
    return ", ".join(named) + more


def id_problems(ids: pa.ChunkedArray) -> list[str]:
    """Null, unsafe (not a plain file name) and duplicate ids, vectorised over the column."""
    problems = []
    nulls = pc.is_null(ids)
    if pc.any(nulls).as_py():
        problems.append(f"missing id at {_rows(nulls, ids)}")
    pattern_ok = pc.fill_null(pc.match_substring_regex(ids, ID_PATTERN.pattern), True)
    only_dots = pc.fill_null(pc.match_substring_regex(ids, r"^\.+$"), False)
    unsafe = pc.or_(pc.invert(pattern_ok), only_dots)
    if pc.any(unsafe).as_py():
        problems.append(
            "unsafe id (allowed: letters, digits, '.', '_', '-', at most 128 characters, "
            f"not only dots) at {_rows(unsafe, ids)}"
        )
    counts = pc.value_counts(ids.drop_null())
    repeated = pc.filter(counts, pc.greater(counts.field("counts"), 1))
    if len(repeated):
        dup_values = repeated.field("values")
        is_dup = pc.is_in(ids, value_set=dup_values)
        problems.append(f"duplicate id at {_rows(is_dup, ids)}")
    return problems


def iter_jobs(storage: Storage, info: ManifestInfo, batch_rows: int = BATCH_ROWS) -> Iterator[Job]:
    """Jobs in manifest order, one Parquet batch in memory at a time."""
    row = 0
    for batch in iter_batches(storage, info, batch_rows):
        for values in batch.to_pylist():
            yield job_from_row(values, row)
            row += 1


def iter_batches(storage: Storage, info: ManifestInfo, batch_rows: int) -> Iterator[pa.Table]:
    parquet = storage.open_parquet(info.uri)
    for batch in parquet.iter_batches(batch_size=batch_rows, columns=list(info.columns)):
        yield _conform(pa.Table.from_batches([batch]))


def _conform(table: pa.Table) -> pa.Table:
    """Cast present columns to the schema's types and add absent optional ones as nulls."""
    columns = []
    for field in MANIFEST_SCHEMA:
        if field.name in table.column_names:
            columns.append(table.column(field.name).cast(field.type))
        else:
            columns.append(pa.nulls(table.num_rows, field.type))
    return pa.table(columns, schema=_READ_SCHEMA)


def job_from_row(values: dict[str, Any], row: int) -> Job:
    seed = values.get("seed")
    return Job(
        id=values["id"],
        task=values.get("task") or "",
        image=values.get("image") or "",
        row=row,
        seed=derive_seed(values["id"]) if seed is None else int(seed),
        mask=values.get("mask"),
        guide=values.get("guide"),
        reference=values.get("reference"),
        scale=values.get("scale"),
        iterations=values.get("iterations"),
        params=values.get("params"),
    )


def job_problems(job: Job) -> list[str]:
    """Per-job problems found without reading any file (task, columns, params)."""
    if job.task not in TASKS:
        return [f"unknown task {job.task!r} (known: {', '.join(TASKS)})"]
    problems = []
    if not job.image:
        problems.append("column 'image' is empty")
    column = TASK_REQUIRED_COLUMNS.get(job.task)
    if column and getattr(job, column) in (None, ""):
        problems.append(f"task {job.task!r} needs column '{column}'")
    if job.iterations is not None and job.iterations < 1:
        problems.append(f"iterations must be at least 1, got {job.iterations}")
    if job.seed < 0:
        problems.append(f"seed must be non-negative, got {job.seed}")
    try:
        check_params(job.task, job.parsed_params(), job.scale)
    except DipInputError as error:
        problems.append(str(error))
    return problems
