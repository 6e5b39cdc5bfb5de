"""Flash / no-flash: the network maps the flash image to the no-flash one."""

from __future__ import annotations

import torch

from ..presets import DENOISE_NET, Preset
from .base import Inputs, Task


class FlashNoFlash(Task):
    name = "flash_no_flash"
    required_roles = ("guide",)
    baseline = ""  # no clean reference to score against
    presets = {
        # Nearest upsampling at the two finest levels, bilinear below (flash-no-flash.ipynb).
        "flash_no_flash": Preset("image", 3, **{**DENOISE_NET, "upsample": (
                                     "nearest", "nearest", "bilinear", "bilinear", "bilinear")},
                                 iterations=601, lr=0.1, reg_noise_std=0.0, exp_weight=0.0),
    }  # fmt: skip

    def network_image(self, inputs: Inputs) -> torch.Tensor | None:
        return inputs["guide"]
