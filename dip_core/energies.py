"""Data energies E(A(x), y). Masked energies average over known pixels only."""

from __future__ import annotations

import torch
from torch import nn


class MeanSquaredError(nn.Module):
    def forward(self, predicted: torch.Tensor, observed: torch.Tensor) -> torch.Tensor:
        return torch.mean((predicted - observed) ** 2)


class MaskedMeanSquaredError(nn.Module):
    """sum(m * (x - y)^2) / (sum(m) * C): the mean over known pixels, not over all of them
    (the reference code divides by every pixel, which weakens sparse masks)."""

    mask: torch.Tensor  # buffers, registered in __init__
    known: torch.Tensor

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        mask = mask.reshape(1, 1, *mask.shape[-2:]).float()
        self.register_buffer("mask", mask)
        self.register_buffer("known", mask.sum().clamp_min(1.0))

    def forward(self, predicted: torch.Tensor, observed: torch.Tensor) -> torch.Tensor:
        squared = (predicted - observed) ** 2 * self.mask
        return squared.sum() / (self.known * predicted.shape[1])
