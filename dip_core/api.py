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
from .tasks import Problem, build_problem, get_task
from .tiling import (
    TileGrid,
    Tiling,
    blend_results,
    known_pixels,
    plan_grid,
    tile_problems,
    tile_seed,
)

MAX_ITERATIONS = 1_000_000


@dataclass
class RestorePlan:
    """A validated job: every fit it needs, and how their results make the job's one.

    ``fits`` holds one (problem, config) per fit, tile-major: tile t's ensemble members are
    entries t * members ... t * members + members - 1. Fitted whole, there is one "tile",
    ``problem`` itself, and the configs' seeds are seed, seed + 1, ...; tiled (``grid``
    set; tiling.py), every tile is its own problem with its own seeds.
    """

    problem: Problem  # the whole image's: its preset, reference, and its fit when untiled
    fits: list[tuple[Problem, FitConfig]]
    members: int = 1  # fits per tile (the ensemble)
    seed: int = 0  # the job's
    grid: TileGrid | None = None  # the tiles, or None: fitted whole
    scale: int = 1  # output pixels per image pixel, per side (super-resolution's factor)

    @property
    def tiles(self) -> int:
        return 1 if self.grid is None else len(self.grid.tiles)


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
    tiling: Tiling | None = None,
    **inputs: torch.Tensor | None,
) -> RestorePlan:
    """Validate one job and plan its fits (see ``restore``); raises DipInputError.
    ``inputs``: the companion images by input role (dip_core/roles.py: mask, guide,
    reference); an unknown role is a TypeError. ``tiling``: when and how to fit the image in
    tiles (tiling.py); None fits it whole."""
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
    members = problem.preset.ensemble

    def configs(first_seed: int) -> list[FitConfig]:
        return [
            FitConfig.from_preset(
                problem.preset,
                iterations,
                first_seed + member,
                sync_every=max(1, sync_every),
                adapt_lr="lr" not in (params or {}),
            )
            for member in range(members)
        ]

    the_task = get_task(task)
    factor = the_task.output_scale(scale)
    grid = plan_grid(the_task, problem, tiling, params, factor, known_pixels(inputs))
    if grid is None:
        fits = [(problem, config) for config in configs(seed)]
    else:
        tiles = tile_problems(the_task, problem, grid, observation, inputs, scale, params)
        fits = [(tile, config) for i, tile in enumerate(tiles)
                for config in configs(tile_seed(seed, i))]  # fmt: skip
    return RestorePlan(problem, fits, members, seed, grid, factor)


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
    ``tiling`` (a ``Tiling``) fits a large image in overlapping tiles, blended (tiling.py);
    None (the default) fits it whole. Raises DipInputError on bad input.

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
            fit(problem, config, device=device, callbacks=callbacks, step_hook=step_hook,
                options=options)
            for problem, config in plan.fits
        ]  # fmt: skip

    return run_plan(plan, fit_members)


def run_plan(
    plan: RestorePlan, fit_members: Callable[[RestorePlan], list[FitResult]] | None = None
) -> FitResult:
    """Fit a plan's fits and make the job's one result of them (``restore`` after
    ``plan_restore``): the ensemble members of each tile combined (ensemble.py), the tiles
    blended (tiling.py). ``fit_members`` returns one FitResult per entry of ``plan.fits``,
    in order (default: one after the other with ``fit``, on the default device); a batch
    worker passes its own, e.g. packing them with other jobs' fits on one GPU."""
    if fit_members is None:
        results = [fit(problem, config) for problem, config in plan.fits]
    else:
        results = fit_members(plan)
    if len(results) != len(plan.fits):
        raise ValueError(f"fit_members returned {len(results)} results for {len(plan.fits)} fits")
    if plan.grid is None:
        return combine(plan.problem, results)
    problems = [problem for problem, _ in plan.fits[:: plan.members]]
    return blend_results(plan.grid, plan.problem, problems, results, plan.members, plan.seed,
                         plan.scale)  # fmt: skip
