"""Deep Image Prior: the method, in pure torch (no I/O, no scheduling).

``restore(task, observation, ...)`` is the one-call entry point; the modules below it are
the pieces (networks, inputs, operators, energies, presets, the fitting loop, metrics).
"""

from .api import restore
from .errors import DipInputError
from .feature_nets import mobilenet_v2_features
from .fit import FitConfig, FitProgress, FitResult, fit
from .metrics import psnr, psnr_y, ssim
from .networks import SkipSpec, build_network
from .presets import PRESETS, TASKS, Preset
from .tasks import build_problem, check_params, resolve_preset

__all__ = [
    "PRESETS",
    "TASKS",
    "DipInputError",
    "FitConfig",
    "FitProgress",
    "FitResult",
    "Preset",
    "SkipSpec",
    "build_network",
    "build_problem",
    "check_params",
    "fit",
    "mobilenet_v2_features",
    "psnr",
    "psnr_y",
    "resolve_preset",
    "restore",
    "ssim",
]
