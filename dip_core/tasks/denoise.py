"""Denoising: the network's output is compared with the noisy image itself."""

from __future__ import annotations

import torch

from ..presets import DENOISE_NET, Preset
from .base import Task, noise_floor


class Denoise(Task):
    name = "denoise"
    baseline = "nl_means"
    presets = {
        # Denoising overfits the noise after its best step: auto-stop is on by default (the
        # iteration count becomes a cap). Other tasks gained nothing from it in the benchmark.
        "denoise": Preset("noise", 32, **DENOISE_NET, iterations=3000, lr=0.01,
                          reg_noise_std=1 / 30, exp_weight=0.99, stop="auto"),
    }  # fmt: skip

    def energy_floor(self, observation: torch.Tensor) -> float | None:
        return noise_floor(observation)
