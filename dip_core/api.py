"""One call to restore one image: validate, build the task's problem, fit."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .engine import EngineOptions
from .ensemble import combine
from .errors import DipInputError
from .fit import Callback, FitConfig, FitResult, StepHook, fit
from .tasks import Problem, build_problem

MAX_ITERATIONS = 1_000_000


@dataclass
class RestorePlan:
    """A validated job: its problem and one fit configuration per ensemble member."""

    problem: Problem
    configs: list[FitConfig]


def plan_restore(
    task: str,
    observation: torch.Tensor,
    *,
    scale: int | None = None,
    iterations: int | None = None,
    seed: int = 0,
    params: dict | None = None,
    feature_net: nn.Module | None = None,
    sync_every: int = 50,
    **inputs: torch.Tensor | None,
) -> RestorePlan:
    """Validate one job and plan its fits (see ``restore``); raises DipInputError.
    ``inputs``: the companion images by input role (dip_core/roles.py: mask, guide,
    reference); an unknown role is a TypeError."""
    # type(...) is int: a bool is an int to isinstance, and True steps is a caller's bug.
    if iterations is not None and (
        type(iterations) is not int or not 0 <= iterations <= MAX_ITERATIONS
    ):
        raise DipInputError(f"iterations must be an integer in [0, {MAX_ITERATIONS}]")
    if type(seed) is not int:
        raise DipInputError(f"seed must be an integer, got {seed!r}")
    problem = build_problem(
        task, observation, scale=scale, params=params, feature_net=feature_net, **inputs
    )
    configs = [
        FitConfig.from_preset(
            problem.preset,
            iterations,
            seed + member,
            sync_every=max(1, sync_every),
            adapt_lr="lr" not in (params or {}),
        )
        for member in range(problem.preset.ensemble)
    ]
    return RestorePlan(problem, configs)


def restore(
    task: str,
    observation: torch.Tensor,
    *,
    device: str | torch.device | None = None,
    callbacks: Sequence[Callback] = (),
    step_hook: StepHook | None = None,
    options: EngineOptions | None = None,
    **job,
) -> FitResult:
    """Restore one image with Deep Image Prior.

    ``observation`` is the degraded image, (C, H, W) in [0, 1] with C = 1 or 3; ``mask``
    (H, W), non-zero = known pixel; ``guide`` the flash image; ``scale`` the SR factor;
    ``reference`` the clean target, used only for PSNR; ``iterations``, ``seed``, ``params``
    (preset overrides), ``feature_net`` (pre-image), ``sync_every`` as in ``plan_restore``.
    An ensemble (params ``ensemble``) fits seeds seed, seed + 1, ... and averages them.
    Raises DipInputError on bad input.

    A grey-to-white ramp with noise of sigma 0.1, restored by a small network in 200 steps
    (a second on a CPU): the result is closer to the clean ramp than the noisy input.

    >>> import torch
    >>> from dip_core import psnr, restore
    >>> clean = torch.linspace(0, 1, 24).repeat(3, 24, 1)
    >>> noise = torch.randn(clean.shape, generator=torch.Generator().manual_seed(0))
    >>> noisy = (clean + 0.1 * noise).clamp(0, 1)
    >>> small = {"channels": 8, "depth": 2, "input_depth": 4}
    >>> result = restore("denoise", noisy, iterations=200, seed=0, params=small, device="cpu")
    >>> result.image.shape, result.iterations
    (torch.Size([3, 24, 24]), 200)
    >>> round(psnr(noisy, clean).item(), 1), psnr(result.image, clean).item() > 22.5
    (20.4, True)
    """
    plan = plan_restore(task, observation, **job)

    def fit_members(plan: RestorePlan) -> list[FitResult]:
        return [
            fit(plan.problem, config, device=device, callbacks=callbacks, step_hook=step_hook,
                options=options)
            for config in plan.configs
        ]  # fmt: skip

    return run_plan(plan, fit_members)


def run_plan(
    plan: RestorePlan, fit_members: Callable[[RestorePlan], list[FitResult]] | None = None
) -> FitResult:
    """Fit a plan's members and combine them into the job's result (``restore`` after
    ``plan_restore``). ``fit_members`` fits them all (default: one after the other with
    ``fit``, on the default device); a batch worker passes its own, e.g. packing them with
    other jobs' fits on one GPU."""
    if fit_members is None:
        members = [fit(plan.problem, config) for config in plan.configs]
    else:
        members = fit_members(plan)
    return combine(plan.problem, members)
