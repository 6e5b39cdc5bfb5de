"""Image quality metrics on [0, 1] images shaped (C, H, W) or (N, C, H, W)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _check_pair(x: torch.Tensor, y: torch.Tensor) -> None:
    if x.shape != y.shape:
        raise ValueError(f"images differ in shape: {tuple(x.shape)} vs {tuple(y.shape)}")


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """PSNR in dB over all channels, as a 0-d tensor (no host sync).

    An error of 0.25 on every pixel is an MSE of 1/16: 10 log10(16) = 12.0412 dB.

    >>> import torch
    >>> round(psnr(torch.full((3, 4, 4), 0.75), torch.full((3, 4, 4), 0.5)).item(), 4)
    12.0412
    """
    _check_pair(x, y)
    mse = torch.mean((x.double() - y.double()) ** 2)
    return 10 * torch.log10(data_range**2 / mse.clamp_min(1e-20))


def rgb_to_y(x: torch.Tensor) -> torch.Tensor:
    """ITU-R BT.601 luma in [0, 1] (16-235 scaled), as the super-resolution tables use.

    Black is 16 / 255 and white 235 / 255 (the standard's studio range):

    >>> import torch
    >>> [round(rgb_to_y(torch.full((3, 1, 1), v)).item() * 255, 3) for v in (0.0, 1.0)]
    [16.0, 235.0]
    """
    if x.shape[-3] == 1:
        return x
    r, g, b = x[..., 0:1, :, :], x[..., 1:2, :, :], x[..., 2:3, :, :]
    return (16 + 65.481 * r + 128.553 * g + 24.966 * b) / 255


def psnr_y(x: torch.Tensor, y: torch.Tensor, border: int = 0) -> torch.Tensor:
    """PSNR of the Y channel with ``border`` pixels cropped on each side (SR convention).

    A grey error of 0.1 is (65.481 + 128.553 + 24.966) / 255 x 0.1 = 0.0859 in Y, so
    20 log10(1 / 0.0859) = 21.32 dB; a cropped border ignores the wrong frame around it:

    >>> import torch
    >>> x, y = torch.full((3, 8, 8), 0.5), torch.full((3, 8, 8), 0.4)
    >>> round(psnr_y(x, y).item(), 2)
    21.32
    >>> y = x.clone()
    >>> y[:, 0, :] = 0.4  # only the top row is wrong
    >>> round(psnr_y(x, y).item(), 2), psnr_y(x, y, border=1).item() > 100
    (30.35, True)
    """
    _check_pair(x, y)
    x, y = rgb_to_y(x), rgb_to_y(y)
    if border > 0:
        x = x[..., border:-border, border:-border]
        y = y[..., border:-border, border:-border]
    return psnr(x, y)


def _gaussian_window(size: int, sigma: float, channels: int, device) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64, device=device) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).expand(channels, 1, size, size).contiguous()


def ssim(x: torch.Tensor, y: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Mean SSIM (Wang et al. 2004; Gaussian window, K1 = 0.01, K2 = 0.03), channels averaged.

    The window shrinks (keeping it odd) for images smaller than it. An image against itself
    scores 1; against its negative, whose structure is reversed, below 0:

    >>> import torch
    >>> x = torch.linspace(0, 1, 256).reshape(1, 16, 16)
    >>> ssim(x, x).item(), ssim(x, 1 - x).item() < 0
    (1.0, True)
    """
    _check_pair(x, y)
    x4 = (x if x.dim() == 4 else x.unsqueeze(0)).double()
    y4 = (y if y.dim() == 4 else y.unsqueeze(0)).double()
    size = min(window, x4.shape[-1], x4.shape[-2])
    size -= 1 - size % 2
    kernel = _gaussian_window(size, sigma, x4.shape[1], x4.device)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, kernel, groups=x4.shape[1])

    c1, c2 = 0.01**2, 0.03**2
    mu_x, mu_y = blur(x4), blur(y4)
    var_x = blur(x4 * x4) - mu_x**2
    var_y = blur(y4 * y4) - mu_y**2
    cov = blur(x4 * y4) - mu_x * mu_y
    score = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / (
        (mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2)
    )
    return score.mean()
