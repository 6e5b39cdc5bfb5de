"""The manifest: its Parquet schema, streaming reads and validation.

Two kinds of problem, handled differently (see the contract):
- manifest-level (not Parquet, empty, missing or mistyped column, duplicate / unsafe ids) stop
  the run before any work: :func:`inspect_manifest` raises :class:`ManifestError` naming rows;
- per-job (unknown task, missing per-task column, bad params, ...) become that job's failed row:
  :func:`job_problems` lists them without any I/O, for the worker and for ``validate``.

A manifest is one Parquet file, a folder of them (Spark / Dask / Ray output: ``part-*``
files; ``_SUCCESS``, ``_metadata``, ``.crc`` and hidden files are skipped) or a glob: the parts
are read in name order (numbers in names compared as numbers), rows in file order, and row
numbers count across the parts. Every part must meet the schema on its own (problems name it).

Reads stream with ``ParquetFile.iter_batches``: the driver holds one batch of rows at a time;
the id checks (ids.py) stream too and keep 8 bytes per row to find duplicates, so a
million-row manifest costs megabytes.

Integer columns are cast with Arrow's checked cast; only when a batch fails it are the values
that do not fit (out of range, fractional, NaN) found with compute kernels: they become null
plus a per-row problem naming the column and the value (the job fails, the others run).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import posixpath
import re
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from dip_core import INPUT_ROLES, TASKS, DipInputError, check_params, get_task
from pipeline.errors import DippipeError
from pipeline.ids import IdChecker
from pipeline.retry import StorageUnavailableError, call_with_retry, describe
from pipeline.safetext import printable
from pipeline.storage import Storage, join, protocol_of

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
MAX_PART_PROBLEMS = 20  # part files named in one error message
FOOTER_THREADS = 16  # part footers read in parallel (object stores are slow one by one)
# Column of a conformed batch: the row's values that could not be cast (list of messages).
ROW_PROBLEMS = "__row_problems__"


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
    # Values of the row that do not fit the schema (e.g. iterations = 2**40): read as null,
    # reported here as the job's problems.
    problems: tuple[str, ...] = ()
    spec: str | None = None  # the fingerprint of what decides its result (spec.py)

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
class ManifestPart:
    """One Parquet file of a manifest: its URI, rows and the schema columns it has."""

    uri: str
    num_rows: int
    columns: tuple[str, ...]


@dataclass(frozen=True)
class ManifestInfo:
    uri: str
    num_rows: int
    columns: tuple[str, ...]
    ignored_columns: tuple[str, ...]
    parts: tuple[ManifestPart, ...] = ()  # in reading order; () = the single file `uri`

    def files(self) -> tuple[ManifestPart, ...]:
        return self.parts or (ManifestPart(self.uri, self.num_rows, self.columns),)


def derive_seed(job_id: str) -> int:
    """A stable non-negative int63 from the id, so a rerun reproduces the same result."""
    return int.from_bytes(hashlib.sha256(job_id.encode()).digest()[:8], "big") >> 1


def inspect_manifest(storage: Storage, uri: str) -> ManifestInfo:
    """All manifest-level checks; raises ManifestError before any work is started."""
    try:
        files = manifest_files(storage, uri)
    except Exception as error:
        raise ManifestError(uri, [_unreadable(error)]) from None
    if not files:
        raise ManifestError(uri, [_no_files(uri)])
    single = files == [uri]
    problems: list[str] = []
    parts: list[ManifestPart] = []
    known: dict[str, None] = {}  # ordered sets
    ignored: dict[str, None] = {}
    bad_parts = 0
    for part_uri, footer in zip(files, _read_footers(storage, files), strict=True):
        if isinstance(footer, Exception):
            found = [_unreadable(footer)]
        else:
            schema, num_rows = footer
            found = _column_problems(schema)
            names = [name for name in schema.names if name in MANIFEST_SCHEMA.names]
            parts.append(ManifestPart(part_uri, num_rows, tuple(names)))
            known.update(dict.fromkeys(names))
            ignored.update(dict.fromkeys(n for n in schema.names if n not in MANIFEST_SCHEMA.names))
        if found:
            bad_parts += 1
            if single:
                problems += found
            elif bad_parts <= MAX_PART_PROBLEMS:
                problems += [f"file {part_uri}: {problem}" for problem in found]
    if bad_parts > MAX_PART_PROBLEMS:
        problems.append(f"and {bad_parts - MAX_PART_PROBLEMS:,} more file(s) with problems")
    num_rows = sum(part.num_rows for part in parts)
    if num_rows == 0 and len(parts) == len(files):  # every file read, and all empty
        problems.insert(0, "the manifest has no rows")
    info = ManifestInfo(uri, num_rows, tuple(known), tuple(ignored), tuple(parts))
    if not problems:
        try:
            problems += _streamed_id_problems(storage, info)
        except (pa.ArrowException, OSError) as error:
            raise ManifestError(uri, [f"unreadable Parquet data ({describe(error)})"]) from None
    if problems:
        raise ManifestError(uri, problems)
    return info


def _no_files(uri: str) -> str:
    if _has_magic(uri):
        return "no Parquet file matches the pattern"
    return "a folder without Parquet files (hidden, '_' and '.crc' files are skipped)"


def manifest_files(storage: Storage, uri: str) -> list[str]:
    """The Parquet files of a manifest URI, in reading order: ``[uri]`` for a file; for a
    folder, the files under it; for a glob (``jobs/part-*.parquet``), the files it matches.
    Names starting with '.' or '_' (``_SUCCESS``, ``_metadata``, hidden temp files) and
    ``.crc`` checksums are skipped. Raises FileNotFoundError when nothing is there."""
    fs, path = storage.resolve(uri)

    def kind() -> str | None:
        try:
            return str(fs.info(path).get("type"))
        except FileNotFoundError:
            return None

    found = call_with_retry(kind, storage.retry_policy, f"check {uri}")
    if found == "directory":

        def find() -> list[str]:
            fs.invalidate_cache(path)
            return list(fs.find(path, withdirs=False))

        names = call_with_retry(find, storage.retry_policy, f"list {uri}")
        relative = (_relative(name, path) for name in names)
        return [join(uri, rel) for rel in _sorted(r for r in relative if _is_data_file(r))]
    if found is not None:
        return [uri]
    if not _has_magic(uri):
        raise FileNotFoundError(uri)

    def glob() -> list[str]:
        fs.invalidate_cache()
        matches = fs.glob(path, detail=True)
        return [name for name, entry in matches.items() if entry.get("type") == "file"]

    names = call_with_retry(glob, storage.retry_policy, f"list {uri}")
    kept = _sorted(name for name in names if _is_data_file(posixpath.basename(name)))
    local = protocol_of(uri) == "file"
    return [name if local else fs.unstrip_protocol(name) for name in kept]


def _has_magic(uri: str) -> bool:
    return any(char in uri for char in "*?[")


def _relative(name: str, base: str) -> str:
    prefix = base.rstrip("/") + "/"
    return name[len(prefix) :] if name.startswith(prefix) else name.lstrip("/")


def _is_data_file(relative: str) -> bool:
    parts = relative.split("/")
    return not relative.endswith(".crc") and not any(p.startswith((".", "_")) for p in parts)


def _sorted(names: Iterable[str]) -> list[str]:
    """By name, numbers compared as numbers: part.2 before part.10 (Dask does not pad)."""
    return sorted(names, key=lambda name: [_chunk_key(c) for c in _DIGITS.split(name)])


def _chunk_key(chunk: str) -> tuple[int, int, str]:
    return (1, int(chunk), chunk) if chunk.isdigit() else (0, 0, chunk)


_DIGITS = re.compile(r"(\d+)")


def _read_footers(
    storage: Storage, files: list[str]
) -> Iterator[tuple[pa.Schema, int] | Exception]:
    """(schema, rows) of each file, or the error opening it; footers fetched in parallel."""

    def footer(uri: str) -> tuple[pa.Schema, int] | Exception:
        try:
            with storage.open_parquet(uri) as parquet:
                return parquet.schema_arrow, parquet.metadata.num_rows
        except Exception as error:
            return error

    if len(files) == 1:
        yield footer(files[0])
        return
    with ThreadPoolExecutor(min(FOOTER_THREADS, len(files))) as pool:
        yield from pool.map(footer, files)


def _unreadable(error: Exception) -> str:
    """Why a manifest could not be opened, in the user's terms."""
    if isinstance(error, FileNotFoundError):
        return "file not found"
    if isinstance(error, IsADirectoryError):
        return "a folder, not a Parquet file"
    if isinstance(error, NotADirectoryError):
        return "file not found"
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
    """Whether some values of type `found` can be `wanted`: for integer columns any integer or
    floating type (pandas writes int columns with gaps as float64); the values that do not
    fit are per-row problems (see _cast_column)."""
    if pa.types.is_null(found):
        return True
    if pa.types.is_string(wanted):
        return pa.types.is_string(found) or pa.types.is_large_string(found)
    return pa.types.is_integer(found) or pa.types.is_floating(found)


def _streamed_id_problems(storage: Storage, info: ManifestInfo) -> list[str]:
    def id_batches() -> Iterator[pa.Array]:
        for part in info.files():
            for batch in storage.iter_parquet_batches(part.uri, ID_BATCH_ROWS, columns=["id"]):
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
    """Conformed batches (the schema's columns, plus ROW_PROBLEMS when some value of the batch
    did not fit), part after part, in manifest order."""
    for part in info.files():
        for batch in storage.iter_parquet_batches(part.uri, batch_rows, list(part.columns)):
            yield _conform(pa.Table.from_batches([batch]))


def read_ids(storage: Storage, info: ManifestInfo) -> pa.Array:
    """The id column of the whole manifest (every part, in manifest order), as strings."""
    chunks = [
        chunk.cast(pa.string())
        for part in info.files()
        for chunk in storage.read_parquet(part.uri, columns=["id"]).column("id").chunks
    ]
    return pa.chunked_array(chunks, pa.string()).combine_chunks()


def iter_manifest_columns(
    storage: Storage, uri: str, columns: list[str], batch_rows: int
) -> Iterator[pa.Table]:
    """Raw batches of `columns` (those a part has) of any manifest URI (file, folder, glob),
    without the manifest checks: for readers such as the report's input lookup."""
    for part_uri in manifest_files(storage, uri):
        with storage.open_parquet(part_uri) as parquet:
            present = [c for c in columns if c in parquet.schema_arrow.names]
            for batch in parquet.iter_batches(batch_size=batch_rows, columns=present):
                yield pa.Table.from_batches([batch])


def _conform(table: pa.Table) -> pa.Table:
    """Cast present columns to the schema's types and add absent optional ones as nulls; values
    that do not fit become null, with a ROW_PROBLEMS column naming them."""
    columns = []
    problems: dict[int, list[str]] = {}
    for field in MANIFEST_SCHEMA:
        if field.name in table.column_names:
            columns.append(_cast_column(table.column(field.name), field, problems))
        else:
            columns.append(pa.nulls(table.num_rows, field.type))
    conformed = pa.table(columns, schema=_READ_SCHEMA)
    if problems:
        listed = [problems.get(row) for row in range(table.num_rows)]
        conformed = conformed.append_column(ROW_PROBLEMS, pa.array(listed, pa.list_(pa.string())))
    return conformed


def _cast_column(
    column: pa.ChunkedArray, field: pa.Field, problems: dict[int, list[str]]
) -> pa.ChunkedArray:
    """Arrow's checked cast; if it fails, the rows whose value does not fit are found with
    compute kernels, nulled and recorded in `problems` (row in the batch -> messages)."""
    try:
        return column.cast(field.type)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        if not pa.types.is_integer(field.type):
            raise
    fits = _fits(column, field.type)
    bad = pc.invert(pc.fill_null(fits, True))
    rows = pc.indices_nonzero(bad)
    for row, value in zip(rows.to_pylist(), column.take(rows).to_pylist(), strict=True):
        problems.setdefault(row, []).append(_misfit(field, value, column.type))
    return pc.if_else(bad, pa.scalar(None, column.type), column).cast(field.type)


def _fits(column: pa.ChunkedArray, wanted: pa.DataType) -> pa.ChunkedArray:
    """Per row: whether the value is a whole number in `wanted`'s range (null for null)."""
    low, high = _int_range(wanted)
    found = column.type
    if pa.types.is_integer(found):
        own_low, own_high = _int_range(found)
        above = pc.greater_equal(column, pa.scalar(max(low, own_low), found))
        below = pc.less_equal(column, pa.scalar(min(high, own_high), found))
        return pc.and_(above, below)
    values = column.cast(pa.float64())  # exact for float16 / float32
    whole = pc.and_(pc.is_finite(values), pc.equal(pc.trunc(values), values))
    # high + 1 is a power of two, exact as a float: values < 2**31 (or 2**63) fit.
    in_range = pc.and_(pc.greater_equal(values, float(low)), pc.less(values, float(high + 1)))
    return pc.and_kleene(whole, in_range)


def _int_range(kind: pa.DataType) -> tuple[int, int]:
    bits = kind.bit_width
    if pa.types.is_unsigned_integer(kind):
        return 0, 2**bits - 1
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def _misfit(field: pa.Field, value: Any, found: pa.DataType) -> str:
    """Why `value` (of type `found`) does not fit the column, naming both."""
    low, high = _int_range(field.type)
    shown = repr(value)
    if isinstance(value, float):  # a float32 shown with its own precision: 1e+20
        shown = format(value, ".7g") if found.bit_width <= 32 else repr(value)
        if not value.is_integer():
            return f"column '{field.name}' has {shown}, not a whole number"
    return f"column '{field.name}' has {shown}, outside {field.type}'s range {low} to {high}"


def job_from_row(values: dict[str, Any], row: int, spec: str | None = None) -> Job:
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
        problems=tuple(values.get(ROW_PROBLEMS) or ()),
        spec=spec,
    )


def job_problems(job: Job) -> list[str]:
    """Per-job problems found without reading any file (task, columns, params)."""
    if job.problems:  # values that did not fit their column: the rest is checked once fixed
        return list(job.problems)
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
