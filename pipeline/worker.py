"""One job in, one result out: load the inputs, plan and fit them (``dip_core``), write the image.

No Ray here, so a :class:`Fitter` runs and tests in-process; actor.py wraps it in an actor.
Every exception raised by one job becomes that job's ``failed`` row with a message for users
and an ``error_kind`` (faults.py): ``job`` for its own input or params, ``infrastructure`` for
a broken worker, node or service. The scheduler commits only the first; an infrastructure
outcome sends the job back to the queue. Only the death of the whole process (killed,
segfault) escapes, and the scheduler handles that.

``Fitter.progress`` (read by the driver's polls while a job runs) carries the step and a
``beat`` counter that also moves while inputs are read and the output written, so the driver
can tell a slow job from a stalled one (scheduler.py, health.py).

Hook point, for tests and operations: ``DIPPIPE_WORKER_HOOK=module:function`` names a function
that every Fitter calls with itself when it starts. It may append to ``fitter.step_listeners``
callables ``(job_id, step)``, run in the fitting thread at each progress report of a fit (every
``sync_every`` steps) and once when a fake fit ends; what they raise fails the fit as its own
error would. Unset (the default), nothing is imported or called. The scheduler hands the
variable, with the driver's other ``DIPPIPE_*`` variables, to every worker (Ray's runtime_env),
so it also reaches the workers of a cluster started separately; the module must be importable
there (installed, on the nodes' PYTHONPATH, or under the driver's working directory, which Ray
puts on the workers' ``sys.path``). The tests' fault injection (tests/support/worker_faults.py)
is such a hook.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import importlib
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from dip_core import (
    COMPANION_ROLES,
    DipInputError,
    EngineOptions,
    FitItem,
    FitProgress,
    FitResult,
    RestorePlan,
    Tiling,
    fit,
    get_task,
    plan_restore,
    resolve_device,
    run_plan,
)
from pipeline.errors import DippipeError
from pipeline.faults import classify, is_out_of_memory
from pipeline.feature_weights import FeatureNets
from pipeline.images import (
    DEFAULT_MAX_PIXELS,
    DecodedImage,
    ImageDecodeError,
    decode_image,
    encode_image,
    output_format,
    resize_plane,
)
from pipeline.manifest import Job, job_problems, output_size
from pipeline.outputs import KIND_JOB, STATUS_FAILED, STATUS_OK, JobOutcome, image_uri
from pipeline.packing import PackedFitService
from pipeline.storage import Storage, StorageOptions, is_process_local

WORKER_HOOK = "DIPPIPE_WORKER_HOOK"  # module:function, called with each new Fitter (see above)
StepListener = Callable[[str, int], None]  # (job id, step)
log = logging.getLogger("dippipe")


class JobInputError(DippipeError, ValueError):
    """An input file of one job is missing, unreadable or of the wrong size."""


@dataclass(frozen=True)
class WorkerConfig:
    out: str
    storage: StorageOptions = field(default_factory=StorageOptions)
    device: str | None = None  # None: CUDA when this process sees a GPU, else CPU
    # torch CPU threads; None: one per CPU the worker reserves (runner.plan_pool), raised
    # while other workers of the node are idle (scheduler.py), or 1 for a Fitter made
    # directly (1 keeps small shared machines steady); set, it never changes
    threads: int | None = None
    sync_every: int = 50  # steps between progress reports (each one syncs the GPU)
    fake_fit_seconds: float | None = None  # benchmark only: sleep instead of fitting
    # Run-wide params (e.g. from --stop / --ensemble); a job's own params override them.
    param_defaults: dict[str, Any] = field(default_factory=dict)
    fits_per_gpu: int = 0  # jobs a worker takes at once, fits packed (packing.py); 0: auto
    max_pixels: int | None = DEFAULT_MAX_PIXELS  # declared image size refused above this
    output_format: str = "same"  # "png", "tiff" or "same" (TIFF for a TIFF input, else PNG)
    # Tiled fitting (dip_core.Tiling): an image is cut into tiles of `tile_size` px (0: never)
    # when its whole-image fit would not fit this worker's share of the device's memory
    # (fit_memory_limit), or when it has more than `tile_above` pixels.
    tile_size: int = Tiling.size  # dip_core's default
    tile_above: int | None = None


@dataclass(frozen=True)
class JobInputs:
    observation: DecodedImage
    companions: dict[str, np.ndarray] = field(default_factory=dict)  # by input role
    notes: tuple[str, ...] = ()  # what decoding did to the user's files (images.py)


class Threads:
    """The torch CPU threads a worker's fits use, one count per worker process (its lanes
    share it), which the driver may change while a job runs (actor.py ``set_threads``).
    torch's count is per OS thread once that thread has run an op, so ``apply`` is called
    in the thread that computes: at each job's start and at each progress report of a fit."""

    def __init__(self, count: int) -> None:
        self.count = max(1, count)

    def apply(self) -> None:
        if torch.get_num_threads() != self.count:
            torch.set_num_threads(self.count)


class Fitter:
    """A long-lived fitting worker: holds storage clients and the feature net between jobs."""

    def __init__(
        self,
        config: WorkerConfig,
        worker: str = "local",
        node: str | None = None,
        service: PackedFitService | None = None,
        ship_process_local: bool = False,
        threads: Threads | None = None,
    ):
        self.config = config
        self.threads = threads or Threads(config.threads or 1)
        self.service = service
        self._lanes = 1 if service is None else service.runner.max_slots  # fits sharing a device
        # In a worker process: memory:// inputs arrive with the job, outputs go back to the
        # driver (outcome.files), the only process that can read and write them.
        self.ship_process_local = ship_process_local
        self.worker, self.node = worker, node or socket.gethostname()
        self.storage = Storage(config.storage)
        self.feature_nets = FeatureNets(self.storage.read_bytes)  # pre-image jobs
        self._payload: dict[str, bytes] = {}
        self._shipped: dict[str, bytes] = {}
        self.progress: dict[str, Any] = {}
        self.beats = 0  # progress of any kind (steps, reads, writes): the stall check
        self.step_listeners: list[StepListener] = []
        self.threads.apply()
        _run_worker_hook(self)

    def run(self, job: Job, attempt: int = 1, payload: dict | None = None) -> JobOutcome:
        """Run one job; `payload` holds the bytes of its process-local (memory://) inputs."""
        started = time.perf_counter()
        self.threads.apply()
        self._payload, self._shipped = payload or {}, {}
        self.beats += 1
        self.progress = {"id": job.id, "step": 0, "iterations": job.iterations, "energy": None,
                         "beat": self.beats}  # fmt: skip
        try:
            outcome = self._run(job)
        except Exception as error:  # one job's problem must never stop the worker
            outcome = JobOutcome(_failed_row(job, describe_error(error), classify(error)))
        finally:
            self.progress = {}
        outcome.files = self._shipped
        outcome.row.update(
            seconds=time.perf_counter() - started, attempts=attempt, worker=self.worker
        )
        outcome.row.update(node=self.node, peak_rss=peak_rss())
        return outcome

    def _run(self, job: Job) -> JobOutcome:
        problems = job_problems(job)
        if problems:
            raise DipInputError("; ".join(problems))
        inputs = self.load_inputs(job)
        if self.config.fake_fit_seconds is not None:
            return self._fake(job, inputs)
        params = {**self.config.param_defaults, **(job.parsed_params() or {})} or None
        task = get_task(job.task)
        feature_net = None
        if task.needs_feature_net:  # the preset says which layer; params may name the weights
            layer = task.resolve_preset(params, job.scale).feature_layer
            feature_net = self.feature_nets.get((params or {}).get("feature_weights"), layer)
        plan = plan_restore(
            job.task,
            torch.from_numpy(inputs.observation.pixels),
            scale=job.scale,
            iterations=job.iterations,
            seed=job.seed,
            params=params,
            feature_net=feature_net,
            sync_every=self.config.sync_every,
            tiling=self.tiling,
            **{role: torch.from_numpy(pixels) for role, pixels in inputs.companions.items()},
        )
        result = run_plan(plan, lambda plan: self._fit_members(job, plan))
        output, dropped = self.write_output(job, result.image.numpy(), inputs.observation)
        row = _ok_row(job, output, result.iterations, result.energy, result.psnr, result.device)
        row.update(stopped_at=result.stopped_at, stop_reason=result.stop_reason,
                   tiles=result.tiles, notes=_notes(inputs.notes + dropped))  # fmt: skip
        missing = [None] * len(result.steps)
        trace = {
            "step": result.steps.tolist(),
            "energy": result.energies.tolist(),
            "psnr": missing if result.psnrs is None else result.psnrs.tolist(),
            "stop_stat": missing if result.stop_stats is None else _finite(result.stop_stats),
        }
        return JobOutcome(row, trace)

    def _fit_members(self, job: Job, plan: RestorePlan) -> list[FitResult]:
        """The job's fits (ensemble members, tiles): packed with other jobs' fits when this
        worker shares a PackedFitService, else one after the other. A job that runs out of
        memory is fitted once more, every fit alone and recomputing activations in backward
        instead of keeping them (slower, a fraction of the memory), rather than failing.
        When one fit fails, the job's others still running stop at their next report."""
        try:
            return self._fit_all(job, plan, None)
        except RuntimeError as error:  # torch's OutOfMemoryError, or cuBLAS's (faults.py)
            if not is_out_of_memory(error):
                raise
            # Only the message leaves this block: the error's traceback holds the failed
            # pack (weights, activations) alive, which the retry needs freed.
            reason = str(error).splitlines()[0]
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        log.warning("job %s ran out of memory (%s); fitting it again with activation "
                    "checkpointing", job.id, reason)  # fmt: skip
        options = replace(EngineOptions.fastest_for(resolve_device(self.config.device)),
                          checkpointing=True)  # fmt: skip
        return self._fit_all(job, plan, options)

    def _fit_all(self, job: Job, plan: RestorePlan, options) -> list[FitResult]:
        """Every fit of the plan, in order; ``options`` set: one after the other, alone."""
        progress = JobProgress(self, job.id, sum(config.iterations for _, config in plan.fits))
        callbacks = [[progress.reporter(index)] for index in range(len(plan.fits))]
        try:
            if self.service is not None and options is None:
                items = [FitItem(None, problem, config, callbacks[index])
                         for index, (problem, config) in enumerate(plan.fits)]  # fmt: skip
                return self.service.run(items)
            return [self._fit(problem, config, callbacks[index], options)
                    for index, (problem, config) in enumerate(plan.fits)]  # fmt: skip
        except BaseException:
            progress.cancelled = True
            raise

    def _fit(self, problem, config, callbacks, options) -> FitResult:
        return fit(problem, config, device=self.config.device, callbacks=callbacks,
                   options=options)  # fmt: skip

    def heartbeat(self) -> None:
        """Progress that is not a fit step (an input read, the output written): a job that
        reads a large input for minutes is slow, not stalled."""
        self.beats += 1
        if self.progress:
            self.progress = {**self.progress, "beat": self.beats}

    def _notify(self, job_id: str, step: int) -> None:
        for listener in self.step_listeners:
            listener(job_id, step)

    def _fake(self, job: Job, inputs: JobInputs) -> JobOutcome:
        """Benchmark mode: a job of known cost that still reads inputs and writes outputs."""
        time.sleep(self.config.fake_fit_seconds or 0.0)
        self._notify(job.id, 0)
        output, dropped = self.write_output(job, inputs.observation.pixels, inputs.observation)
        row = _ok_row(job, output, 0, 0.0, None, "fake")
        row["notes"] = _notes(inputs.notes + dropped)
        return JobOutcome(row, {"step": [0], "energy": [0.0], "psnr": [None], "stop_stat": [None]})

    def load_inputs(self, job: Job) -> JobInputs:
        """The image and the companion images the job names, each checked against the size
        its role says (roles.py); job_problems has checked the task."""
        observation = self._read(job.image, "image")
        sizes = {"image": observation.size, "output": output_size(job, observation.size)}
        companions: dict[str, np.ndarray] = {}
        notes = list(observation.metadata.notes)
        for role in COMPANION_ROLES:
            uri = job.inputs.get(role.name)
            if not uri:
                continue
            image = self._read_sized(uri, role.name, sizes[role.size_of])
            notes += [f"{role.name}: {note}" for note in image.metadata.notes]
            if role.kind == "mask":  # any non-zero channel marks a known pixel
                companions[role.name] = np.asarray((image.pixels > 0).any(axis=0), np.float32)
            else:
                companions[role.name] = _match_channels(image, observation)
        return JobInputs(observation, companions, tuple(notes))

    def _read(self, uri: str, role: str) -> DecodedImage:
        try:
            data = self._payload.get(uri)
            data = self.storage.read_bytes(uri) if data is None else data
            self.heartbeat()
            return decode_image(data, self.config.max_pixels)
        except FileNotFoundError:
            raise JobInputError(f"{role} not found: {uri}") from None
        except ImageDecodeError as error:
            raise JobInputError(f"{role} {uri}: {error}") from None

    def _read_sized(self, uri: str, role: str, size: tuple[int, int]) -> DecodedImage:
        image = self._read(uri, role)
        if image.size != size:
            raise JobInputError(
                f"{role} {uri} is {image.size[0]}x{image.size[1]} pixels, "
                f"expected {size[0]}x{size[1]}"
            )
        return image

    def write_output(
        self, job: Job, pixels: np.ndarray, source: DecodedImage
    ) -> tuple[str, tuple[str, ...]]:
        """Write the restored image in the run's format, at the source's depth, with the
        source's profile and metadata; returns its URI and what the format could not hold."""
        alpha = source.alpha
        if alpha is not None and alpha.shape != pixels.shape[1:]:  # super-resolution
            alpha = resize_plane(alpha, (pixels.shape[2], pixels.shape[1]))
        factor = pixels.shape[2] / source.size[0]
        if factor != 1 and source.metadata.dpi is not None:  # same print size, more pixels
            dpi = (source.metadata.dpi[0] * factor, source.metadata.dpi[1] * factor)
            source = replace(source, metadata=replace(source.metadata, dpi=dpi))
        encoded = encode_image(pixels, alpha, source, output_format(self.config.output_format,
                                                                   source))  # fmt: skip
        uri = image_uri(self.config.out, job.id, encoded.extension)
        self.heartbeat()
        if self.ship_process_local and is_process_local(uri):
            self._shipped[uri] = encoded.data
        else:
            self.storage.write_bytes(uri, encoded.data)
        return uri, encoded.dropped

    @functools.cached_property
    def tiling(self) -> Tiling | None:
        """When and how this worker tiles an image (WorkerConfig.tile_size / tile_above); the
        same for every job, so the device and the OS are asked once per worker."""
        if self.config.tile_size <= 0:
            return None
        limit = fit_memory_limit(resolve_device(self.config.device), self._lanes)
        size = self.config.tile_size  # a small tile gets a margin in proportion
        return Tiling(size=size, margin=min(Tiling.margin, size // 4),
                      above_pixels=self.config.tile_above, memory_limit=limit)  # fmt: skip


class JobProgress:
    """A job's live progress over all its fits (ensemble members, tiles): steps done and
    planned summed, so the bar's steps per second stay right when a fit ends and the next
    one starts from step 0."""

    def __init__(self, fitter: Fitter, job_id: str, planned: int) -> None:
        self.fitter, self.job_id, self.planned = fitter, job_id, planned
        self.done: dict[int, int] = {}  # fit index -> steps it has done
        self.lock = threading.Lock()  # packed fits report from the packing thread
        self.cancelled = False  # a fit of the job failed: the others stop (their callbacks)

    def reporter(self, index: int) -> Callable[[FitProgress], bool]:
        def report(progress: FitProgress) -> bool:
            if self.cancelled:  # the job has failed: its late reports are not its progress
                return True
            with self.lock:
                self.done[index] = progress.step
                step = sum(self.done.values())
            self.fitter.threads.apply()  # in the fitting thread: the count it uses
            self.fitter.beats += 1
            self.fitter.progress = {
                "id": self.job_id,
                "step": step,
                "iterations": self.planned,
                "energy": progress.energy,
                "beat": self.fitter.beats,
            }
            self.fitter._notify(self.job_id, step)
            return self.cancelled

        return report


def _match_channels(image: DecodedImage, like: DecodedImage) -> np.ndarray:
    """A grey guide/reference may go with a colour image (repeated); the reverse is refused."""
    pixels, wanted = image.pixels, like.pixels.shape[0]
    if pixels.shape[0] == wanted:
        return pixels
    if pixels.shape[0] == 1:
        return np.repeat(pixels, wanted, axis=0)
    raise JobInputError(f"a colour guide/reference cannot go with a greyscale image ({wanted} ch)")


def peak_rss() -> int | None:
    """This process's peak resident memory in bytes (Linux reports KiB, macOS bytes)."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def _notes(notes: tuple[str, ...]) -> str | None:
    return "; ".join(notes) or None


FIT_MEMORY_SHARE = 0.7  # of a GPU's memory, for fits: the rest for CUDA's context and cache
CPU_FIT_MEMORY_SHARE = 0.25  # of a CPU machine's memory: a node runs several workers
# A container's (pod's) memory limit, as its own cgroup shows it: v2, then v1.
CGROUP_MEMORY_LIMITS = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")


def fit_memory_limit(device: torch.device, lanes: int) -> int | None:
    """Bytes one fit of this worker may use: its lane's share of the GPU's total memory, or
    on a CPU of a quarter of the machine's memory (or the container's limit, if lower). Total,
    not free, memory: whether a job is tiled must not depend on what else ran before (the
    same job and seed give the same result). None where the OS does not say (then every
    image larger than one tile is tiled)."""
    lanes = max(1, lanes)
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        return int(FIT_MEMORY_SHARE * total) // lanes
    try:
        memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None
    for path in CGROUP_MEMORY_LIMITS:  # absent, or "max" (no limit): the machine's memory
        with contextlib.suppress(OSError, ValueError), open(path) as limit:
            memory = min(memory, int(limit.read().strip()))
    return int(CPU_FIT_MEMORY_SHARE * memory) // lanes


def _base_row(job: Job) -> dict[str, Any]:
    return {"id": job.id, "task": job.task, "seed": job.seed}


def _ok_row(job: Job, output: str, iterations: int, energy: float, psnr, device: str) -> dict:
    return {
        **_base_row(job),
        "status": STATUS_OK,
        "error": None,
        "output": output,
        "iterations": iterations,
        "energy": energy,
        "psnr": psnr,
        "device": device,
    }


def _failed_row(job: Job, error: str, kind: str = KIND_JOB) -> dict[str, Any]:
    return {**_base_row(job), "status": STATUS_FAILED, "error": error, "error_kind": kind}


def failed_outcome(
    job: Job, error: str, attempts: int, worker: str | None = None, kind: str = KIND_JOB
) -> JobOutcome:
    """A failed row made by the scheduler (e.g. the worker process died too often)."""
    row = _failed_row(job, error, kind)
    row.update(attempts=attempts, worker=worker)
    return JobOutcome(row)


def describe_error(error: BaseException) -> str:
    """Errors meant for users keep their message; anything else also names its type."""
    if isinstance(error, (DipInputError, JobInputError)):
        return str(error)
    if is_out_of_memory(error):
        torch.cuda.empty_cache()
        return "out of GPU memory (try a smaller image or network: params channels/depth)"
    return f"{type(error).__name__}: {error}"


def _run_worker_hook(fitter: Fitter) -> None:
    """Call the function DIPPIPE_WORKER_HOOK names, if any, with a new Fitter."""
    spec = os.environ.get(WORKER_HOOK)
    if not spec:
        return
    module, colon, name = spec.partition(":")
    if not (module and colon and name):
        raise ValueError(f"{WORKER_HOOK} must be 'module:function', got {spec!r}")
    getattr(importlib.import_module(module), name)(fitter)


def _finite(values: torch.Tensor) -> list[float | None]:
    """NaN (the stopping window not yet full) becomes null in the trace."""
    return [v if v == v else None for v in values.tolist()]
