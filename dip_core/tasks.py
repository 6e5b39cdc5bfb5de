"""The one place where a task name becomes operator + energy + network input + preset.

A new task is one entry here (and its operator in operators.py if new) plus one entry in
the shared task tests.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .energies import MaskedMeanSquaredError, MeanSquaredError
from .errors import DipInputError
from .inputs import meshgrid_input, noise_input
from .networks import SkipSpec
from .noise import estimate_noise_sigma
from .operators import Downsampler, FeatureMap, Identity
from .padding import Placement
from .params import apply_params, requested_variant
from .presets import PRESETS, SR_SCALES, TASKS, Preset, preset_name


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
        if self.preset.input_kind == "image":
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


def _as_image(t: torch.Tensor | None, name: str) -> torch.Tensor | None:
    if t is None:
        return None
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


def classify_mask(mask: torch.Tensor) -> str:
    """Pick the inpainting preset from the mask's shape: scattered missing pixels,
    a large hole, thin strokes (text) or a compact region."""
    known = mask.reshape(1, 1, *mask.shape[-2:]) > 0.5
    hole = ~known
    hole_fraction = hole.float().mean().item()
    if hole_fraction == 0:
        return "region"
    # A hole pixel "touches" the known image when one of its 4 neighbours is known.
    padded = F.pad(known.float(), (1, 1, 1, 1), mode="replicate")
    neighbours = F.conv2d(padded, torch.tensor([[[[0.0, 1, 0], [1, 0, 1], [0, 1, 0]]]]))
    touching = ((neighbours > 0) & hole).float().sum().item() / hole.float().sum().item()
    if hole_fraction >= 0.2 and touching >= 0.85:
        return "pixels"
    if hole_fraction >= 0.1:
        return "large_hole"
    return "text" if touching >= 0.4 else "region"


def _check_task(task: str, scale: int | None) -> None:
    if task not in TASKS:
        raise DipInputError(f"unknown task {task!r}; known tasks: {list(TASKS)}")
    if task == "super_resolution" and scale not in SR_SCALES:
        raise DipInputError(f"super_resolution needs scale in {list(SR_SCALES)}, got {scale!r}")
    if task != "super_resolution" and scale is not None:
        raise DipInputError(f"scale applies only to super_resolution, not to {task!r}")


def resolve_preset(
    task: str, params: dict | None, scale: int | None = None, mask: torch.Tensor | None = None
) -> Preset:
    """The preset a job runs with: the paper's for its task, with params applied."""
    _check_task(task, scale)
    variant = None
    if task == "inpaint":
        variant = requested_variant(params) or (classify_mask(mask) if mask is not None else "text")
    return apply_params(PRESETS[preset_name(task, scale, variant)], task, params)


def check_params(task: str, params: dict | None, scale: int | None = None) -> None:
    """Raise DipInputError when the task, scale or params would be refused by a fit."""
    resolve_preset(task, params, scale)


def _spec(preset: Preset, out_channels: int, in_channels: int) -> SkipSpec:
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


def _operator_and_energy(task, preset, observation, mask, target_hw, feature_net):
    """(operator, energy, data) for a task; data is what A(x) is fitted to."""
    if task == "inpaint":
        return Identity(), MaskedMeanSquaredError(mask), observation
    if task == "super_resolution":
        down = Downsampler(*target_hw, factor=target_hw[0] // observation.shape[-2],
                           kind=preset.downsampler)  # fmt: skip
        return down, MeanSquaredError(), observation
    if task == "preimage":
        if feature_net is None:
            raise DipInputError("preimage needs a feature network (feature_net)")
        phi = FeatureMap(feature_net)
        with torch.no_grad():
            return phi, MeanSquaredError(), phi(observation)
    return Identity(), MeanSquaredError(), observation


def _check_shapes(task, observation, mask, guide, reference, target_shape) -> None:
    hw = tuple(observation.shape[-2:])
    if task == "inpaint" and mask is None:
        raise DipInputError("inpaint needs a mask (non-zero = known pixel)")
    if mask is not None and tuple(mask.shape[-2:]) != hw:
        raise DipInputError(f"mask is {tuple(mask.shape[-2:])} but the image is {hw} (H, W)")
    if mask is not None and not (mask > 0.5).any():
        raise DipInputError("mask has no known pixel: nothing to fit")
    if task == "flash_no_flash" and guide is None:
        raise DipInputError("flash_no_flash needs a guide (the flash image)")
    if guide is not None and tuple(guide.shape[-2:]) != hw:
        raise DipInputError(f"guide is {tuple(guide.shape[-2:])} but the image is {hw} (H, W)")
    if reference is not None and tuple(reference.shape) != target_shape:
        raise DipInputError(
            f"reference is {tuple(reference.shape)} but the result will be {target_shape}"
        )


def build_problem(
    task: str,
    observation: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    guide: torch.Tensor | None = None,
    scale: int | None = None,
    reference: torch.Tensor | None = None,
    params: dict | None = None,
    feature_net: nn.Module | None = None,
) -> Problem:
    """Validate one job's inputs and turn them into a Problem (on the CPU)."""
    observation = _as_image(observation, "observation")
    guide, reference = _as_image(guide, "guide"), _as_image(reference, "reference")
    if mask is not None:
        mask = (_as_image(mask, "mask")[:1] > 0.5).float()
    _check_task(task, scale)
    if task == "preimage" and observation.shape[0] == 1:
        observation = observation.expand(3, -1, -1)
    factor = scale or 1
    channels, height, width = observation.shape
    target_shape = (channels, height * factor, width * factor)
    _check_shapes(task, observation, mask, guide, reference, target_shape)
    preset = resolve_preset(task, params, scale, mask)
    in_channels = guide.shape[0] if preset.input_kind == "image" else preset.input_depth
    spec = _spec(preset, channels, in_channels)
    placement = Placement.for_target(
        target_shape[1], target_shape[2], spec.minimum_side(), 2**spec.depth
    )
    operator, energy, data = _operator_and_energy(
        task, preset, observation.unsqueeze(0), mask, target_shape[1:], feature_net
    )
    image_input = placement.pad(guide.unsqueeze(0)) if preset.input_kind == "image" else None
    return Problem(
        task, preset, spec, placement, operator, energy, data.detach(), image_input,
        None if reference is None else reference.unsqueeze(0), _energy_floor(task, observation),
    )  # fmt: skip


# The averaged output is at its best when the raw outputs' residual is 0.81-0.98 of the
# noise variance, and the estimate ran up to 22% high in variance on textured photos (40% on
# a zebra's stripes): 0.9 keeps the rule late rather than early (README "Quality").
NOISE_FLOOR_SHARE = 0.9


def _energy_floor(task: str, observation: torch.Tensor) -> float | None:
    """Denoising's energy at the noise level: MSE(x, noisy) = sigma^2 when x is clean."""
    if task != "denoise":
        return None
    return NOISE_FLOOR_SHARE * estimate_noise_sigma(observation) ** 2
