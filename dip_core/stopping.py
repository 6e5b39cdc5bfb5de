"""A no-reference stopping rule: the windowed moving variance of recent outputs (ES-WMV),
armed only once the fit has done its first job.

Wang et al., "Early Stopping for Deep Image Prior" (arXiv 2112.06074): while the network
fits the image, successive outputs change less and less; once it starts fitting the noise
they change more again, so the variance of the last ``window`` outputs has a minimum near
the best step. With DIP's input jitter the variance also measures how sensitive the network
is to its input, which grows as it fits detail: the variance often has its lowest value on
the early transient (step 149 of 1,500 on scikit-image's rocket at 96 px, where the image
100 steps later was 2.7 dB below the best one, at step 476).

So the rule only considers a step once the fit is *armed*:
- where the task knows its noise floor (denoising: a fraction of the noise variance
  estimated from the observation, see noise.py), once the windowed mean energy is below it:
  the discrepancy principle, a fit whose residual is the noise level has fitted the image;
- otherwise once the energy has reached its plateau: its windowed mean fell by less than
  ``plateau`` (relative) over the last window.
From then on it keeps the result at the lowest variance and stops when no lower variance
has come for ``patience`` steps. A fit too short for the rule to judge (fewer than
``2 * window + patience`` steps) is never stopped. Everything stays on the device; the
caller asks ``should_stop`` only at its sync points.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

MAX_TRACKED_VALUES = 1 << 20  # larger outputs are subsampled to bound the window's memory


@dataclass(frozen=True)
class StopRule:
    window: int = 100  # the ES-WMV paper's window
    patience: int = 300
    # Steps after the lowest variance at which the result is taken. An exponential average
    # of the outputs lags the raw outputs by about 1 / (1 - weight) steps, so averaging
    # tasks take their result that much later (always before the rule fires).
    result_delay: int = 0
    plateau: float = 0.05  # arming without a noise floor: relative energy drop per window

    @classmethod
    def for_averaging(cls, window: int, patience: int, exp_weight: float) -> StopRule:
        delay = round(1 / (1 - exp_weight)) if exp_weight > 0 else 0
        return cls(window, patience, min(delay, max(patience - 1, 0)))

    def shortest_fit(self) -> int:
        """Fewer steps than this and the rule cannot judge: a window to fill, one more to
        see the energy's plateau, and the patience to see the variance rise again."""
        return 2 * self.window + self.patience


class VarianceStopper:
    def __init__(
        self, rule: StopRule, example: torch.Tensor, energy_floor: float | None = None
    ) -> None:
        self.rule, self.energy_floor = rule, energy_floor
        self.stride = 1
        while example[..., :: self.stride, :: self.stride].numel() > MAX_TRACKED_VALUES:
            self.stride += 1
        sample = self._sample(example)
        device = example.device
        self.buffer = torch.zeros((rule.window, *sample.shape), device=device)
        self.sum = torch.zeros(sample.shape, dtype=torch.float64, device=device)
        self.sum_squares = torch.zeros((), dtype=torch.float64, device=device)
        # The last 2 * window energies: the newest window and the one before it.
        self.energies = torch.zeros(2 * rule.window, dtype=torch.float64, device=device)
        self.recent_energy = torch.zeros((), dtype=torch.float64, device=device)
        self.older_energy = torch.zeros((), dtype=torch.float64, device=device)
        self.armed = torch.zeros((), dtype=torch.bool, device=device)
        self.count = torch.zeros((), dtype=torch.long, device=device)  # steps in the windows
        self.best_variance = torch.full((), float("inf"), dtype=torch.float64, device=device)
        self.best_step = torch.full((), -1, dtype=torch.long, device=device)
        self.capture_step = torch.full((), -1, dtype=torch.long, device=device)
        self.best_image = torch.zeros_like(example)
        self.decision: tuple[int, int] | None = None  # (chosen step, steps done when fired)

    def _sample(self, x: torch.Tensor) -> torch.Tensor:
        return x[..., :: self.stride, :: self.stride]

    def _track_energy(self, energy: torch.Tensor) -> None:
        # Ring slots not yet written hold 0 (forget_from clears them), so the removals
        # below run every step and subtract exactly 0 until their window is full: no
        # branch on the (device-side) count, so the step can be replayed as a CUDA graph.
        window = self.rule.window
        count = self.count
        leaving = _at(self.energies, count % (2 * window))  # the oldest value leaves
        moving = _at(self.energies, (count - window) % (2 * window))  # one window back
        self.older_energy.sub_(leaving).add_(moving)
        self.recent_energy.sub_(moving)
        _put(self.energies, count % (2 * window), energy.double())
        self.recent_energy.add_(energy.double())
        seen = count + 1
        if self.energy_floor is not None:
            self.armed |= (seen >= window) & (self.recent_energy / window < self.energy_floor)
        else:
            drop = (self.older_energy - self.recent_energy) / window
            self.armed |= (seen >= 2 * window) & (
                drop < self.rule.plateau * self.recent_energy / window
            )

    def update(
        self, step: int | torch.Tensor, output: torch.Tensor, result: torch.Tensor,
        energy: torch.Tensor,
    ) -> torch.Tensor:  # fmt: skip
        """Add step's raw output and energy; keep ``result`` if the fit is armed and the
        variance is the lowest so far. Returns the window's variance per value (NaN until
        the window is full). ``step`` may be a device tensor: nothing here reads the device."""
        self._track_energy(energy)
        sample = self._sample(output).float()
        n = self.rule.window
        slot = self.count % n
        old = _at(self.buffer, slot).double()  # zeros until the window has wrapped
        self.sum.sub_(old)
        self.sum_squares.sub_((old * old).sum())
        _put(self.buffer, slot, sample)
        self.sum.add_(sample.double())
        self.sum_squares.add_((sample.double() ** 2).sum())
        self.count.add_(1)
        variance = (self.sum_squares / n - ((self.sum / n) ** 2).sum()) / sample.numel()
        variance = torch.where(self.count >= n, variance, torch.full_like(variance, math.nan))
        if self.decision is not None:  # the rule has chosen (not enforced): keep its choice
            return variance
        # NaN (a window not yet full) is never better.
        better = self.armed & (variance < self.best_variance)
        self.best_variance.copy_(torch.where(better, variance, self.best_variance))
        # A fill kernel, not torch.tensor(step): that is a host-to-device copy, which
        # synchronises the stream every step on CUDA.
        now = step if isinstance(step, torch.Tensor) else torch.full_like(self.best_step, step)
        self.best_step.copy_(torch.where(better, now, self.best_step))
        delayed = now + self.rule.result_delay
        self.capture_step.copy_(torch.where(better, delayed, self.capture_step))
        self.best_image.copy_(torch.where(self.capture_step == now, result, self.best_image))
        return variance

    def should_stop(self, steps_done: int) -> bool:
        """True once ``patience`` steps have passed since the lowest variance (one host
        read). The first time, the choice is recorded in ``decision`` and kept."""
        if self.decision is not None:
            return True
        best = int(self.best_step)
        if best >= 0 and steps_done - 1 - best >= self.rule.patience:
            self.decision = (best + self.rule.result_delay, steps_done)
            return True
        return False

    def chosen_step(self) -> int:
        """The step whose result is kept so far: the lowest variance, plus the delay."""
        return int(self.best_step) + self.rule.result_delay

    def forget_from(self, step: int) -> None:
        """After a rollback to ``step``: empty the windows, disarm, and drop a best (and a
        decision) whose image is not captured yet or came from the steps thrown away."""
        state = (self.count, self.sum, self.sum_squares, self.recent_energy, self.older_energy,
                 self.buffer, self.energies)  # fmt: skip
        for tensor in state:
            tensor.zero_()
        self.armed.fill_(False)
        if self.decision is not None and self.decision[0] >= step:
            self.decision = None
        if self.decision is None and int(self.capture_step) >= step:
            self.best_variance.fill_(float("inf"))
            self.best_step.fill_(-1)
            self.capture_step.fill_(-1)


def _at(ring: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``ring[index]`` for a device-side index, with no host read."""
    return ring.index_select(0, index.view(1))[0]


def _put(ring: torch.Tensor, index: torch.Tensor, value: torch.Tensor) -> None:
    """``ring[index] = value`` for a device-side index, with no host read."""
    ring.index_copy_(0, index.view(1), value.unsqueeze(0).to(ring.dtype))
