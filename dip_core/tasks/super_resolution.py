"""Super-resolution: the network's output, downsampled, is compared with the small image."""

from __future__ import annotations

from typing import Any

from ..energies import MeanSquaredError
from ..operators import DOWNSAMPLERS, Downsampler
from ..params import choice
from ..presets import DENOISE_NET, Preset
from .base import Measurement, Observed, Task


class SuperResolution(Task):
    name = "super_resolution"
    scales = (2, 4, 8)
    param_keys = ("downsampler",)
    baseline = "bicubic"
    luma_metric = True
    presets = {
        # x2 is not in the paper; it takes x4's settings.
        "super_resolution_x2": Preset("noise", 32, **DENOISE_NET, iterations=2000, lr=0.01,
                                      reg_noise_std=0.03, exp_weight=0.0),
        "super_resolution_x4": Preset("noise", 32, **DENOISE_NET, iterations=2000, lr=0.01,
                                      reg_noise_std=0.03, exp_weight=0.0),
        "super_resolution_x8": Preset("noise", 32, **DENOISE_NET, iterations=4000, lr=0.01,
                                      reg_noise_std=0.05, exp_weight=0.0),
    }  # fmt: skip

    def output_scale(self, scale: int | None) -> int:
        return scale or 1

    def preset_name(self, params, scale, inputs) -> str:
        return f"super_resolution_x{scale}"

    def task_params(self, params: dict) -> dict[str, Any]:
        if "downsampler" in params:
            return {"downsampler": choice(params, "downsampler", DOWNSAMPLERS)}
        return {}

    def tile_halo(self, params: dict) -> int:
        """The downsampler's reach in low-resolution pixels (its support): nearer a tile's
        edge, a pixel's kernel would need high-resolution pixels the tile does not have."""
        kind = params.get("downsampler", Preset.downsampler)
        return {"box": 0, "lanczos2": 2, "lanczos3": 3}[kind]

    def measurement(self, job: Observed) -> Measurement:
        factor = job.output_hw[0] // job.image.shape[-2]
        down = Downsampler(*job.output_hw, factor=factor, kind=job.preset.downsampler)
        return down, MeanSquaredError(), job.image
