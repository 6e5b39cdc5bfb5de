"""The "skip" hourglass generator of Deep Image Prior, fully configurable.

Level i of the encoder-decoder has a skip branch (``kernel_skip`` conv, ``skip[i]``
channels, absent when 0) and a deep branch (strided conv, or stride-1 conv then 2x2 average
pooling, conv, level i+1, x2 upsampling in level i's mode); their concatenation goes through
BN -> conv -> BN -> act (-> 1x1 conv -> BN -> act when ``need_1x1_up``). The output head is a
1x1 conv and a sigmoid. Level 0 is the finest. This is the reference code's ``skip()``
(models/skip.py of DmitryUlyanov/deep-image-prior) layer for layer; the reference network
tests check it preset by preset. BatchNorm stays in train mode: with a batch of one image it
normalises over that image's pixels, as in the paper.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

UPSAMPLE_MODES = ("nearest", "bilinear")
DOWNSAMPLE_MODES = ("stride", "avg")
PADDING_MODES = ("reflection", "zero")


@dataclass(frozen=True)
class SkipSpec:
    """Architecture of a skip network; every per-level field has one entry per level
    (index 0 = the finest level). ``upsample`` may be given as one mode for every level; it
    is stored as a tuple of one mode per level, so equal networks have equal specs."""

    in_channels: int
    out_channels: int
    channels_down: tuple[int, ...]
    channels_up: tuple[int, ...]
    channels_skip: tuple[int, ...]
    kernels_down: tuple[int, ...]
    kernels_up: tuple[int, ...]
    kernel_skip: int = 1
    upsample: tuple[str, ...] | str = "bilinear"
    downsample: str = "stride"
    padding: str = "reflection"
    need_1x1_up: bool = True
    need_sigmoid: bool = True

    def __post_init__(self) -> None:
        levels = len(self.channels_down)
        upsample = self.upsample
        if isinstance(upsample, str):
            upsample = (upsample,) * levels
        object.__setattr__(self, "upsample", tuple(upsample))  # frozen: normalise once
        per_level = (
            self.channels_up, self.channels_skip, self.kernels_down, self.kernels_up,
            self.upsample,
        )  # fmt: skip
        if levels < 1 or any(len(v) != levels for v in per_level):
            raise ValueError(f"every per-level setting needs {levels} entries: {self}")
        if any(mode not in UPSAMPLE_MODES for mode in self.upsample):
            raise ValueError(f"upsample must be one of {UPSAMPLE_MODES}, got {self.upsample!r}")
        if self.downsample not in DOWNSAMPLE_MODES:
            raise ValueError(f"downsample must be one of {DOWNSAMPLE_MODES}")
        if self.padding not in PADDING_MODES:
            raise ValueError(f"padding must be one of {PADDING_MODES}, got {self.padding!r}")

    @property
    def depth(self) -> int:
        return len(self.channels_down)

    def minimum_side(self) -> int:
        """Smallest padded side the network accepts: a multiple of 2**depth on which every
        reflection pad is smaller than its input and the deepest level keeps >= 2 pixels
        (BatchNorm in train mode needs more than one value per channel)."""
        multiple = 2**self.depth
        side = multiple
        while not self._side_fits(side):
            side += multiple
        return side

    def _side_fits(self, side: int) -> bool:
        for level in range(self.depth):
            here, below = side // 2**level, side // 2 ** (level + 1)
            if below < 2 or here <= self.kernels_down[level] // 2:
                return False
            if below <= self.kernels_down[level] // 2 or here <= self.kernels_up[level] // 2:
                return False
        return True


def _conv(spec: SkipSpec, cin: int, cout: int, kernel: int, stride: int = 1) -> nn.Sequential:
    layers: list[nn.Module] = []
    pad = (kernel - 1) // 2
    zero_pad = pad if spec.padding == "zero" else 0
    if spec.padding == "reflection" and pad > 0:
        layers.append(nn.ReflectionPad2d(pad))
    if stride > 1 and spec.downsample == "avg":
        layers.append(nn.Conv2d(cin, cout, kernel, 1, padding=zero_pad))
        layers.append(nn.AvgPool2d(stride, stride))
    else:
        layers.append(nn.Conv2d(cin, cout, kernel, stride, padding=zero_pad))
    return nn.Sequential(*layers)


def _norm(channels: int) -> nn.BatchNorm2d:
    # Always the statistics of the current image: DIP never switches to running averages,
    # and keeping none makes K networks stackable under torch.func.vmap (packing).
    return nn.BatchNorm2d(channels, track_running_stats=False)


def _bn_act(channels: int) -> list[nn.Module]:
    return [_norm(channels), nn.LeakyReLU(0.2, inplace=True)]


class SkipLevel(nn.Module):
    """One level of the hourglass; ``inner`` is the next level, or None at the bottom."""

    def __init__(self, spec: SkipSpec, level: int, cin: int, inner: SkipLevel | None) -> None:
        super().__init__()
        down, skip = spec.channels_down[level], spec.channels_skip[level]
        up, k_down, k_up = spec.channels_up[level], spec.kernels_down[level], spec.kernels_up[level]
        self.skip = (
            nn.Sequential(_conv(spec, cin, skip, spec.kernel_skip), *_bn_act(skip))
            if skip > 0
            else None
        )
        deeper: list[nn.Module] = [
            _conv(spec, cin, down, k_down, stride=2),
            *_bn_act(down),
            _conv(spec, down, down, k_down),
            *_bn_act(down),
        ]
        if inner is not None:
            deeper.append(inner)
        deeper.append(nn.Upsample(scale_factor=2, mode=spec.upsample[level]))
        self.deeper = nn.Sequential(*deeper)
        merged = skip + (spec.channels_up[level + 1] if inner is not None else down)
        merge: list[nn.Module] = [_norm(merged), _conv(spec, merged, up, k_up)]
        merge += _bn_act(up)
        if spec.need_1x1_up:
            merge += [_conv(spec, up, up, 1), *_bn_act(up)]
        self.merge = nn.Sequential(*merge)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.skip is None:
            return self.merge(self.deeper(x))
        # Skip branch first, as the reference's Concat runs its branches.
        return self.merge(torch.cat([self.skip(x), self.deeper(x)], dim=1))


class SkipNetwork(nn.Module):
    """The full generator: nested levels, then a 1x1 conv head (and a sigmoid)."""

    def __init__(self, spec: SkipSpec) -> None:
        super().__init__()
        self.spec = spec
        inner: SkipLevel | None = None
        for level in reversed(range(spec.depth)):
            cin = spec.in_channels if level == 0 else spec.channels_down[level - 1]
            inner = SkipLevel(spec, level, cin, inner)
        assert inner is not None  # SkipSpec guarantees depth >= 1
        self.body = inner
        head: list[nn.Module] = [_conv(spec, spec.channels_up[0], spec.out_channels, 1)]
        if spec.need_sigmoid:
            head.append(nn.Sigmoid())
        self.head = nn.Sequential(*head)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if z.shape[-1] % 2**self.spec.depth or z.shape[-2] % 2**self.spec.depth:
            raise ValueError(
                f"network input {tuple(z.shape[-2:])} is not a multiple of {2**self.spec.depth}"
            )
        return self.head(self.body(z))


def build_network(spec: SkipSpec) -> SkipNetwork:
    return SkipNetwork(spec)
