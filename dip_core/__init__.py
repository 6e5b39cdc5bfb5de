"""Deep Image Prior: the method, in pure torch (no I/O, no scheduling).

``restore(task, observation, ...)`` is the one-call entry point. A batch system uses the
public batch API below and nothing deeper: ``plan_restore`` validates a job and plans its
fits (``Tiling``: a large image in overlapping tiles), ``run_plan`` fits and combines them
(with its own fitting function, e.g. packing fits of several jobs through ``PackedRunner``),
``TASKS`` and ``INPUT_ROLES`` say what each task needs. The modules are the pieces
(networks, inputs, operators, energies, presets, tasks, the fitting loop, tiling, metrics).
"""

from .api import RestorePlan, plan_restore, restore, run_plan
from .engine import EngineOptions, fit_bytes, slots_that_fit
from .errors import DipInputError
from .feature_nets import mobilenet_v2_features
from .fit import FitConfig, FitItem, FitProgress, FitResult, PackedRunner, fit, resolve_device
from .metrics import psnr, psnr_y, ssim
from .networks import SkipSpec, build_network
from .presets import Preset
from .roles import COMPANION_ROLES, INPUT_ROLES, InputRole
from .tasks import PRESETS, TASKS, Task, build_problem, check_params, get_task, resolve_preset
from .tiling import MIN_TILE_SIZE, Tiling

__all__ = [
    "COMPANION_ROLES",
    "INPUT_ROLES",
    "MIN_TILE_SIZE",
    "PRESETS",
    "TASKS",
    "DipInputError",
    "EngineOptions",
    "FitConfig",
    "FitItem",
    "FitProgress",
    "FitResult",
    "InputRole",
    "PackedRunner",
    "Preset",
    "RestorePlan",
    "SkipSpec",
    "Task",
    "Tiling",
    "build_network",
    "build_problem",
    "check_params",
    "fit",
    "fit_bytes",
    "get_task",
    "mobilenet_v2_features",
    "plan_restore",
    "psnr",
    "psnr_y",
    "resolve_device",
    "resolve_preset",
    "restore",
    "run_plan",
    "slots_that_fit",
    "ssim",
]
