"""The `dippipe` command: flags become a frozen config, then one call into the package.

Exit codes: pipeline/exit_codes.py (the README prints the same table).
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import traceback
from collections.abc import Callable
from dataclasses import replace
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.logging import RichHandler

from dip_core import MIN_TILE_SIZE
from pipeline.errors import DippipeError, InfrastructureError
from pipeline.exit_codes import ExitCode
from pipeline.folder import FolderSpec, build_from_folder
from pipeline.images import DEFAULT_MAX_PIXELS, OUTPUT_FORMATS
from pipeline.lock import DEFAULT_STALE_SECONDS, OutLockedError
from pipeline.manifest import ManifestError
from pipeline.runner import RunConfig, run
from pipeline.safetext import PrintableLogFilter, for_console
from pipeline.scheduler import (
    DEFAULT_STALL_SECONDS,
    DEFAULT_WORKER_INFRA_ERRORS,
    DEFAULT_WORKER_WAIT,
)
from pipeline.storage import Storage, StorageOptions
from pipeline.summary import errors_table, summary_table
from pipeline.validate import validate_manifest
from pipeline.worker import WorkerConfig

app = typer.Typer(
    help="Deep Image Prior restoration over a Parquet manifest, on Ray, local or S3 storage.",
    no_args_is_help=True,
    add_completion=False,
)
console = Console(stderr=True, soft_wrap=True)  # whole lines: logs stay greppable

MANIFEST_HELP = "Manifest: a Parquet file, a folder of part files or a glob; path or URI."
MaxPixels = Annotated[
    int,
    typer.Option(
        help="Refuse images whose header declares more pixels than this, before decoding "
        "them (decompression bombs).",
        min=1,
    ),
]


# The S3 flags of every command that reads or writes storage: (name, type, default, help).
S3_FLAGS = (
    ("s3_endpoint_url", str | None, None, "S3 endpoint URL (default: $AWS_ENDPOINT_URL)."),
    ("s3_region", str | None, None, "S3 region (default: $AWS_REGION)."),
    ("s3_anonymous", bool, False, "Unsigned S3 requests (public buckets)."),
    ("s3_profile", str | None, None, "AWS profile (default: $AWS_PROFILE)."),
)


def with_s3_flags(command: Callable[..., Any]) -> Callable[..., Any]:
    """Give a command the S3 flags, in place of its keyword-only ``storage_options``
    parameter, and call it with them as one StorageOptions (flags first, then the AWS
    environment)."""
    flags = [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default,
                          annotation=Annotated[kind, typer.Option(help=help_text)])
        for name, kind, default, help_text in S3_FLAGS
    ]  # fmt: skip
    signature = inspect.signature(command, eval_str=True)  # Typer reads the evaluated types
    parameters = []
    for parameter in signature.parameters.values():
        parameters += flags if parameter.name == "storage_options" else [parameter]

    @functools.wraps(command)
    def with_storage(**values: Any) -> Any:
        options = StorageOptions.from_env(
            endpoint_url=values.pop("s3_endpoint_url"),
            region=values.pop("s3_region"),
            anonymous=values.pop("s3_anonymous"),
            profile=values.pop("s3_profile"),
        )
        return command(storage_options=options, **values)

    typer_signature = signature.replace(parameters=parameters)
    with_storage.__signature__ = typer_signature  # type: ignore[attr-defined]
    return with_storage


PLAIN_LOG_FORMAT = "%(asctime)s %(levelname)s %(message)s"


class _PlainHandler(logging.StreamHandler):
    """One plain line per record, to the console's file as it is at each record (stderr may
    be replaced after set-up, e.g. by a test runner), as Rich's handler does."""

    @property
    def stream(self) -> Any:
        return console.file

    @stream.setter
    def stream(self, value: Any) -> None:  # StreamHandler.__init__ sets it: the console's
        pass


def _setup_logging(quiet: bool) -> None:
    """Rich's columns on a terminal; in a file or a pod's log, one plain line per record
    (Rich would wrap long lines at its default width, and a grep would find half of them)."""
    logger = logging.getLogger("dippipe")
    handler: logging.Handler
    if console.is_terminal:
        handler = RichHandler(console=console, show_path=False, rich_tracebacks=False)
    else:
        handler = _PlainHandler()
        handler.setFormatter(logging.Formatter(PLAIN_LOG_FORMAT))
    handler.addFilter(PrintableLogFilter())  # ids and URIs come from users: no escapes
    logger.handlers = [handler]
    logger.setLevel(logging.WARNING if quiet else logging.INFO)
    logger.propagate = False


def _manifest_failed(error: ManifestError) -> NoReturn:
    console.print(f"[red]manifest rejected, nothing was run:[/] {for_console(error.uri)}")
    for problem in error.problems:
        console.print(f"  - {for_console(problem, None)}")
    raise typer.Exit(ExitCode.UNUSABLE)


def _seconds_or_none(value: float) -> float | None:
    """A timeout flag: 0 means none."""
    return value if value > 0 else None


@app.command("run")
@with_s3_flags
def run_command(
    manifest: Annotated[str, typer.Argument(help=MANIFEST_HELP)],
    out: Annotated[str, typer.Option("--out", "-o", help="Output folder: path or URI.")],
    gpus: Annotated[
        int | None, typer.Option(help="GPU workers (one GPU each); 0 = CPU workers.")
    ] = None,
    address: Annotated[
        str | None, typer.Option(help="Ray cluster: 'auto' or 'ray://host:10001'.")
    ] = None,
    retry_failed: Annotated[bool, typer.Option(help="Rerun jobs that failed before.")] = False,
    workers: Annotated[
        int | None,
        typer.Option(
            help="CPU workers when --gpus 0 (default: one per pending job, up to as many as "
            "the CPUs hold).",
        ),
    ] = None,
    cpus_per_worker: Annotated[
        float | None,
        typer.Option(
            help="Ray CPUs reserved per worker (default: 1; CPU workers without --workers "
            "or --threads share the CPUs: one job on a 4-CPU machine gets all 4).",
        ),
    ] = None,
    threads: Annotated[
        int | None,
        typer.Option(
            help="Torch threads per worker, fixed (default: one per CPU it reserves; CPU "
            "workers left without work at the end of a run lend theirs to the busy ones).",
        ),
    ] = None,
    max_attempts: Annotated[
        int,
        typer.Option(help="Tries per job when its worker dies, stalls or fails around it."),
    ] = 3,
    device: Annotated[str | None, typer.Option(help="Force 'cpu' or 'cuda'.")] = None,
    sync_every: Annotated[int, typer.Option(help="Steps between live progress reports.")] = 50,
    flush_rows: Annotated[
        int, typer.Option(help="Jobs per results shard (at most).", min=1)
    ] = RunConfig.flush_rows,
    flush_mib: Annotated[
        float, typer.Option(help="Write results when this many MiB of traces are buffered.")
    ] = RunConfig.flush_bytes / (1 << 20),
    flush_seconds: Annotated[
        float, typer.Option(help="Write results at least this often.")
    ] = RunConfig.flush_seconds,
    progress: Annotated[bool, typer.Option(help="Show the live progress bar.")] = True,
    log_every: Annotated[
        float | None,
        typer.Option(
            help="Log a plain progress line every SECONDS (0 = never; default: 60 when "
            "stderr is not a terminal, e.g. a pod's log, else never).",
            metavar="SECONDS",
            min=0,
        ),
    ] = None,
    quiet: Annotated[bool, typer.Option(help="Only warnings in the log.")] = False,
    *,
    storage_options: StorageOptions,
    stop: Annotated[
        str | None,
        typer.Option(help="'auto': stop each fit by its output variance; 'fixed': run every step."),
    ] = None,
    ensemble: Annotated[
        int | None, typer.Option(help="Fit M seeds per job and average them.", min=1, max=64)
    ] = None,
    fits_per_gpu: Annotated[
        int,
        typer.Option(
            help="Jobs each worker fits at once, packed in one network (capped on a GPU by "
            "free memory per image size); 0 = auto: 1 (no packing until a GPU measures it pays).",
            min=0,
            max=64,
        ),
    ] = 0,
    lookahead: Annotated[
        int,
        typer.Option(
            help="Jobs per lane read ahead so workers that pack get jobs of the size they "
            "are packing (with --fits-per-gpu > 1); 0 = manifest order.",
            min=0,
        ),
    ] = RunConfig.lookahead,
    max_pixels: MaxPixels = DEFAULT_MAX_PIXELS,
    io_retries: Annotated[
        int | None,
        typer.Option(
            help="Retries of a storage operation after a transient error (connection, "
            "timeout, S3 5xx), with exponential backoff (default: $DIPPIPE_IO_RETRIES or 5).",
            min=0,
        ),
    ] = None,
    force_unlock: Annotated[
        bool, typer.Option(help="Take OUT's lock even if another run seems to hold it.")
    ] = False,
    stale_lock_seconds: Annotated[
        float, typer.Option(help="Take over OUT's lock after this long without a heartbeat.")
    ] = DEFAULT_STALE_SECONDS,
    output_format: Annotated[
        str,
        typer.Option(
            "--format",
            help="Restored images as 'png', 'tiff', or 'same' (TIFF for a TIFF input, "
            "else PNG); at the input's bit depth, with its colour profile and metadata.",
        ),
    ] = "same",
    tile: Annotated[
        int,
        typer.Option(
            help="Edge, in input pixels, of the overlapping tiles a large image is fitted "
            "in; 0 = never tile.",
            min=0,
        ),
    ] = WorkerConfig.tile_size,
    tile_above: Annotated[
        int | None,
        typer.Option(
            help="Tile every image with more pixels than this (default: only images whose "
            "fit would not fit the device's memory).",
            min=1,
        ),
    ] = None,
    job_timeout: Annotated[
        float,
        typer.Option(
            help="Stop a job running longer than SECONDS (its worker is replaced; the job "
            "tried again up to --max-attempts); 0 = no limit.",
            metavar="SECONDS",
            min=0,
        ),
    ] = 0.0,
    stall_seconds: Annotated[
        float,
        typer.Option(
            help="A worker whose job makes no progress for SECONDS is stalled: it is "
            "replaced and the job tried again; 0 = never.",
            metavar="SECONDS",
            min=0,
        ),
    ] = DEFAULT_STALL_SECONDS,
    worker_wait: Annotated[
        float,
        typer.Option(
            help="Stop the run (exit 3) when no worker is placed for SECONDS, at the start "
            "or after losing them all (an autoscaler that never brings a node); 0 = wait "
            "forever.",
            metavar="SECONDS",
            min=0,
        ),
    ] = DEFAULT_WORKER_WAIT,
    worker_infra_errors: Annotated[
        int,
        typer.Option(
            help="Replace a worker after this many infrastructure errors in a row (CUDA, "
            "credentials, storage down: the job goes back to the queue, not failed).",
            min=1,
        ),
    ] = DEFAULT_WORKER_INFRA_ERRORS,
    shared_out: Annotated[
        bool,
        typer.Option(
            help="OUT is a local path that every node of the cluster shares (NFS...); "
            "without it a local OUT is refused when a worker runs on another node.",
        ),
    ] = False,
    rerun_changed: Annotated[
        bool,
        typer.Option(
            help="Run again the finished jobs whose spec (task, inputs, scale, iterations, "
            "seed, params) changed since they ran; without it they are only named.",
        ),
    ] = False,
    ok_on_bad_input: Annotated[
        bool,
        typer.Option(
            help="Exit 0 when the only failed jobs failed on their own input or params "
            "(for orchestrators that retry on any non-zero exit).",
        ),
    ] = False,
    metrics_port: Annotated[
        int | None,
        typer.Option(
            help="Serve the run's Prometheus metrics on this port (the embedded local Ray "
            "only; a cluster exports them through its own Ray metrics setup).",
            min=1,
            max=65535,
        ),
    ] = None,
    fake_fit_seconds: Annotated[float | None, typer.Option(hidden=True)] = None,
) -> None:
    """Run every job of MANIFEST; results, traces and images go to OUT. Reruns resume.

    --stop and --ensemble apply to every job whose own params do not set them.
    """
    _setup_logging(quiet)
    if stop not in (None, "auto", "fixed"):
        console.print(f"[red]--stop must be 'auto' or 'fixed', got {stop!r}[/]")
        raise typer.Exit(ExitCode.UNUSABLE)
    if 0 < tile < MIN_TILE_SIZE:
        console.print(f"[red]--tile must be 0 (never tile) or at least {MIN_TILE_SIZE} pixels[/]")
        raise typer.Exit(ExitCode.UNUSABLE)
    if output_format not in OUTPUT_FORMATS:
        console.print(f"[red]--format must be one of {', '.join(OUTPUT_FORMATS)}, got "
                      f"{for_console(output_format)}[/]")  # fmt: skip
        raise typer.Exit(ExitCode.UNUSABLE)
    defaults = {k: v for k, v in (("stop", stop), ("ensemble", ensemble)) if v is not None}
    if io_retries is not None:  # --io-retries wins over $DIPPIPE_IO_RETRIES
        storage_options = replace(storage_options, retries=io_retries)
    worker = WorkerConfig(
        out=out,
        storage=storage_options,
        device=device,
        threads=threads,
        sync_every=max(1, sync_every),
        fake_fit_seconds=fake_fit_seconds,
        param_defaults=defaults,
        fits_per_gpu=fits_per_gpu,
        max_pixels=max_pixels,
        output_format=output_format,
        tile_size=tile,
        tile_above=tile_above,
    )
    config = RunConfig(
        manifest=manifest,
        worker=worker,
        gpus=gpus,
        workers=workers,
        cpus_per_worker=cpus_per_worker,
        address=address,
        retry_failed=retry_failed,
        max_attempts=max(1, max_attempts),
        flush_rows=flush_rows,
        flush_bytes=max(1, int(flush_mib * (1 << 20))),
        flush_seconds=flush_seconds,
        job_timeout=_seconds_or_none(job_timeout),
        stall_seconds=_seconds_or_none(stall_seconds),
        worker_wait=_seconds_or_none(worker_wait),
        worker_infra_errors=worker_infra_errors,
        shared_out=shared_out,
        rerun_changed=rerun_changed,
        metrics_port=metrics_port,
        show_progress=progress,
        log_every=log_every,
        force_unlock=force_unlock,
        stale_lock_seconds=stale_lock_seconds,
        lookahead=lookahead,
    )
    try:
        summary = run(config, console)
    except ManifestError as error:
        _manifest_failed(error)
    except OutLockedError as error:  # another live run is on OUT: not this run's to fix
        console.print(f"[red]run stopped:[/] {for_console(error, None)}")
        raise typer.Exit(ExitCode.INFRASTRUCTURE) from None
    except InfrastructureError as error:  # workers keep failing, none placed, OUT unwritable
        console.print(f"[red]run stopped:[/] {for_console(error, None)}")
        console.print("finished jobs are kept; rerun the same command to resume")
        raise typer.Exit(ExitCode.INFRASTRUCTURE) from None
    except DippipeError as error:  # cannot start (OUT locked, no storage, no GPUs...)
        console.print(f"[red]run stopped:[/] {for_console(error, None)}")
        raise typer.Exit(ExitCode.UNUSABLE) from None
    except Exception:  # a defect: say so, with the traceback to report
        console.print(f"[red]internal error[/] (please report it):\n{traceback.format_exc()}")
        raise typer.Exit(ExitCode.INTERNAL) from None
    console.print(summary_table(summary, out))
    if summary.errors:
        console.print(errors_table(summary))
    raise typer.Exit(summary.exit_code(ok_on_bad_input))


@app.command("validate")
@with_s3_flags
def validate_command(
    manifest: Annotated[str, typer.Argument(help=MANIFEST_HELP)],
    *,
    storage_options: StorageOptions,
    max_pixels: MaxPixels = DEFAULT_MAX_PIXELS,
) -> None:
    """Check schema, ids, tasks, params, that every file exists and that sizes match."""
    report = validate_manifest(Storage(storage_options), manifest, max_pixels=max_pixels)
    for problem in report.manifest_problems:
        console.print(f"[red]manifest:[/] {for_console(problem, None)}")
    for warning in report.warnings:
        console.print(f"[yellow]warning:[/] {for_console(warning, None)}")
    for row, job_id, problem in report.job_problems:
        console.print(f"[red]row {row} ({for_console(job_id)}):[/] {for_console(problem, None)}")
    if report.ok:
        console.print(f"[green]{manifest}: {report.rows} jobs, no problems[/]")
        return
    shown = len(report.job_problems)
    if report.jobs_with_problems and shown >= 1000:
        console.print(f"(first {shown} problems shown)")
    console.print(
        f"[red]{manifest}: {len(report.manifest_problems)} manifest problem(s), "
        f"{report.jobs_with_problems} of {report.rows} job(s) with problems[/]"
    )
    raise typer.Exit(ExitCode.JOBS_FAILED)


@app.command("manifest")
@with_s3_flags
def manifest_command(
    folder: Annotated[str, typer.Argument(help="Folder of images: path or URI.")],
    task: Annotated[str, typer.Option(help="Task of every job.")],
    out: Annotated[str, typer.Option("--out", "-o", help="Manifest to write (.parquet).")],
    scale: Annotated[int | None, typer.Option(help="super_resolution factor.")] = None,
    iterations: Annotated[int | None, typer.Option(help="Steps per job.")] = None,
    params: Annotated[str | None, typer.Option(help="JSON object of preset overrides.")] = None,
    *,
    storage_options: StorageOptions,
) -> None:
    """Write a manifest for every image of FOLDER (NAME_mask / NAME_flash / NAME_ref beside)."""
    storage = Storage(storage_options)
    try:
        parsed = json.loads(params) if params else None
        spec = FolderSpec(folder, task, scale, iterations, parsed)
        table = build_from_folder(storage, spec)
    except ValueError as error:  # json.JSONDecodeError is a ValueError
        console.print(f"[red]no manifest written:[/] {error}")
        raise typer.Exit(ExitCode.UNUSABLE) from None
    storage.write_parquet(out, table)
    console.print(f"wrote {out}: {table.num_rows} jobs; check it with: dippipe validate {out}")


@app.command("demo")
def demo_command(
    out: Annotated[str, typer.Option("--out", "-o", help="Folder for inputs and outputs.")] = (
        "demo-out"
    ),
    iterations: Annotated[int | None, typer.Option(help="Steps per job (default: demo's).")] = None,
    workers: Annotated[int | None, typer.Option(help="CPU workers (default: one per CPU).")] = None,
) -> None:
    """Degrade three bundled scikit-image photos, restore them, print where to look."""
    from pipeline.demo import run_demo

    _setup_logging(quiet=False)
    raise typer.Exit(run_demo(out, console, iterations=iterations, workers=workers))


@app.command("report")
@with_s3_flags
def report_command(
    out: Annotated[str, typer.Argument(help="Output folder of a run: path or URI.")],
    open_browser: Annotated[
        bool, typer.Option("--open", help="Open the report in a browser (local OUT only).")
    ] = False,
    gallery: Annotated[int, typer.Option(help="Jobs shown in the gallery, at most.")] = 48,
    sort: Annotated[str, typer.Option(help="Gallery ranking: 'psnr' or 'energy'.")] = "psnr",
    thumb: Annotated[int, typer.Option(help="Longest edge of embedded images (px).")] = 256,
    *,
    storage_options: StorageOptions,
) -> None:
    """Write OUT/report.html: summary, failed jobs, gallery with energy / PSNR curves."""
    from pipeline.report import ReportError, ReportOptions, run_report

    storage = Storage(storage_options)
    try:
        options = ReportOptions(gallery=gallery, sort=sort, thumb=thumb)
        run_report(storage, out, options, open_browser, console)
    except (ReportError, ValueError) as error:
        console.print(f"[red]no report written:[/] {error}")
        raise typer.Exit(ExitCode.UNUSABLE) from None
