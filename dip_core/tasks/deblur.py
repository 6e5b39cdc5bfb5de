"""Non-blind deblurring: the network's output, blurred by the known kernel, is compared with
the blurred (and noisy) image.

The kernel comes from ``params``: ``blur_sigma`` (a Gaussian, in pixels) or
``motion_length`` (pixels) with ``motion_angle`` (degrees, counter-clockwise from the x axis,
default 0). Blurring replicates the border pixels: scipy.ndimage's ``mode="nearest"``.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..energies import MeanSquaredError
from ..errors import DipInputError
from ..params import number
from .base import Measurement, Observed, Task
from .denoise import Denoise

MAX_BLUR_PIXELS = 64.0  # a kernel wider than this is a different problem than deblurring
MAX_BLUR_SIGMA = 20.0


class Deblur(Task):
    name = "deblur"
    param_keys = ("blur_sigma", "motion_length", "motion_angle")
    baseline = "richardson_lucy_or_wiener"
    presets = {
        # Not in the paper: the denoising network and schedule. Run to the end: the blur keeps
        # the residual near the noise level, so the denoising stop rule never arms
        # (README "Quality": the best step was within the last 5 of every fit measured).
        "deblur": replace(Denoise.presets["denoise"], stop="fixed"),
    }

    def task_params(self, params: dict) -> dict[str, Any]:
        blur_kernel(params)  # refuses a missing or bad kernel before any fit
        return {}

    def tile_halo(self, params: dict) -> int:
        """The kernel's radius: a tile's pixels that close to its edge are blurred with
        replicated border pixels instead of the neighbours the tile does not hold."""
        return max(blur_kernel(params).shape) // 2

    def measurement(self, job: Observed) -> Measurement:
        return Blur(blur_kernel(job.params)), MeanSquaredError(), job.image


def blur_kernel(params: dict) -> torch.Tensor:
    """The (k, k) kernel ``params`` describe, normalised to sum 1 (float64)."""
    gaussian, motion = "blur_sigma" in params, "motion_length" in params
    if gaussian == motion:
        raise DipInputError("deblur needs params.blur_sigma (a Gaussian) or params."
                            "motion_length (a straight motion), exactly one of them")  # fmt: skip
    if gaussian:
        if "motion_angle" in params:
            raise DipInputError("params.motion_angle goes with motion_length, not blur_sigma")
        return gaussian_kernel(number(params, "blur_sigma", 0.0, MAX_BLUR_SIGMA, low_open=True))
    length = number(params, "motion_length", 1.0, MAX_BLUR_PIXELS)
    angle = number(params, "motion_angle", -360.0, 360.0) if "motion_angle" in params else 0.0
    return motion_kernel(length, angle)


def gaussian_kernel(sigma: float) -> torch.Tensor:
    """exp(-r^2 / 2 sigma^2) sampled at integer offsets up to 3 sigma (at least 1)."""
    radius = max(1, math.ceil(3 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    line = torch.exp(-(x**2) / (2 * sigma**2))
    kernel = line[:, None] * line[None, :]
    return kernel / kernel.sum()


def motion_kernel(length: float, angle_degrees: float) -> torch.Tensor:
    """A straight streak of ``length`` pixels through the centre: each pixel weighs the
    length of the segment inside its unit square (measured with points every 1/64 pixel),
    so an odd length along an axis is the textbook box of that many pixels."""
    radius = math.ceil(length / 2) + 1
    theta = math.radians(angle_degrees)
    count = max(2, math.ceil(length * 64))
    t = (torch.arange(count, dtype=torch.float64) + 0.5) / count - 0.5
    columns = torch.round(radius + t * length * math.cos(theta)).long()
    rows = torch.round(radius - t * length * math.sin(theta)).long()  # rows grow downwards
    kernel = torch.zeros(2 * radius + 1, 2 * radius + 1, dtype=torch.float64)
    kernel.index_put_((rows, columns), torch.ones(count, dtype=torch.float64), accumulate=True)
    return kernel / kernel.sum()


class Blur(nn.Module):
    """A(x) = k * x, per channel, the same size as x, borders replicated (convolution, not
    correlation: the kernel is flipped, as scipy.ndimage.convolve does)."""

    kernel: torch.Tensor

    def __init__(self, kernel: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("kernel", kernel.flip(0, 1).float()[None, None])
        self.pad = (kernel.shape[1] // 2, kernel.shape[1] // 2,
                    kernel.shape[0] // 2, kernel.shape[0] // 2)  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        padded = F.pad(x.reshape(n * c, 1, h, w), self.pad, mode="replicate")
        return F.conv2d(padded, self.kernel).reshape(n, c, h, w)
