"""The paper's settings per task, read from the reference notebooks (reference-method.md).

Every preset's network is the one its notebook builds with the reference ``skip()``, layer
for layer (tests/test_core_reference_networks.py; docs/presets.md lists them).

A preset is the whole recipe of one fit: network input, architecture, optimiser and
schedule. Users override parts of it with the manifest's ``params`` (see params.py).
"""

from __future__ import annotations

from dataclasses import dataclass

TASKS = ("denoise", "jpeg", "inpaint", "super_resolution", "flash_no_flash", "preimage")
INPAINT_VARIANTS = ("text", "region", "large_hole", "pixels")
SR_SCALES = (2, 4, 8)


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


def _levels(value: int | str, depth: int = 5) -> tuple:
    return (value,) * depth


_DENOISE_NET = {
    "channels_down": _levels(128),
    "channels_up": _levels(128),
    "channels_skip": _levels(4),
    "kernels_down": _levels(3),
    "kernels_up": _levels(3),
    "upsample": _levels("bilinear"),
}
_NEAREST_128 = {**_DENOISE_NET, "upsample": _levels("nearest")}

PRESETS: dict[str, Preset] = {
    # Denoising overfits the noise after its best step: auto-stop is on by default (the
    # iteration count becomes a cap). Other tasks gained nothing from it in the benchmark.
    "denoise": Preset("noise", 32, **_DENOISE_NET, iterations=3000, lr=0.01,
                      reg_noise_std=1 / 30, exp_weight=0.99, stop="auto"),
    "jpeg": Preset("noise", 3, channels_down=(8, 16, 32, 64, 128),
                   channels_up=(8, 16, 32, 64, 128), channels_skip=(0, 0, 0, 4, 4),
                   kernels_down=_levels(3), kernels_up=_levels(3), upsample=_levels("bilinear"),
                   iterations=2400, lr=0.01, reg_noise_std=1 / 30, exp_weight=0.99),
    # x2 is not in the paper; it takes x4's settings.
    "super_resolution_x2": Preset("noise", 32, **_DENOISE_NET, iterations=2000, lr=0.01,
                                  reg_noise_std=0.03, exp_weight=0.0),
    "super_resolution_x4": Preset("noise", 32, **_DENOISE_NET, iterations=2000, lr=0.01,
                                  reg_noise_std=0.03, exp_weight=0.0),
    "super_resolution_x8": Preset("noise", 32, **_DENOISE_NET, iterations=4000, lr=0.01,
                                  reg_noise_std=0.05, exp_weight=0.0),
    "inpaint_text": Preset("noise", 32, **{**_NEAREST_128, "channels_skip": _levels(128)},
                           iterations=6001, lr=0.01, reg_noise_std=0.03, exp_weight=0.0),
    "inpaint_region": Preset("meshgrid", 2, **{**_NEAREST_128, "channels_skip": _levels(0)},
                             iterations=5001, lr=0.01, reg_noise_std=0.03, exp_weight=0.0),
    "inpaint_large_hole": Preset("noise", 1, channels_down=(16, 32, 64, 128, 128, 128),
                                 channels_up=(16, 32, 64, 128, 128, 128),
                                 channels_skip=_levels(0, 6), kernels_down=_levels(5, 6),
                                 kernels_up=_levels(3, 6), upsample=_levels("nearest", 6),
                                 need_1x1_up=False, iterations=3001, lr=0.01,
                                 reg_noise_std=0.0, exp_weight=0.0),
    "inpaint_pixels": Preset("noise", 32, **_DENOISE_NET, iterations=11000, lr=0.001,
                             reg_noise_std=0.03, exp_weight=0.0),
    # Nearest upsampling at the two finest levels, bilinear below (flash-no-flash.ipynb).
    "flash_no_flash": Preset("image", 3, **{**_DENOISE_NET, "upsample": (
                                 "nearest", "nearest", "bilinear", "bilinear", "bilinear")},
                             iterations=601, lr=0.1, reg_noise_std=0.0, exp_weight=0.0),
    "preimage": Preset("noise", 32, channels_down=(16, 32, 64, 128, 128, 128),
                       channels_up=(16, 32, 64, 128, 128, 128), channels_skip=_levels(4, 6),
                       kernels_down=(7, 7, 5, 5, 3, 3), kernels_up=(7, 7, 5, 5, 3, 3),
                       upsample=_levels("nearest", 6), downsample="avg", padding="zero",
                       iterations=3100, lr=0.001, reg_noise_std=0.0, exp_weight=0.0),
}  # fmt: skip


def preset_name(task: str, scale: int | None = None, variant: str | None = None) -> str:
    if task == "super_resolution":
        return f"super_resolution_x{scale}"
    if task == "inpaint":
        return f"inpaint_{variant}"
    return task
