"""Per-job overrides of a preset (the manifest's ``params``), validated strictly.

Unknown keys are an error, never silently ignored: a typo must not run a 3,000-step fit
with the wrong settings.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

from .errors import DipInputError
from .networks import DOWNSAMPLE_MODES, PADDING_MODES, UPSAMPLE_MODES
from .presets import Preset

COMMON_KEYS = (
    "lr", "reg_noise_std", "exp_weight", "input_depth", "input", "channels", "depth",
    "skip_channels", "kernel_down", "kernel_up", "upsample", "downsample", "padding",
    "noise_scale", "stop", "stop_window", "stop_patience", "ensemble",
)  # fmt: skip
MAX_DEPTH = 8
STOP_MODES = ("auto", "fixed")


def number(params: dict, key: str, low: float, high: float, *, low_open=False) -> float:
    value = params[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise DipInputError(f"params.{key} must be a finite number, got {value!r}")
    if value < low or value > high or (low_open and value == low):
        bracket = "(" if low_open else "["
        raise DipInputError(f"params.{key} must be in {bracket}{low}, {high}], got {value!r}")
    return float(value)


def integer(value: Any, key: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise DipInputError(f"params.{key} must be an integer in [{low}, {high}], got {value!r}")
    return value


def choice(params: dict, key: str, choices: tuple[str, ...]) -> str:
    if params[key] not in choices:
        raise DipInputError(f"params.{key} must be one of {list(choices)}, got {params[key]!r}")
    return params[key]


def _per_level(value: Any, key: str, depth: int, low: int, *, odd=False) -> tuple[int, ...]:
    values = value if isinstance(value, list) else [value] * depth
    if len(values) != depth:
        raise DipInputError(f"params.{key} has {len(values)} entries but the network has {depth}")
    checked = tuple(integer(v, key, low, 1024) for v in values)
    if odd and any(v % 2 == 0 for v in checked):
        raise DipInputError(f"params.{key} must be odd kernel sizes, got {value!r}")
    return checked


def _resized(levels: tuple, depth: int) -> tuple:
    """Truncate, or extend by repeating the last level, to ``depth`` entries."""
    return levels[:depth] + (levels[-1],) * max(0, depth - len(levels))


def _network_overrides(preset: Preset, params: dict) -> dict:
    depth = preset.depth
    if isinstance(params.get("channels"), list):
        depth = len(params["channels"])
    if "depth" in params:
        depth = integer(params["depth"], "depth", 1, MAX_DEPTH)
    fields = {
        "channels_down": ("channels", 1, False),
        "channels_up": ("channels", 1, False),
        "channels_skip": ("skip_channels", 0, False),
        "kernels_down": ("kernel_down", 1, True),
        "kernels_up": ("kernel_up", 1, True),
    }
    out: dict[str, Any] = {}
    for field, (key, low, odd) in fields.items():
        if key in params:
            out[field] = _per_level(params[key], key, depth, low, odd=odd)
        else:
            out[field] = _resized(getattr(preset, field), depth)
    out["upsample"] = _upsample(params, preset, depth)
    return out


def _upsample(params: dict, preset: Preset, depth: int) -> tuple[str, ...]:
    """One upsampling mode per level: a string for every level, a list per level (index 0 =
    finest), or the preset's modes resized to ``depth`` like the other per-level fields."""
    if "upsample" not in params:
        return _resized(tuple(preset.upsample), depth)  # a tuple once built (Preset)
    value = params["upsample"]
    modes = value if isinstance(value, list) else [value] * depth
    if len(modes) != depth:
        raise DipInputError(f"params.upsample has {len(modes)} entries but the network has {depth}")
    for mode in modes:
        if not isinstance(mode, str) or mode not in UPSAMPLE_MODES:
            raise DipInputError(
                f"params.upsample must be one of {list(UPSAMPLE_MODES)} or a list of them per "
                f"level, got {value!r}"
            )
    return tuple(modes)


def _input_overrides(preset: Preset, params: dict) -> dict:
    out: dict[str, Any] = {}
    if "input" in params:
        if preset.input_kind == "image":
            raise DipInputError("params.input cannot change this task's image input")
        out["input_kind"] = choice(params, "input", ("noise", "meshgrid"))
    kind = out.get("input_kind", preset.input_kind)
    if "input_depth" in params:
        if kind != "noise":
            raise DipInputError(f"params.input_depth applies to noise input, not {kind!r}")
        out["input_depth"] = integer(params["input_depth"], "input_depth", 1, 1024)
    elif kind == "meshgrid":
        out["input_depth"] = 2
    elif preset.input_kind == "meshgrid":
        out["input_depth"] = 32  # switching a meshgrid preset to noise: the paper's default
    return out


def apply_params(preset: Preset, params: dict, task_keys: tuple[str, ...], task: str) -> Preset:
    """The preset with the common ``params`` applied; raises DipInputError on an unknown key
    (``task_keys``: the task's own keys, applied by the task) or a bad value."""
    if not isinstance(params, dict):
        raise DipInputError(f"params must be a JSON object, got {type(params).__name__}")
    allowed = COMMON_KEYS + task_keys
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise DipInputError(
            f"unknown params for task {task!r}: {unknown}; allowed: {sorted(allowed)}"
        )
    changes: dict[str, Any] = {**_network_overrides(preset, params)}
    changes.update(_input_overrides(preset, params))
    if "lr" in params:
        changes["lr"] = number(params, "lr", 0.0, 10.0, low_open=True)
    if "reg_noise_std" in params:
        changes["reg_noise_std"] = number(params, "reg_noise_std", 0.0, 10.0)
    if "exp_weight" in params:
        changes["exp_weight"] = number(params, "exp_weight", 0.0, 0.9999)
    if "noise_scale" in params:
        changes["noise_scale"] = number(params, "noise_scale", 0.0, 100.0, low_open=True)
    for key, choices in (("downsample", DOWNSAMPLE_MODES), ("padding", PADDING_MODES)):
        if key in params:
            changes[key] = choice(params, key, choices)
    if "stop" in params:
        changes["stop"] = choice(params, "stop", STOP_MODES)
    for key, high in (("stop_window", 100_000), ("stop_patience", 1_000_000), ("ensemble", 64)):
        if key in params:
            changes[key] = integer(params[key], key, 1, high)
    return replace(preset, **changes)
