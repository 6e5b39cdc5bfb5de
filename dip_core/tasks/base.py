"""What a task is: one object that says everything task-specific about a job.

A task names the input roles it needs, the ``scale`` values it takes, its extra params, its
presets (and how one is chosen), how its forward operator and energy are built from the
inputs, where its energy is expected to settle, its output size and the classical method the
quality benchmark compares it with. Everything else (input checks, the network, placement,
the fitting loop) is generic and lives in problem.py and the modules below dip_core.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch
from torch import nn

from ..energies import MeanSquaredError
from ..errors import DipInputError
from ..noise import estimate_noise_sigma
from ..operators import Identity
from ..params import apply_params
from ..presets import Preset

Inputs = dict[str, torch.Tensor]  # companion inputs by role name (roles.py), checked
Measurement = tuple[nn.Module, nn.Module, torch.Tensor]  # (operator A, energy E, data y)


@dataclass(frozen=True)
class Observed:
    """One checked job, as a task's physics sees it."""

    preset: Preset
    params: dict  # checked by Task.resolve_preset
    image: torch.Tensor  # the observation, (1, C, H, W)
    inputs: Inputs
    output_hw: tuple[int, int]
    feature_net: nn.Module | None = None


class Task:
    name: str = ""
    required_roles: tuple[str, ...] = ()  # roles.py names a job of this task must give
    scales: tuple[int, ...] = ()  # the values ``scale`` may take; () = no scale
    param_keys: tuple[str, ...] = ()  # params beyond params.COMMON_KEYS
    needs_feature_net: bool = False  # the caller supplies a feature network (pre-image)
    baseline: str = ""  # the classical method of the quality benchmark (benchmarks/baselines.py)
    luma_metric: bool = False  # quality is reported on the Y channel (the SR convention)
    # Whether a large image may be fitted in overlapping tiles (tiling.py). False where the
    # energy is on whole-image features (pre-image): such a job is always fitted whole.
    tileable: bool = True
    presets: ClassVar[dict[str, Preset]] = {}  # by name; the first is the task's default

    # --- what the job looks like --------------------------------------------------------
    def check_scale(self, scale: int | None) -> None:
        if self.scales and scale not in self.scales:
            raise DipInputError(f"{self.name} needs scale in {list(self.scales)}, got {scale!r}")
        if not self.scales and scale is not None:
            from . import TASKS  # the registry, to name the tasks that do take a scale

            scaled = " / ".join(name for name, task in TASKS.items() if task.scales)
            raise DipInputError(f"scale applies only to {scaled}, not to {self.name!r}")

    def output_scale(self, scale: int | None) -> int:
        """How many times larger than the image the result is, per side."""
        return 1

    def prepare(self, observation: torch.Tensor) -> torch.Tensor:
        """The observation as the task fits it, (C, H, W)."""
        return observation

    # --- the preset ---------------------------------------------------------------------
    def preset_name(self, params: dict, scale: int | None, inputs: Inputs) -> str:
        return next(iter(self.presets))

    def task_params(self, params: dict) -> dict[str, Any]:
        """Preset changes from this task's own ``param_keys`` (validated); {} by default."""
        return {}

    def resolve_preset(
        self, params: dict | None, scale: int | None = None, inputs: Inputs | None = None
    ) -> Preset:
        """The preset a job runs with: the task's, with ``params`` applied."""
        self.check_scale(scale)
        params = params or {}
        preset = apply_params(
            self.presets[self.preset_name(params, scale, inputs or {})], params, self.param_keys,
            self.name,
        )  # fmt: skip
        return replace(preset, **self.task_params(params))

    # --- the physics --------------------------------------------------------------------
    def network_image(self, inputs: Inputs) -> torch.Tensor | None:
        """The image fed to the network when the preset's input is an image."""
        return None

    def measurement(self, job: Observed) -> Measurement:
        """(operator A, energy E, data y): the fit minimises E(A(x), y), A taking an
        output-sized image. Default: x is compared with the image itself."""
        return Identity(), MeanSquaredError(), job.image

    def tile_halo(self, params: dict) -> int:
        """Pixels (of the image) at a tile's inner edge that its fit cannot get right: the
        operator's reach beyond the tile, which the tile does not have. Tiling gives them no
        weight in the blend (tiling.py). 0 by default: the operator is pixel-wise."""
        return 0

    def energy_floor(self, observation: torch.Tensor) -> float | None:
        """The energy of a fit that has reached the noise level, where the task knows it
        (the stopping rule is armed below it, stopping.py); None by default."""
        return None


# The averaged output is at its best when the raw outputs' residual is 0.81-0.98 of the
# noise variance, and the estimate ran up to 22% high in variance on textured photos (40% on
# a zebra's stripes): 0.9 keeps the rule late rather than early (README "Quality").
NOISE_FLOOR_SHARE = 0.9


def noise_floor(observation: torch.Tensor) -> float:
    """MSE(A(x), y) = sigma^2 when A(x) is the clean signal and y carries noise of sigma."""
    return NOISE_FLOOR_SHARE * estimate_noise_sigma(observation) ** 2
