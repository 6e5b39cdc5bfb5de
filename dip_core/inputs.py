"""The network input z: noise, a meshgrid, or a given image, and its per-step jitter."""

from __future__ import annotations

import torch


def noise_input(
    channels: int, height: int, width: int, generator: torch.Generator, scale: float = 0.1
) -> torch.Tensor:
    """Uniform noise in [0, scale), shape (1, channels, height, width), as the paper uses."""
    device = generator.device
    return torch.rand((1, channels, height, width), generator=generator, device=device) * scale


def meshgrid_input(height: int, width: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Two channels holding the x and y coordinates in [0, 1]: shape (1, 2, height, width)."""
    ys = torch.linspace(0, 1, height, device=device)
    xs = torch.linspace(0, 1, width, device=device)
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([grid_x, grid_y]).unsqueeze(0)


def jittered(z: torch.Tensor, std: float, generator: torch.Generator) -> torch.Tensor:
    """``z + N(0, std)``, freshly drawn each step; ``z`` itself when std is 0."""
    if std <= 0:
        return z
    noise = torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)
    return z + noise * std
