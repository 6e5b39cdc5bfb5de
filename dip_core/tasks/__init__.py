"""The task registry: every task is one object (base.py), registered here and nowhere else.

A new task is its own module here plus one line in ``_REGISTERED``; dip_core and the pipeline
read everything task-specific (input roles, scale, params, presets, operator, output size,
baseline) from the object. ``build_problem`` turns a job's inputs into a fit's Problem.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import DipInputError
from ..presets import Preset
from .base import Task
from .deblur import Deblur
from .denoise import Denoise
from .flash_no_flash import FlashNoFlash
from .inpaint import Inpaint, classify_mask
from .jpeg import Jpeg
from .preimage import Preimage
from .problem import Problem, problem_for
from .super_resolution import SuperResolution

_REGISTERED: tuple[Task, ...] = (
    Denoise(), Jpeg(), Inpaint(), SuperResolution(), FlashNoFlash(), Preimage(), Deblur(),
)  # fmt: skip
TASKS: dict[str, Task] = {task.name: task for task in _REGISTERED}
PRESETS: dict[str, Preset] = {
    name: preset for task in _REGISTERED for name, preset in task.presets.items()
}

__all__ = [
    "PRESETS", "TASKS", "Problem", "Task", "build_problem", "check_params", "classify_mask",
    "get_task", "resolve_preset",
]  # fmt: skip


def get_task(name: object) -> Task:
    """The registered task of that name; DipInputError naming the known ones otherwise."""
    task = TASKS.get(name) if isinstance(name, str) else None
    if task is None:
        raise DipInputError(f"unknown task {name!r}; known tasks: {list(TASKS)}")
    return task


def resolve_preset(
    task: str, params: dict | None, scale: int | None = None, **inputs: torch.Tensor | None
) -> Preset:
    """The preset a job runs with: its task's, with params applied. ``inputs``, companion
    images by role, may choose the variant (inpainting's mask)."""
    given = {role: image for role, image in inputs.items() if image is not None}
    return get_task(task).resolve_preset(params, scale, given)


def check_params(task: str, params: dict | None, scale: int | None = None) -> None:
    """Raise DipInputError when the task, scale or params would be refused by a fit."""
    resolve_preset(task, params, scale)


def build_problem(
    task: str,
    observation: torch.Tensor,
    *,
    scale: int | None = None,
    params: dict | None = None,
    feature_net: nn.Module | None = None,
    **inputs: torch.Tensor | None,
) -> Problem:
    """Validate one job's inputs and turn them into a Problem (on the CPU). ``inputs`` are
    the companion images by role (roles.py: mask, guide, reference)."""
    return problem_for(get_task(task), observation, inputs, scale, params, feature_net)
