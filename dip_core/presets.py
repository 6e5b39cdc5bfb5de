"""A preset: the whole recipe of one fit (network input, architecture, optimiser, schedule).

Each task's module (tasks/) holds its presets: the paper's settings, read from the reference
notebooks (reference-method.md). Every preset's network is the one its notebook builds with
the reference ``skip()``, layer for layer (tests/core/test_core_reference_networks.py;
docs/presets.md lists them). Users override parts of a preset with the manifest's ``params``
(see params.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Preset:
    input_kind: str  # noise | meshgrid | image
    input_depth: int
    channels_down: tuple[int, ...]
    channels_up: tuple[int, ...]
    channels_skip: tuple[int, ...]
    kernels_down: tuple[int, ...]
    kernels_up: tuple[int, ...]
    upsample: tuple[str, ...] | str  # one mode per level (index 0 = finest), or one for all
    iterations: int
    lr: float
    reg_noise_std: float
    exp_weight: float  # output averaging weight; 0 returns the plain last output
    downsample: str = "stride"
    padding: str = "reflection"
    need_1x1_up: bool = True  # the 1x1 conv -> BN -> act closing every decoder level
    noise_scale: float = 0.1
    downsampler: str = "lanczos2"  # super_resolution: the degradation model
    feature_layer: int = 12  # preimage: MobileNetV2 features[:layer]
    stop: str = "fixed"  # "auto": stop by the windowed output variance (stopping.py)
    stop_window: int = 100  # the ES-WMV paper's window; see stopping.py and README "Quality"
    stop_patience: int = 300
    ensemble: int = 1  # fits with seeds seed, seed + 1, ... whose results are averaged

    def __post_init__(self) -> None:
        if isinstance(self.upsample, str):  # frozen: normalise once, as SkipSpec does
            object.__setattr__(self, "upsample", (self.upsample,) * len(self.channels_down))
        else:
            object.__setattr__(self, "upsample", tuple(self.upsample))

    @property
    def depth(self) -> int:
        return len(self.channels_down)


def levels(value: int | str, depth: int = 5) -> tuple:
    return (value,) * depth


# The networks several tasks share (each task's module holds its presets).
DENOISE_NET: dict[str, Any] = {
    "channels_down": levels(128),
    "channels_up": levels(128),
    "channels_skip": levels(4),
    "kernels_down": levels(3),
    "kernels_up": levels(3),
    "upsample": levels("bilinear"),
}
NEAREST_128: dict[str, Any] = {**DENOISE_NET, "upsample": levels("nearest")}
