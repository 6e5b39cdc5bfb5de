"""Inpainting: only known pixels count; the mask's shape picks one of four presets."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..energies import MaskedMeanSquaredError
from ..operators import Identity
from ..params import choice
from ..presets import DENOISE_NET, NEAREST_128, Preset, levels
from .base import Inputs, Measurement, Observed, Task

VARIANTS = ("text", "region", "large_hole", "pixels")


class Inpaint(Task):
    name = "inpaint"
    required_roles = ("mask",)
    param_keys = ("variant",)
    baseline = "biharmonic"
    presets = {
        "inpaint_text": Preset("noise", 32, **{**NEAREST_128, "channels_skip": levels(128)},
                               iterations=6001, lr=0.01, reg_noise_std=0.03, exp_weight=0.0),
        "inpaint_region": Preset("meshgrid", 2, **{**NEAREST_128, "channels_skip": levels(0)},
                                 iterations=5001, lr=0.01, reg_noise_std=0.03, exp_weight=0.0),
        "inpaint_large_hole": Preset("noise", 1, channels_down=(16, 32, 64, 128, 128, 128),
                                     channels_up=(16, 32, 64, 128, 128, 128),
                                     channels_skip=levels(0, 6), kernels_down=levels(5, 6),
                                     kernels_up=levels(3, 6), upsample=levels("nearest", 6),
                                     need_1x1_up=False, iterations=3001, lr=0.01,
                                     reg_noise_std=0.0, exp_weight=0.0),
        "inpaint_pixels": Preset("noise", 32, **DENOISE_NET, iterations=11000, lr=0.001,
                                 reg_noise_std=0.03, exp_weight=0.0),
    }  # fmt: skip

    def preset_name(self, params: dict, scale: int | None, inputs: Inputs) -> str:
        if "variant" in params:
            variant = choice(params, "variant", VARIANTS)
        else:
            mask = inputs.get("mask")
            variant = classify_mask(mask) if mask is not None else "text"
        return f"inpaint_{variant}"

    def measurement(self, job: Observed) -> Measurement:
        return Identity(), MaskedMeanSquaredError(job.inputs["mask"]), job.image


def classify_mask(mask: torch.Tensor) -> str:
    """Pick the inpainting preset from the mask's shape: scattered missing pixels,
    a large hole, thin strokes (text) or a compact region."""
    known = mask.reshape(1, 1, *mask.shape[-2:]) > 0.5
    hole = ~known
    hole_fraction = hole.float().mean().item()
    if hole_fraction == 0:
        return "region"
    # A hole pixel "touches" the known image when one of its 4 neighbours is known.
    padded = F.pad(known.float(), (1, 1, 1, 1), mode="replicate")
    neighbours = F.conv2d(padded, torch.tensor([[[[0.0, 1, 0], [1, 0, 1], [0, 1, 0]]]]))
    touching = ((neighbours > 0) & hole).float().sum().item() / hole.float().sum().item()
    if hole_fraction >= 0.2 and touching >= 0.85:
        return "pixels"
    if hole_fraction >= 0.1:
        return "large_hole"
    return "text" if touching >= 0.4 else "region"
