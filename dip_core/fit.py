"""The fitting loop: Adam on the network weights, jitter, output averaging, a trace.

Only the loop lives here. The trace is kept on the device and read back every
``sync_every`` steps, so the loop never waits on the host inside a step. Divergence is
checked at those points: a window whose energy jumps is thrown away whole, weights AND
optimiser state are restored from the last good checkpoint, and the fit continues with
fresh jitter (the reference code keeps Adam's moments and still applies the bad step).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .inputs import jittered
from .metrics import psnr
from .networks import build_network
from .tasks import Problem


@dataclass(frozen=True)
class FitConfig:
    iterations: int
    lr: float
    reg_noise_std: float
    exp_weight: float  # 0: the result is the last output, not an average
    seed: int = 0
    sync_every: int = 50  # steps between host reads of the trace (progress, divergence)
    divergence_ratio: float = 10**0.5  # an energy 5 dB above the best so far is a jump
    divergence_warmup: int = 50  # early steps bounce; they are not checked
    max_rollbacks: int = 10

    @classmethod
    def from_preset(cls, preset, iterations: int | None = None, seed: int = 0, **kw) -> FitConfig:
        steps = preset.iterations if iterations is None else iterations
        return cls(steps, preset.lr, preset.reg_noise_std, preset.exp_weight, seed, **kw)


@dataclass(frozen=True)
class FitProgress:
    step: int  # steps done
    iterations: int  # steps planned
    energy: float  # energy of the latest step
    psnr: float | None  # PSNR of the current result against the reference
    elapsed: float  # seconds since the fit started


@dataclass
class FitResult:
    image: torch.Tensor  # (C, H, W) on the CPU, target size
    steps: torch.Tensor  # 1-D int64: step index of each trace entry
    energies: torch.Tensor  # 1-D float64
    psnrs: torch.Tensor | None  # 1-D float64, with a reference
    energy: float  # energy of the returned image
    psnr: float | None
    iterations: int  # steps run
    seconds: float
    seed: int
    device: str
    stopped_at: int
    stop_reason: str  # "iterations" | "callback" | "auto"
    rollbacks: int = 0


Callback = Callable[[FitProgress], "bool | None"]
StepHook = Callable[[int, torch.nn.Module], None]


class _Checkpoint:
    """A copy of everything a rollback must restore, kept on the device."""

    def __init__(self, step, network, optimizer, average):
        self.step = step
        self.weights = {k: v.detach().clone() for k, v in network.state_dict().items()}
        self.optimizer = copy.deepcopy(optimizer.state_dict())
        self.average = None if average is None else average.clone()

    def restore(self, network, optimizer):
        network.load_state_dict(self.weights)
        optimizer.load_state_dict(copy.deepcopy(self.optimizer))
        return None if self.average is None else self.average.clone()


def _jumped(window: torch.Tensor, best_before: float, first_step: int, cfg: FitConfig) -> bool:
    """True when a step of the window is non-finite or jumps far above the running best."""
    if not torch.isfinite(window).all():
        return True
    running_best = torch.cummin(window, 0).values
    previous = torch.cat([torch.tensor([best_before], dtype=window.dtype), running_best[:-1]])
    checked = torch.arange(first_step, first_step + len(window)) >= cfg.divergence_warmup
    return bool((checked & (window > cfg.divergence_ratio * previous)).any())


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _seeded_network(problem: Problem, seed: int, device: torch.device) -> torch.nn.Module:
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        return build_network(problem.spec).to(device).train()


def fit(
    problem: Problem,
    config: FitConfig,
    *,
    device: str | torch.device | None = None,
    callbacks: Sequence[Callback] = (),
    step_hook: StepHook | None = None,
) -> FitResult:
    """Fit a fresh, seeded network to the problem; see the module docstring."""
    start = time.perf_counter()
    dev = resolve_device(device)
    problem.to(dev)
    network = _seeded_network(problem, config.seed, dev)
    generator = torch.Generator(device=dev)
    generator.manual_seed(config.seed)
    z = problem.network_input(generator)
    optimizer = torch.optim.Adam(network.parameters(), lr=config.lr)
    loop = _Loop(problem, config, network, optimizer, z, generator)
    reason = loop.run(callbacks, step_hook, start)
    image = loop.result_image()
    with torch.no_grad():
        energy = problem.energy(problem.operator(image), problem.data).item()
        final_psnr = None if problem.reference is None else psnr(image, problem.reference).item()
    return FitResult(
        image=image[0].float().cpu(),
        steps=torch.arange(loop.step, dtype=torch.int64),
        energies=loop.energies[: loop.step].double().cpu(),
        psnrs=None if loop.psnrs is None else loop.psnrs[: loop.step].double().cpu(),
        energy=energy,
        psnr=final_psnr,
        iterations=loop.step,
        seconds=time.perf_counter() - start,
        seed=config.seed,
        device=str(dev),
        stopped_at=loop.step,
        stop_reason=reason,
        rollbacks=loop.rollbacks,
    )


class _Loop:
    """The state of one fit between steps."""

    def __init__(self, problem, config, network, optimizer, z, generator):
        self.problem, self.config = problem, config
        self.network, self.optimizer = network, optimizer
        self.z, self.generator = z, generator
        n, dev = config.iterations, z.device
        self.energies = torch.full((n,), float("nan"), device=dev)
        self.psnrs = (
            None if problem.reference is None else torch.full((n,), float("nan"), device=dev)
        )
        self.average: torch.Tensor | None = None
        self.step, self.rollbacks = 0, 0

    def one_step(self) -> None:
        out = self.network(jittered(self.z, self.config.reg_noise_std, self.generator))
        energy = self.problem.data_energy(out)
        self.optimizer.zero_grad(set_to_none=True)
        energy.backward()
        self.optimizer.step()
        with torch.no_grad():
            crop = self.problem.placement.crop(out.detach())
            w = self.config.exp_weight
            if w > 0:
                self.average = crop if self.average is None else self.average * w + crop * (1 - w)
            self.energies[self.step] = energy.detach()
            if self.psnrs is not None:
                current = self.average if w > 0 else crop
                self.psnrs[self.step] = psnr(current, self.problem.reference)
        self.step += 1

    def run(self, callbacks, step_hook, start) -> str:
        cfg = self.config
        checkpoint = _Checkpoint(0, self.network, self.optimizer, self.average)
        best = float("inf")
        while self.step < cfg.iterations:
            if step_hook is not None:
                step_hook(self.step, self.network)
            self.one_step()
            if self.step % cfg.sync_every and self.step < cfg.iterations:
                continue
            window = self.energies[checkpoint.step : self.step].double().cpu()  # host sync
            if _jumped(window, best, checkpoint.step, cfg) and self.rollbacks < cfg.max_rollbacks:
                self.average = checkpoint.restore(self.network, self.optimizer)
                self.step, self.rollbacks = checkpoint.step, self.rollbacks + 1
                continue
            best = min(best, float(window.min()))
            checkpoint = _Checkpoint(self.step, self.network, self.optimizer, self.average)
            if self._notify(callbacks, window, start):
                return "callback"
        return "iterations"

    def _notify(self, callbacks, window, start) -> bool:
        if not callbacks:
            return False
        last_psnr = None if self.psnrs is None else float(self.psnrs[self.step - 1])
        progress = FitProgress(
            self.step, self.config.iterations, float(window[-1]), last_psnr,
            time.perf_counter() - start,
        )  # fmt: skip
        stops = [bool(cb(progress)) for cb in callbacks]
        return any(stops)

    @torch.no_grad()
    def result_image(self) -> torch.Tensor:
        """The averaged output where the task averages; otherwise the network's output on
        the un-jittered input (not the last jittered one, as the reference code returns)."""
        if self.average is not None:
            return self.average
        return self.problem.placement.crop(self.network(self.z))
