"""JPEG artifact removal: the compressed image is fitted directly, by a smaller network."""

from __future__ import annotations

from ..presets import Preset, levels
from .base import Task


class Jpeg(Task):
    name = "jpeg"
    baseline = "jpeg_input"
    presets = {
        "jpeg": Preset("noise", 3, channels_down=(8, 16, 32, 64, 128),
                       channels_up=(8, 16, 32, 64, 128), channels_skip=(0, 0, 0, 4, 4),
                       kernels_down=levels(3), kernels_up=levels(3), upsample=levels("bilinear"),
                       iterations=2400, lr=0.01, reg_noise_std=1 / 30, exp_weight=0.99),
    }  # fmt: skip
