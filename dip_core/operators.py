"""Forward operators A(x): what the degradation does to a clean image.

Each is a small module whose parameters are buffers, so ``.to(device)`` moves them.
All take and return (N, C, H, W) tensors.
"""

from __future__ import annotations

import math

import torch
from torch import nn

DOWNSAMPLERS = ("lanczos2", "lanczos3", "box")


class Identity(nn.Module):
    """A(x) = x: the operator of tasks that observe the image itself (denoising).

    >>> import torch
    >>> x = torch.rand(1, 3, 4, 4)
    >>> Identity()(x) is x
    True
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def resampling_kernel(factor: int, kind: str) -> torch.Tensor:
    """1-D downsampling taps, normalised to sum 1, centred between pixels.

    Each low-resolution pixel is the weighted mean of the ``factor`` high-resolution pixels
    it covers and their neighbours, centred on the middle of that block: the convention of
    Pillow, OpenCV and MATLAB resize. ``lanczos2`` is the reference code's SR kernel
    (support 2: 4 * factor taps at half-pixel offsets, its ``phase=0.5``); ``lanczos3``
    widens it to support 3 (Pillow's LANCZOS); ``box`` averages each block.

    >>> taps = resampling_kernel(2, "lanczos2")
    >>> len(taps), round(taps.sum().item(), 12), bool((taps == taps.flip(0)).all())
    (8, 1.0, True)
    """
    if kind == "box":
        return torch.full((factor,), 1.0 / factor, dtype=torch.float64)
    if kind not in DOWNSAMPLERS:
        raise ValueError(f"unknown downsampler {kind!r}; choose from {DOWNSAMPLERS}")
    support = 2 if kind == "lanczos2" else 3
    # Tap t sits (t + 0.5) / factor low-resolution pixels from the block's centre.
    d = (torch.arange(-support * factor, support * factor, dtype=torch.float64) + 0.5) / factor
    taps = support * torch.sin(math.pi * d) * torch.sin(math.pi * d / support) / (math.pi * d) ** 2
    return taps / taps.sum()


def downsampling_matrix(size: int, factor: int, kind: str) -> torch.Tensor:
    """(size // factor, size) matrix of a strided 1-D convolution with replicate padding.

    Written as a matrix because ``D_h @ img @ D_w.T`` costs a fraction of a grouped
    convolution with a 4*factor-wide kernel (forward and backward).

    Each row is one output pixel's weights, so every row sums to 1 (the padding repeats the
    edge pixel rather than dropping its weight); ``box`` at factor 2 averages pairs:

    >>> matrix = downsampling_matrix(8, 2, "lanczos3")
    >>> tuple(matrix.shape), [round(total, 12) for total in matrix.sum(1).tolist()]
    ((4, 8), [1.0, 1.0, 1.0, 1.0])
    >>> downsampling_matrix(4, 2, "box")
    tensor([[0.5000, 0.5000, 0.0000, 0.0000],
            [0.0000, 0.0000, 0.5000, 0.5000]], dtype=torch.float64)
    """
    taps = resampling_kernel(factor, kind)
    # Centres the kernel on the block of output pixel r: input pixels r*f .. r*f + f - 1.
    pad = (len(taps) - factor) // 2
    matrix = torch.zeros(size // factor, size, dtype=torch.float64)
    for row in range(size // factor):
        for t, weight in enumerate(taps.tolist()):
            column = min(max(row * factor + t - pad, 0), size - 1)
            matrix[row, column] += weight
    return matrix


class Downsampler(nn.Module):
    """Separable downsampling by an integer factor (super-resolution's degradation).

    A 16 x 8 image becomes 8 x 4 at factor 2; the taps sum to 1, so a flat image stays flat,
    and ``box`` is the mean of each 2 x 2 block:

    >>> import torch
    >>> down = Downsampler(16, 8, factor=2)
    >>> out = down(torch.full((1, 3, 16, 8), 0.25))
    >>> tuple(out.shape), round(out.min().item(), 6), round(out.max().item(), 6)
    ((1, 3, 8, 4), 0.25, 0.25)
    >>> image = torch.arange(16.0).reshape(1, 1, 4, 4)
    >>> Downsampler(4, 4, factor=2, kind="box")(image)
    tensor([[[[ 2.5000,  4.5000],
              [10.5000, 12.5000]]]])
    """

    rows: torch.Tensor
    cols: torch.Tensor

    def __init__(self, height: int, width: int, factor: int, kind: str = "lanczos2") -> None:
        super().__init__()
        if height % factor or width % factor:
            raise ValueError(f"size {height}x{width} is not a multiple of factor {factor}")
        self.factor, self.kind = factor, kind
        self.register_buffer("rows", downsampling_matrix(height, factor, kind).float())
        self.register_buffer("cols", downsampling_matrix(width, factor, kind).float().T)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rows @ x @ self.cols


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class FeatureMap(nn.Module):
    """Phi(x): a frozen feature network applied to an ImageNet-normalised RGB image.

    With no network (``nn.Identity``) it shows the normalisation alone: the ImageNet mean
    colour maps to 0, and a grey image is repeated over the three channels first:

    >>> import torch
    >>> phi = FeatureMap(nn.Identity())
    >>> mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1).expand(1, 3, 2, 2)
    >>> phi(mean).abs().max().item()
    0.0
    >>> tuple(phi(torch.zeros(1, 1, 2, 2)).shape)
    (1, 3, 2, 2)
    >>> phi.train().features.training  # a BatchNorm inside must keep its running statistics
    False
    """

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, features: nn.Module) -> None:
        super().__init__()
        self.features = features.eval()
        for parameter in features.parameters():  # (TorchScript modules lack requires_grad_)
            parameter.requires_grad_(False)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))

    def train(self, mode: bool = True) -> FeatureMap:
        # The feature network's BatchNorm must stay in eval mode whatever the caller does.
        super().train(mode)
        self.features.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return self.features((x - self.mean) / self.std)
