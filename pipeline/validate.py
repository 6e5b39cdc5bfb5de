"""`dippipe validate`: every check a run would make, without fitting anything.

Manifest-level checks come from manifest.py; per job it adds what needs I/O: the URIs exist,
the files are images (only headers are read), and mask / guide / reference sizes match.
Jobs are checked in a thread pool, a batch at a time, since object-store requests are slow one
by one but cheap in parallel.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from dip_core import COMPANION_ROLES, TASKS
from pipeline.images import (
    DEFAULT_MAX_PIXELS,
    ImageDecodeError,
    check_pixels,
    image_size,
    is_tiff,
    tiff_size_from_file,
)
from pipeline.manifest import (
    BATCH_ROWS,
    Job,
    ManifestError,
    inspect_manifest,
    iter_jobs,
    job_problems,
    output_size,
)
from pipeline.retry import describe
from pipeline.storage import HEADER_BYTES, Storage

MAX_JOB_PROBLEMS = 1000  # kept in the report; the count goes on


@dataclass
class ValidationReport:
    uri: str
    rows: int = 0
    manifest_problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    job_problems: list[tuple[int, str, str]] = field(default_factory=list)  # (row, id, problem)
    jobs_with_problems: int = 0

    @property
    def ok(self) -> bool:
        return not self.manifest_problems and self.jobs_with_problems == 0


def validate_manifest(
    storage: Storage, uri: str, threads: int = 16, max_pixels: int | None = DEFAULT_MAX_PIXELS
) -> ValidationReport:
    report = ValidationReport(uri)
    try:
        info = inspect_manifest(storage, uri)
    except ManifestError as error:
        report.manifest_problems = error.problems
        return report
    report.rows = info.num_rows
    if info.ignored_columns:
        report.warnings.append(f"columns ignored (not in the schema): {list(info.ignored_columns)}")
    with ThreadPoolExecutor(threads) as pool:
        for batch in _batches(iter_jobs(storage, info), BATCH_ROWS):
            checked = pool.map(lambda job: check_job(storage, job, max_pixels), batch)
            for job, problems in zip(batch, checked, strict=True):
                _add(report, job, problems)
    return report


def _batches(jobs: Iterator[Job], size: int) -> Iterator[list[Job]]:
    batch: list[Job] = []
    for job in jobs:
        batch.append(job)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _add(report: ValidationReport, job: Job, problems: list[str]) -> None:
    if not problems:
        return
    report.jobs_with_problems += 1
    for problem in problems:
        if len(report.job_problems) < MAX_JOB_PROBLEMS:
            report.job_problems.append((job.row, job.id, problem))


def check_job(storage: Storage, job: Job, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> list[str]:
    """Problems of one job, including its files (headers only)."""
    problems = job_problems(job)
    if not job.image:
        return problems
    size, problem = _size_of(storage, job.image, "image", max_pixels)
    if problem:
        return [*problems, problem]
    if job.task not in TASKS:  # the sizes its inputs should have are unknown
        return problems
    sizes = {"image": size, "output": output_size(job, size)}
    for role in COMPANION_ROLES:
        uri = job.inputs.get(role.name)
        if not uri:
            continue
        wanted = sizes[role.size_of]
        found, problem = _size_of(storage, uri, role.name, max_pixels)
        if problem is None and found != wanted:
            expected = f"expected {wanted[0]}x{wanted[1]}"
            problem = f"{role.name} {uri} is {found[0]}x{found[1]} pixels, {expected}"
        if problem:
            problems.append(problem)
    return problems


def _size_of(
    storage: Storage, uri: str, role: str, max_pixels: int | None
) -> tuple[tuple[int, int], str | None]:
    try:
        head = storage.read_head(uri, HEADER_BYTES)
        try:
            size = image_size(head)  # displayed (upright) size, as the run will see it
        except ImageDecodeError:
            if len(head) < HEADER_BYTES:  # that was the whole file: it is unreadable
                raise
            # A header longer than the first bytes: a TIFF's IFDs (at its end, or a
            # multi-page TIFF's later ones) are read by ranges wherever they lie; any other
            # file (a big EXIF or ICC block) is read whole.
            if is_tiff(head):
                with storage.open_read(uri) as file:
                    size = tiff_size_from_file(file)
            else:
                size = image_size(storage.read_bytes(uri))
        check_pixels(size, max_pixels)
        return size, None
    except FileNotFoundError:
        return (0, 0), f"{role} not found: {uri}"
    except ImageDecodeError as error:
        return (0, 0), f"{role} {uri}: {error}"
    except OSError as error:
        return (0, 0), f"{role} {uri}: cannot be read ({describe(error)})"
