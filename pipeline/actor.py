"""The fitting actor: a long-lived Ray process with one Fitter per lane (worker.py).

One actor per GPU (or per CPU share). Each lane runs one job at a time, in its own thread of
the actor (``max_concurrency`` = lanes); with several lanes the fits are packed on the device
(packing.py). Besides, a "status" concurrency group answers ``describe`` / ``progress`` /
``packing`` / ``set_threads`` while the lanes fit.

A worker that Ray gave a GPU must be able to use it: when CUDA is unusable in its process and
the run did not ask for ``--device cpu``, ``describe()`` reports a ``device_error`` that stops
the run (scheduler.py) instead of fitting on one CPU thread while the GPU node bills. One
exception: a node without any NVIDIA device file declares *logical* GPUs (``ray start
--num-gpus`` on a CPU machine, as the tests do) and fits on its CPU, as before.
"""

from __future__ import annotations

import glob
import os
from typing import Any

import ray
import torch

from pipeline.manifest import Job
from pipeline.outputs import JobOutcome
from pipeline.packing import PackedFitService, PackingConfig
from pipeline.worker import WORKER_HOOK, Fitter, Threads, WorkerConfig

# --fits-per-gpu auto on a CUDA worker (packing.py caps it by memory): 1, no packing, until a
# device shows that packing pays (issue 17's GPU table); --fits-per-gpu K packs on request.
AUTO_CUDA_LANES = 1
NVIDIA_DEVICE_FILES = "/dev/nvidia[0-9]*"  # present on a node with NVIDIA GPUs, driver or not


def lanes_for(config: WorkerConfig, auto_cuda: int | None = None) -> int:
    """Jobs a worker takes at once: --fits-per-gpu, or auto (0): AUTO_CUDA_LANES on CUDA, 1
    on a CPU.
    ``auto_cuda`` answers for a process that cannot look at its own device (the driver)."""
    if config.fits_per_gpu > 0:
        return config.fits_per_gpu
    if auto_cuda is not None:
        return auto_cuda
    uses_cuda = config.device != "cpu" and torch.cuda.is_available()
    return AUTO_CUDA_LANES if uses_cuda else 1


def worker_hook_env() -> dict[str, str]:
    """With a worker hook set (worker.py), the variables that go to every worker through Ray's
    runtime_env: the hook and the driver's other DIPPIPE_* settings (workers of a cluster
    started separately do not inherit the driver's environment). Empty without a hook."""
    if not os.environ.get(WORKER_HOOK):
        return {}
    return {key: value for key, value in os.environ.items() if key.startswith("DIPPIPE_")}


def device_error(device: str | None, gpu_ids: list, nvidia_files: list[str]) -> str | None:
    """Why this worker cannot fit on the GPU Ray gave it, or None. ``--device cpu`` never
    needs one; without --device, a node with no NVIDIA device file has logical GPUs only."""
    if not gpu_ids or device == "cpu" or (device or "cuda").split(":")[0] != "cuda":
        return None
    if device is None and not nvidia_files:
        return None
    if not torch.cuda.is_available():
        built = torch.version.cuda or "none (a CPU-only build)"
        reason = f"torch.cuda.is_available() is False (torch {torch.__version__}, CUDA {built})"
    else:
        try:  # a context that cannot be created (driver mismatch, ECC, exclusive mode)
            torch.zeros(1, device=device or "cuda").add_(1).cpu()
            return None
        except Exception as error:
            reason = f"{type(error).__name__}: {str(error).strip().splitlines()[0]}"
    return (
        f"this worker was given GPU(s) {gpu_ids} but cannot use CUDA: {reason}; fix the "
        "node's driver or image, or run with --device cpu to fit on CPUs on purpose"
    )


# Ray's type stubs know neither `concurrency_groups` nor the `.options` of the actor class.
@ray.remote(max_restarts=0, concurrency_groups={"status": 1})  # type: ignore[call-overload]
class FitActor:
    """Fitters in their own process, one per lane, each with one job at a time (one lane
    unless the worker packs several fits per GPU); `progress` answers while they fit."""

    def __init__(self, config: WorkerConfig, name: str) -> None:
        node = ray.util.get_node_ip_address()
        gpus = ray.get_gpu_ids()
        self.info: dict[str, Any] = {"worker": name, "node": node, "pid": os.getpid(),
                                     "gpus": gpus}  # fmt: skip
        self.fitters: list[Fitter] = []
        self.service = None
        self.threads = Threads(config.threads or 1)  # one count for the process's fits
        problem = device_error(config.device, gpus, glob.glob(NVIDIA_DEVICE_FILES))
        if problem:  # reported by describe(); no Fitter may fall back to the CPU
            self.info.update(lanes=0, device_error=problem)
            return
        lanes = lanes_for(config)
        self.info.update(lanes=lanes, threads=self.threads.count)
        if lanes > 1:
            self.service = PackedFitService(PackingConfig(lanes, config.device))
        self.fitters = [
            Fitter(config, name, node, self.service, ship_process_local=True, threads=self.threads)
            for _ in range(lanes)
        ]

    def run(
        self,
        job: Job,
        attempt: int,
        payload: dict[str, bytes],
        lane: int = 0,
        threads: int | None = None,
    ) -> JobOutcome:
        """Run the job in the lane; ``threads``: the torch threads from now on (the driver's
        share of the node's CPUs, scheduler.py), else unchanged."""
        if threads is not None:
            self.threads.count = max(1, threads)
        return self.fitters[lane].run(job, attempt, payload)

    @ray.method(concurrency_group="status")
    def set_threads(self, threads: int) -> None:
        """Torch threads for the fits from their next progress report on."""
        self.threads.count = max(1, threads)

    @ray.method(concurrency_group="status")
    def describe(self) -> dict[str, Any]:
        return self.info

    @ray.method(concurrency_group="status")
    def progress(self, lane: int = 0) -> dict[str, Any]:
        return self.fitters[lane].progress

    @ray.method(concurrency_group="status")
    def packing(self) -> dict[str, Any] | None:
        """The pack occupancy counts so far (packing.py); None when this worker does not pack."""
        return None if self.service is None else self.service.stats()
