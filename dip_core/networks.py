"""The "skip" hourglass generator of Deep Image Prior, fully configurable.

Level i of the encoder-decoder has a skip branch (``kernel_skip`` conv, ``skip[i]``
channels, absent when 0) and a deep branch (strided conv, or stride-1 conv then 2x2 average
pooling, conv, level i+1, x2 upsampling in level i's mode); their concatenation goes through
BN -> conv -> BN -> act (-> 1x1 conv -> BN -> act when ``need_1x1_up``). The output head is a
1x1 conv and a sigmoid. Level 0 is the finest. This is the reference code's ``skip()``
(models/skip.py of DmitryUlyanov/deep-image-prior) layer for layer; the reference network
tests check it preset by preset. BatchNorm stays in train mode: with a batch of one image it
normalises over that image's pixels, as in the paper.

``slots=K`` builds K such networks as one (the packed engine, engine.py): every conv is a
grouped conv (``groups=K``) on ``(1, K*C, H, W)``, one ``BatchNorm2d(K*C)`` normalises each
slot's channels by their own statistics (at batch 1, per channel is per slot), and the skip
concatenation keeps the channels slot-major. ``skip_cancelled_bias`` leaves out the bias
of every conv that feeds a BatchNorm: BN subtracts the channel mean, so that bias changes
nothing but costs a pass over the activation (the parameter stays, so a seed builds the same
weights).
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


@dataclass(frozen=True)
class Layout:
    """How one module holds its networks: ``slots`` of them side by side in the channels,
    and whether the convs that feed a BatchNorm skip their (cancelled) bias."""

    slots: int = 1
    skip_cancelled_bias: bool = False


class Conv(nn.Conv2d):
    """A (grouped) conv whose bias may be left out when a BatchNorm follows."""

    def __init__(self, cin, cout, kernel, stride, padding, layout: Layout, feeds_norm: bool):
        k = layout.slots
        super().__init__(k * cin, k * cout, kernel, stride, padding=padding, groups=k)
        self.apply_bias = not (feeds_norm and layout.skip_cancelled_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.weight, self.bias if self.apply_bias else None)


def _conv(spec: SkipSpec, layout: Layout, cin: int, cout: int, kernel: int, stride: int = 1,
          feeds_norm: bool = True) -> nn.Sequential:  # fmt: skip
    layers: list[nn.Module] = []
    pad = (kernel - 1) // 2
    zero_pad = pad if spec.padding == "zero" else 0
    if spec.padding == "reflection" and pad > 0:
        layers.append(nn.ReflectionPad2d(pad))
    if stride > 1 and spec.downsample == "avg":  # pooling a constant bias keeps it constant
        layers.append(Conv(cin, cout, kernel, 1, zero_pad, layout, feeds_norm))
        layers.append(nn.AvgPool2d(stride, stride))
    else:
        layers.append(Conv(cin, cout, kernel, stride, zero_pad, layout, feeds_norm))
    return nn.Sequential(*layers)


def _norm(layout: Layout, channels: int) -> nn.BatchNorm2d:
    # Always the statistics of the current image: DIP never switches to running averages.
    return nn.BatchNorm2d(layout.slots * channels, track_running_stats=False)


def _bn_act(layout: Layout, channels: int) -> list[nn.Module]:
    return [_norm(layout, channels), nn.LeakyReLU(0.2, inplace=True)]


def slot_major_cat(parts: list[torch.Tensor], slots: int) -> torch.Tensor:
    """Concatenate ``(1, K*C_i, H, W)`` tensors channel-wise per slot: slot k's channels of
    every part, then slot k+1's. Keeps a channels_last input channels_last."""
    if slots == 1:
        return torch.cat(parts, dim=1)
    h, w = parts[0].shape[-2:]
    if parts[0].is_contiguous(memory_format=torch.channels_last):
        # NHWC memory is (H, W, K, C): concatenate along C there, with no layout change.
        nhwc = [p.permute(0, 2, 3, 1).unflatten(3, (slots, -1)) for p in parts]
        return torch.cat(nhwc, dim=4).flatten(3).permute(0, 3, 1, 2)
    return torch.cat([p.unflatten(1, (slots, -1)) for p in parts], dim=2).view(1, -1, h, w)


class SkipLevel(nn.Module):
    """One level of the hourglass; ``inner`` is the next level, or None at the bottom."""

    def __init__(
        self, spec: SkipSpec, level: int, cin: int, inner: SkipLevel | None, layout: Layout
    ) -> None:
        super().__init__()
        self.slots = layout.slots
        down, skip = spec.channels_down[level], spec.channels_skip[level]
        up, k_down, k_up = spec.channels_up[level], spec.kernels_down[level], spec.kernels_up[level]
        self.skip = (
            nn.Sequential(_conv(spec, layout, cin, skip, spec.kernel_skip), *_bn_act(layout, skip))
            if skip > 0
            else None
        )
        deeper: list[nn.Module] = [
            _conv(spec, layout, cin, down, k_down, stride=2),
            *_bn_act(layout, down),
            _conv(spec, layout, down, down, k_down),
            *_bn_act(layout, down),
        ]
        if inner is not None:
            deeper.append(inner)
        deeper.append(nn.Upsample(scale_factor=2, mode=spec.upsample[level]))
        self.deeper = nn.Sequential(*deeper)
        merged = skip + (spec.channels_up[level + 1] if inner is not None else down)
        merge: list[nn.Module] = [_norm(layout, merged), _conv(spec, layout, merged, up, k_up)]
        merge += _bn_act(layout, up)
        if spec.need_1x1_up:
            merge += [_conv(spec, layout, up, up, 1), *_bn_act(layout, up)]
        self.merge = nn.Sequential(*merge)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.skip is None:
            return self.merge(self.deeper(x))
        # Skip branch first, as the reference's Concat runs its branches.
        return self.merge(slot_major_cat([self.skip(x), self.deeper(x)], self.slots))


class SkipNetwork(nn.Module):
    """The full generator: nested levels, then a 1x1 conv head (and a sigmoid)."""

    def __init__(self, spec: SkipSpec, layout: Layout = Layout()) -> None:
        super().__init__()
        self.spec, self.layout = spec, layout
        inner: SkipLevel | None = None
        for level in reversed(range(spec.depth)):
            cin = spec.in_channels if level == 0 else spec.channels_down[level - 1]
            inner = SkipLevel(spec, level, cin, inner, layout)
        assert inner is not None  # SkipSpec guarantees depth >= 1
        self.body = inner
        out = spec.out_channels
        head: list[nn.Module] = [_conv(spec, layout, spec.channels_up[0], out, 1, feeds_norm=False)]
        if spec.need_sigmoid:
            head.append(nn.Sigmoid())
        self.head = nn.Sequential(*head)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if z.shape[-1] % 2**self.spec.depth or z.shape[-2] % 2**self.spec.depth:
            raise ValueError(
                f"network input {tuple(z.shape[-2:])} is not a multiple of {2**self.spec.depth}"
            )
        return self.head(self.body(z))


def build_network(spec: SkipSpec, layout: Layout = Layout()) -> SkipNetwork:
    return SkipNetwork(spec, layout)
