"""A no-reference stopping rule: the windowed moving variance of recent outputs (ES-WMV).

Wang et al., "Early Stopping for Deep Image Prior" (arXiv 2112.06074): while the network
fits the image, successive outputs change less and less; once it starts fitting the noise
they change more again. The variance of the last ``window`` outputs therefore has a minimum
near the best step. The rule keeps the result image at the lowest variance seen and stops
when no lower variance has come for ``patience`` steps. Everything stays on the device;
the caller asks ``should_stop`` only at its sync points.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MAX_TRACKED_VALUES = 1 << 20  # larger outputs are subsampled to bound the window's memory


@dataclass(frozen=True)
class StopRule:
    window: int = 50
    patience: int = 300
    # Steps after the lowest variance at which the result is taken. An exponential average
    # of the outputs lags the raw outputs by about 1 / (1 - weight) steps, so averaging
    # tasks take their result that much later (always before the rule fires).
    result_delay: int = 0

    @classmethod
    def for_averaging(cls, window: int, patience: int, exp_weight: float) -> StopRule:
        delay = round(1 / (1 - exp_weight)) if exp_weight > 0 else 0
        return cls(window, patience, min(delay, max(patience - 1, 0)))


class VarianceStopper:
    def __init__(self, rule: StopRule, example: torch.Tensor) -> None:
        self.rule = rule
        self.stride = 1
        while example[..., :: self.stride, :: self.stride].numel() > MAX_TRACKED_VALUES:
            self.stride += 1
        sample = self._sample(example)
        device = example.device
        self.buffer = torch.zeros((rule.window, *sample.shape), device=device)
        self.sum = torch.zeros(sample.shape, dtype=torch.float64, device=device)
        self.sum_squares = torch.zeros((), dtype=torch.float64, device=device)
        self.count = 0
        self.best_variance = torch.tensor(float("inf"), dtype=torch.float64, device=device)
        self.best_step = torch.tensor(-1, device=device)
        self.capture_step = torch.tensor(-1, device=device)
        self.best_image = torch.zeros_like(example)

    def _sample(self, x: torch.Tensor) -> torch.Tensor:
        return x[..., :: self.stride, :: self.stride]

    def update(self, step: int, output: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """Add step's raw output; keep ``result`` if the variance is the lowest so far.
        Returns the window's variance per value (NaN until the window is full)."""
        sample = self._sample(output).float()
        slot = self.count % self.rule.window
        if self.count >= self.rule.window:
            old = self.buffer[slot].double()
            self.sum -= old
            self.sum_squares -= (old * old).sum()
        self.buffer[slot] = sample
        self.sum += sample.double()
        self.sum_squares += (sample.double() ** 2).sum()
        self.count += 1
        if self.count < self.rule.window:
            return torch.tensor(float("nan"), dtype=torch.float64, device=output.device)
        n = self.rule.window
        variance = (self.sum_squares / n - ((self.sum / n) ** 2).sum()) / sample.numel()
        better = variance < self.best_variance
        self.best_variance = torch.where(better, variance, self.best_variance)
        now = torch.tensor(step, device=output.device)
        self.best_step = torch.where(better, now, self.best_step)
        self.capture_step = torch.where(better, now + self.rule.result_delay, self.capture_step)
        self.best_image = torch.where(self.capture_step == now, result, self.best_image)
        return variance

    def should_stop(self, steps_done: int) -> bool:
        """True when ``patience`` steps have passed since the lowest variance (one host read)."""
        best = int(self.best_step)
        return best >= 0 and steps_done - 1 - best >= self.rule.patience

    def chosen_step(self) -> int:
        """The step whose result is kept: the lowest variance, plus the result delay."""
        return int(self.best_step) + self.rule.result_delay

    def forget_from(self, step: int) -> None:
        """After a rollback to ``step``: empty the window, and drop a best found after it."""
        self.count = 0
        self.sum.zero_()
        self.sum_squares.zero_()
        if int(self.best_step) >= step:
            self.best_variance.fill_(float("inf"))
            self.best_step.fill_(-1)


def offline_stop(stats: torch.Tensor, patience: int) -> tuple[int, int] | None:
    """Where the rule would act on a recorded statistic trace: (chosen step, step at which
    it fires), or None if it never fires. The reference for tests and benchmarks."""
    best_value, best_step = float("inf"), -1
    for step, value in enumerate(stats.tolist()):
        if value == value and value < best_value:  # NaN (window not full) never wins
            best_value, best_step = value, step
        if best_step >= 0 and step - best_step >= patience:
            return best_step, step
    return None
