"""The fitting loop's configuration, progress reports and results."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .stopping import StopRule


@dataclass(frozen=True)
class FitConfig:
    iterations: int
    lr: float
    reg_noise_std: float
    exp_weight: float  # 0: the result is the last output, not an average
    seed: int = 0
    sync_every: int = 50  # steps between host reads of the trace (progress, divergence)
    divergence_ratio: float = 10**0.5  # a window's median 5 dB above the last one's: diverged
    divergence_warmup: int = 50  # early steps bounce; they are not checked
    max_rollbacks: int = 10
    rollback_lr_factor: float = 0.5  # each rollback scales the fit's learning rate by this
    stop: StopRule | None = None  # a no-reference stopping rule; None runs every iteration
    stop_enforced: bool = True  # False records the rule's statistic but never stops

    @classmethod
    def from_preset(
        cls, preset, iterations: int | None = None, seed: int = 0, *, adapt_lr: bool = True, **kw
    ) -> FitConfig:
        """The preset's schedule over ``iterations`` steps. A preset capped below its own
        step count takes ``capped_learning_rate`` unless ``adapt_lr`` is False (the caller
        passes False when the user set the learning rate)."""
        steps = preset.iterations if iterations is None else iterations
        rule = None
        if preset.stop == "auto":
            rule = StopRule.for_averaging(
                preset.stop_window, preset.stop_patience, preset.exp_weight
            )
        lr = capped_learning_rate(preset.lr, preset.iterations, steps) if adapt_lr else preset.lr
        return cls(steps, lr, preset.reg_noise_std, preset.exp_weight, seed, stop=rule, **kw)


# The presets' usual learning rate: a capped schedule is raised at most to it.
CAPPED_LR_CEILING = 0.01


def capped_learning_rate(lr: float, preset_steps: int, steps: int) -> float:
    """The learning rate of a preset run for fewer steps than its own: scaled by
    sqrt(preset_steps / steps), never above 0.01 and never below the preset's.

    Only the slow presets move: 50%-pixels inpainting (0.001 over 11,000 steps becomes
    0.0027 at 1,500) and the pre-image. Measured at 1,500 steps on four 96 px photos with
    half their pixels missing (README "Quality"): 0.003 beat 0.001 by 0.14 dB on average,
    0.01 lost 0.11 dB; the pre-image was not measured separately.
    """
    if steps <= 0 or steps >= preset_steps or lr >= CAPPED_LR_CEILING:
        return lr
    return min(CAPPED_LR_CEILING, lr * math.sqrt(preset_steps / steps))


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
    stop_stats: torch.Tensor | None  # 1-D float64: the stopping rule's statistic per step
    energy: float  # energy of the returned image
    psnr: float | None
    iterations: int  # steps run
    seconds: float
    seed: int
    device: str
    stopped_at: int  # the step count whose result is returned
    stop_reason: str  # "iterations" | "callback" | "auto"
    rollbacks: int = 0
    # Where the stopping rule chose to stop, enforced or not: (step count of the image it
    # returns, steps run when it fired); None when it did not fire or there was no rule.
    stop_decision: tuple[int, int] | None = None
    tiles: int = 1  # fits of the image's parts blended into this result (tiling.py); 1: whole
