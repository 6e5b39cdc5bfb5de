"""Every task: shapes, zero energy at the truth, presets, params and input checks."""

import numpy as np
import pytest
import torch

from dip_core import PRESETS, DipInputError, build_problem, check_params, resolve_preset
from dip_core import TASKS as REGISTERED
from dip_core.feature_nets import mobilenet_v2_features
from dip_core.tasks import classify_mask

torch.set_num_threads(1)
SMALL = {"channels": 8, "depth": 3}
G = torch.Generator().manual_seed(0)
CLEAN = torch.rand(3, 24, 20, generator=G)
MASK = (torch.rand(24, 20, generator=G) > 0.3).float()


def job(task):
    """(observation kwargs, target) for a task, the observation made exactly from CLEAN."""
    if task == "super_resolution":
        from dip_core.operators import Downsampler

        low = Downsampler(24, 20, 2)(CLEAN.unsqueeze(0))[0]
        return dict(observation=low, scale=2), CLEAN
    if task == "inpaint":
        return dict(observation=CLEAN * MASK, mask=MASK), CLEAN
    if task == "flash_no_flash":
        return dict(observation=CLEAN, guide=CLEAN.flip(-1)), CLEAN
    if task == "preimage":
        return dict(observation=CLEAN, feature_net=mobilenet_v2_features(None, 3)), CLEAN
    if task == "deblur":
        from scipy.ndimage import convolve

        from dip_core.tasks.deblur import gaussian_kernel

        kernel = gaussian_kernel(1.5).numpy()
        blurred = [convolve(plane, kernel, mode="nearest") for plane in CLEAN.double().numpy()]
        observation = torch.tensor(np.stack(blurred)).float()
        return dict(observation=observation, params={**SMALL, "blur_sigma": 1.5}), CLEAN
    return dict(observation=CLEAN), CLEAN


TASKS = ["denoise", "jpeg", "inpaint", "super_resolution", "flash_no_flash", "preimage", "deblur"]


def test_every_registered_task_is_covered_here():
    assert sorted(TASKS) == sorted(REGISTERED)


def test_the_registry_is_consistent():
    """Unique preset names (PRESETS merges every task's), known roles, a preset each."""
    from dip_core import COMPANION_ROLES

    names = [name for task in REGISTERED.values() for name in task.presets]
    assert len(names) == len(set(names)) == len(PRESETS)
    roles = {role.name for role in COMPANION_ROLES}
    for name, task in REGISTERED.items():
        assert task.name == name and task.presets, name
        assert set(task.required_roles) <= roles, name


@pytest.mark.parametrize("task", TASKS)
def test_energy_is_zero_at_the_true_image_and_shapes_fit(task):
    kwargs, target = job(task)
    problem = build_problem(task, **{"params": SMALL, **kwargs})
    p = problem.placement
    assert (p.height, p.width) == target.shape[1:]
    assert p.padded_height % 8 == 0 and p.padded_width % 8 == 0
    padded = torch.zeros(1, 3, p.padded_height, p.padded_width)
    padded[..., p.top : p.top + p.height, p.left : p.left + p.width] = target
    assert problem.data_energy(padded).item() == pytest.approx(0.0, abs=1e-10)
    assert problem.data_energy(torch.rand_like(padded)).item() > 1e-6


def test_grey_images_and_odd_sizes_are_kept_whole():
    problem = build_problem("denoise", torch.rand(1, 17, 9), params=SMALL)
    assert problem.spec.out_channels == 1
    assert (problem.placement.height, problem.placement.width) == (17, 9)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"learning_rate": 0.1}, "unknown params"),
        ({"lr": -1}, "params.lr"),
        ({"lr": float("nan")}, "finite"),
        ({"exp_weight": 1.0}, "exp_weight"),
        ({"channels": [8, 8], "depth": 3}, "has 2 entries"),
        ({"kernel_down": 4}, "odd"),
        ({"upsample": "cubic"}, "upsample"),
        ({"input_depth": 0}, "input_depth"),
        ({"depth": 20}, "depth"),
        ({"variant": "text"}, "unknown params"),  # variant belongs to inpaint only
    ],
)
def test_bad_params_are_refused_with_a_clear_message(params, message):
    with pytest.raises(DipInputError, match=message):
        check_params("denoise", params)


def test_params_override_the_preset():
    preset = resolve_preset("denoise", {"lr": 0.05, "channels": [4, 8], "skip_channels": 0})
    assert preset.lr == 0.05 and preset.channels_down == (4, 8) and preset.channels_skip == (0, 0)
    assert preset.iterations == PRESETS["denoise"].iterations
    assert resolve_preset("jpeg", {"depth": 3}).channels_down == (8, 16, 32)


def test_unknown_task_and_bad_scale():
    with pytest.raises(DipInputError, match="unknown task"):
        check_params("dehaze", None)
    with pytest.raises(DipInputError, match="scale"):
        check_params("super_resolution", None, scale=3)
    with pytest.raises(DipInputError, match="scale applies only to super_resolution, not to"):
        check_params("denoise", None, scale=2)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(task="inpaint", observation=CLEAN), "needs a mask"),
        (dict(task="inpaint", observation=CLEAN, mask=torch.ones(5, 5)), "mask is"),
        (dict(task="inpaint", observation=CLEAN, mask=torch.zeros(24, 20)), "no known pixel"),
        (dict(task="flash_no_flash", observation=CLEAN), "needs a guide"),
        (dict(task="denoise", observation=torch.rand(4, 8, 8)), "C = 1 or 3"),
        (dict(task="denoise", observation=CLEAN * 2), r"\[0, 1\]"),
        (dict(task="denoise", observation=CLEAN, reference=torch.rand(3, 5, 5)), "reference"),
        (dict(task="preimage", observation=CLEAN), "feature network"),
    ],
)
def test_bad_inputs_are_refused(kwargs, message):
    with pytest.raises(DipInputError, match=message):
        build_problem(**kwargs)


def test_the_mask_picks_the_inpainting_preset():
    g = torch.Generator().manual_seed(3)
    scattered = (torch.rand(64, 64, generator=g) > 0.5).float()
    assert classify_mask(scattered) == "pixels"
    hole = torch.ones(64, 64)
    hole[10:50, 10:50] = 0
    assert classify_mask(hole) == "large_hole"
    blob = torch.ones(64, 64)
    blob[20:30, 20:30] = 0
    assert classify_mask(blob) == "region"
    text = torch.ones(64, 64)
    text[8:56:8, 4:60] = 0  # thin strokes
    assert classify_mask(text) == "text"
    assert resolve_preset("inpaint", None, mask=scattered).lr == 0.001
    assert resolve_preset("inpaint", {"variant": "region"}, mask=scattered).input_kind == "meshgrid"


def test_every_task_declares_a_baseline_the_quality_benchmark_has():
    from benchmarks.baselines import BASELINES

    for task in REGISTERED.values():
        assert task.baseline in BASELINES or task.baseline == "", task.name
