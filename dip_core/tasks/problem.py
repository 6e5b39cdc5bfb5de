"""A job's inputs checked and turned into a Problem: generic, the task supplies the rest."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import DipInputError
from ..inputs import meshgrid_input, noise_input
from ..networks import SkipSpec
from ..padding import Placement
from ..presets import Preset
from ..roles import COMPANION_ROLES, InputRole
from .base import Inputs, Observed, Task


@dataclass
class Problem:
    """Everything a fit needs: what to fit (target data), how (operator, energy, network)."""

    task: str
    preset: Preset
    spec: SkipSpec
    placement: Placement
    operator: nn.Module  # A: target-sized image -> the space of the data
    energy: nn.Module  # E(A(x), data)
    data: torch.Tensor  # what A(x) is compared with: the observation (or its features)
    image_input: torch.Tensor | None = None  # (1, C, Hp, Wp) when z is an image
    reference: torch.Tensor | None = None  # (1, C, H, W) clean target, for metrics only
    # The energy of a fit that has reached the noise level, where the task knows it
    # (denoising); the stopping rule is armed below it (stopping.py).
    energy_floor: float | None = None

    def to(self, device: torch.device) -> Problem:
        self.operator.to(device)
        self.energy.to(device)
        self.data = self.data.to(device)
        if self.image_input is not None:
            self.image_input = self.image_input.to(device)
        if self.reference is not None:
            self.reference = self.reference.to(device)
        return self

    def network_input(self, generator: torch.Generator) -> torch.Tensor:
        p, device = self.placement, self.data.device
        if self.image_input is not None:
            return self.image_input
        if self.preset.input_kind == "meshgrid":
            return meshgrid_input(p.padded_height, p.padded_width, device)
        z = noise_input(
            self.preset.input_depth, p.padded_height, p.padded_width, generator,
            self.preset.noise_scale,
        )  # fmt: skip
        return z.to(device)

    def data_energy(self, padded_output: torch.Tensor) -> torch.Tensor:
        """E(A(crop(out)), data): the energy of a network output on the padded domain."""
        return self.energy(self.operator(self.placement.crop(padded_output)), self.data)


def as_image(t: torch.Tensor, name: str) -> torch.Tensor:
    """(C, H, W) float in [0, 1] with C = 1 or 3 ((H, W) accepted); DipInputError otherwise."""
    if not isinstance(t, torch.Tensor):
        raise DipInputError(f"{name} must be a torch tensor, got {type(t).__name__}")
    if t.dim() == 2:
        t = t.unsqueeze(0)
    if t.dim() != 3 or t.shape[0] not in (1, 3) or min(t.shape[1:]) < 1:
        raise DipInputError(f"{name} must be (C, H, W) with C = 1 or 3, got {tuple(t.shape)}")
    t = t.float()
    if not torch.isfinite(t).all() or t.min() < -1e-3 or t.max() > 1 + 1e-3:
        raise DipInputError(f"{name} must hold finite values in [0, 1]")
    return t.clamp(0, 1)


def _companion(role: InputRole, value: torch.Tensor) -> torch.Tensor:
    image = as_image(value, role.name)
    return (image[:1] > 0.5).float() if role.kind == "mask" else image  # mask: 1 = known


def check_inputs(
    task: Task, observation: torch.Tensor, given: dict, output_shape: tuple[int, int, int]
) -> Inputs:
    """The companion inputs checked against the roles table: present where the task needs
    them, each of the size its role says (the image's, or the result's)."""
    known = {role.name: role for role in COMPANION_ROLES}
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise TypeError(f"unknown inputs {unknown}; input roles: {sorted(known)}")
    for name in task.required_roles:
        if given.get(name) is None:
            raise DipInputError(f"{task.name} needs a {name} ({known[name].meaning})")
    inputs: Inputs = {}
    for name, value in given.items():
        if value is None:
            continue
        role = known[name]
        inputs[name] = image = _companion(role, value)
        if role.size_of == "output" and tuple(image.shape) != output_shape:
            raise DipInputError(
                f"{name} is {tuple(image.shape)} but the result will be {output_shape}"
            )
        hw = tuple(observation.shape[-2:])
        if role.size_of == "image" and tuple(image.shape[-2:]) != hw:
            raise DipInputError(f"{name} is {tuple(image.shape[-2:])} but the image is {hw} (H, W)")
        if role.kind == "mask" and not image.any():
            raise DipInputError(f"{name} has no known pixel: nothing to fit")
    return inputs


def network_spec(preset: Preset, out_channels: int, in_channels: int) -> SkipSpec:
    return SkipSpec(
        in_channels=in_channels,
        out_channels=out_channels,
        channels_down=preset.channels_down,
        channels_up=preset.channels_up,
        channels_skip=preset.channels_skip,
        kernels_down=preset.kernels_down,
        kernels_up=preset.kernels_up,
        upsample=preset.upsample,
        downsample=preset.downsample,
        padding=preset.padding,
        need_1x1_up=preset.need_1x1_up,
    )


def problem_for(
    task: Task,
    observation: torch.Tensor,
    given: dict,
    scale: int | None,
    params: dict | None,
    feature_net: nn.Module | None,
    preset: Preset | None = None,
) -> Problem:
    """Validate one job's inputs and turn them into a Problem (on the CPU). ``preset``, when
    given, is used as it is instead of being resolved from params and inputs (a tile of an
    image runs the preset resolved for the whole image: tiling.py)."""
    observation = as_image(observation, "observation")
    task.check_scale(scale)
    observation = task.prepare(observation)
    factor = task.output_scale(scale)
    channels, height, width = observation.shape
    output_shape = (channels, height * factor, width * factor)
    inputs = check_inputs(task, observation, given, output_shape)
    if preset is None:
        preset = task.resolve_preset(params, scale, inputs)
    image = task.network_image(inputs) if preset.input_kind == "image" else None
    spec = network_spec(preset, channels, preset.input_depth if image is None else image.shape[0])
    placement = Placement.for_target(height * factor, width * factor, spec.minimum_side(),
                                     2**spec.depth)  # fmt: skip
    output_hw = (height * factor, width * factor)
    observed = Observed(preset, params or {}, observation.unsqueeze(0), inputs, output_hw,
                        feature_net)  # fmt: skip
    operator, energy, data = task.measurement(observed)
    reference = inputs.get("reference")
    return Problem(
        task.name, preset, spec, placement, operator, energy, data.detach(),
        None if image is None else placement.pad(image.unsqueeze(0)),
        None if reference is None else reference.unsqueeze(0), task.energy_floor(observation),
    )  # fmt: skip
