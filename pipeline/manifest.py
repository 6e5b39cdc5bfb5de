"""The manifest: its Parquet schema, streaming reads and validation.

Two kinds of problem, handled differently (see the contract):
- manifest-level (not Parquet, empty, missing or mistyped column, duplicate / unsafe ids) stop
  the run before any work: :func:`inspect_manifest` raises :class:`ManifestError` naming rows;
- per-job (unknown task, missing per-task column, bad params, ...) become that job's failed row:
  :func:`job_problems` lists them without any I/O, for the worker and for ``validate``.

Reads stream with ``ParquetFile.iter_batches``: the driver holds one batch of rows at a time;
the id checks (ids.py) stream too and keep 8 bytes per row to find duplicates, so a
million-row manifest costs megabytes.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from dip_core import INPUT_ROLES, TASKS, DipInputError, check_params, get_task
from pipeline.errors import DippipeError
from pipeline.ids import IdChecker
from pipeline.retry import StorageUnavailableError, describe
from pipeline.safetext import printable
from pipeline.storage import Storage

MANIFEST_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("task", pa.string(), nullable=False),
        # One string column per input role (dip_core/roles.py); only the image is required.
        *(pa.field(role.name, pa.string(), nullable=role.name != "image") for role in INPUT_ROLES),
        pa.field("scale", pa.int32()),
        pa.field("iterations", pa.int32()),
        pa.field("seed", pa.int64()),
        pa.field("params", pa.string()),
    ]
)
# Rows as read: task or image may still be null there (a per-job problem, not a crash).
_READ_SCHEMA = pa.schema([field.with_nullable(True) for field in MANIFEST_SCHEMA])
REQUIRED_COLUMNS = ("id", "task", "image")
BATCH_ROWS = 1024
ID_BATCH_ROWS = 65536  # ids are small: bigger batches for the id checks
MAX_ITERATIONS = 1_000_000  # a sanity bound: the paper's longest runs are a few 10,000 steps
MAX_PARAMS_CHARS = 65_536  # a params JSON object is a few dozen characters


class ManifestError(DippipeError, ValueError):
    """The manifest as a whole is unusable; `problems` says why, naming rows."""

    def __init__(self, uri: str, problems: list[str]) -> None:
        self.uri, self.problems = uri, problems
        super().__init__(f"manifest {uri}: " + "; ".join(problems))


@dataclass(frozen=True)
class Job:
    """One manifest row, with the seed resolved (the manifest's, or one derived from the id)."""

    id: str
    task: str
    row: int
    seed: int
    inputs: dict[str, str] = dataclasses.field(default_factory=dict)  # URI by role, given ones
    scale: int | None = None
    iterations: int | None = None
    params: str | None = None

    @property
    def image(self) -> str:
        return self.inputs.get("image", "")

    def parsed_params(self) -> dict[str, Any] | None:
        if self.params is None or not self.params.strip():
            return None
        try:
            value = json.loads(self.params)
        except json.JSONDecodeError as error:
            raise DipInputError(f"params is not valid JSON ({error.msg})") from None
        except (ValueError, RecursionError) as error:  # 5,000-digit numbers, [[[[...]]]]
            raise DipInputError(f"params is not usable JSON ({type(error).__name__})") from None
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
        schema, num_rows = parquet.schema_arrow, parquet.metadata.num_rows
    except Exception as error:
        raise ManifestError(uri, [_unreadable(error)]) from None
    problems = _column_problems(schema)
    if num_rows == 0:
        problems.append("the manifest has no rows")
    if not problems:
        try:
            problems += _streamed_id_problems(storage, uri)
        except (pa.ArrowException, OSError) as error:
            raise ManifestError(uri, [f"unreadable Parquet data ({describe(error)})"]) from None
    if problems:
        raise ManifestError(uri, problems)
    known = tuple(name for name in schema.names if name in MANIFEST_SCHEMA.names)
    ignored = tuple(name for name in schema.names if name not in MANIFEST_SCHEMA.names)
    return ManifestInfo(uri, num_rows, known, ignored)


def _unreadable(error: Exception) -> str:
    """Why a manifest could not be opened, in the user's terms."""
    if isinstance(error, FileNotFoundError):
        return "file not found"
    if isinstance(error, IsADirectoryError):
        return "a folder, not a Parquet file"
    if isinstance(error, (PermissionError, StorageUnavailableError)):
        return f"cannot be read ({describe(error)})"
    if isinstance(error, (pa.ArrowException, OSError, ValueError)):
        return f"not a Parquet file ({printable(error, 300)})"
    raise error


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


def _streamed_id_problems(storage: Storage, uri: str) -> list[str]:
    def id_batches() -> Iterator[pa.Array]:
        for batch in storage.iter_parquet_batches(uri, ID_BATCH_ROWS, columns=["id"]):
            yield batch.column(0)

    checker = IdChecker()
    for ids in id_batches():
        checker.add(ids)
    return checker.problems(id_batches)


def id_problems(ids: pa.Array | pa.ChunkedArray) -> list[str]:
    """Null, unsafe (not a plain file name) and duplicate ids of an in-memory column."""
    checker = IdChecker()
    checker.add(ids)
    return checker.problems(lambda: iter([ids.combine_chunks() if hasattr(ids, "chunks") else ids]))


def iter_jobs(storage: Storage, info: ManifestInfo, batch_rows: int = BATCH_ROWS) -> Iterator[Job]:
    """Jobs in manifest order, one Parquet batch in memory at a time."""
    row = 0
    for batch in iter_batches(storage, info, batch_rows):
        for values in batch.to_pylist():
            yield job_from_row(values, row)
            row += 1


def iter_batches(storage: Storage, info: ManifestInfo, batch_rows: int) -> Iterator[pa.Table]:
    for batch in storage.iter_parquet_batches(info.uri, batch_rows, list(info.columns)):
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
        row=row,
        seed=derive_seed(values["id"]) if seed is None else int(seed),
        inputs={role.name: values[role.name] for role in INPUT_ROLES if values.get(role.name)},
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
    task = get_task(job.task)
    for column in task.required_roles:
        if not job.inputs.get(column):
            problems.append(f"task {job.task!r} needs column '{column}'")
    if task.scales and job.scale is None:
        problems.append(f"task {job.task!r} needs column 'scale'")
    if job.iterations is not None and job.iterations < 1:
        problems.append(f"iterations must be at least 1, got {job.iterations}")
    if job.iterations is not None and job.iterations > MAX_ITERATIONS:
        problems.append(f"iterations must be at most {MAX_ITERATIONS:,}, got {job.iterations:,}")
    if job.seed < 0:
        problems.append(f"seed must be non-negative, got {job.seed}")
    if job.params is not None and len(job.params) > MAX_PARAMS_CHARS:
        problems.append(
            f"params is {len(job.params):,} characters long (at most {MAX_PARAMS_CHARS:,})"
        )
        return problems
    problem = _params_problem(job.task, job.params, job.scale)
    if problem:
        problems.append(problem)
    return problems


def output_size(job: Job, size: tuple[int, int]) -> tuple[int, int]:
    """The (width, height) of the job's result for an image of ``size`` (a known task)."""
    factor = get_task(job.task).output_scale(job.scale)
    return size[0] * factor, size[1] * factor


@functools.lru_cache(maxsize=4096)
def _params_problem(task: str, params: str | None, scale: int | None) -> str | None:
    """Cached: most manifests repeat a few (task, params, scale) over many rows."""
    try:
        check_params(task, Job("", task, 0, 0, params=params).parsed_params(), scale)
    except DipInputError as error:
        return printable(str(error), 1000)
    return None
