"""The no-reference stopping rule and ensembles."""

import pytest
import torch

from dip_core import FitConfig, build_problem, fit, restore
from dip_core.noise import estimate_noise_sigma
from dip_core.stopping import StopRule, VarianceStopper

torch.set_num_threads(1)
SMALL = {"channels": 16, "depth": 3, "input_depth": 8}


def noisy_image(size=24):
    clean = torch.full((3, size, size), 0.3)
    clean[:, size // 3 : 2 * size // 3] = 0.7
    g = torch.Generator().manual_seed(0)
    return clean, (clean + 0.1 * torch.randn(clean.shape, generator=g)).clamp(0, 1)


def test_variance_of_a_window_matches_torch_var():
    frames = torch.rand(7, 1, 2, 4, 4, generator=torch.Generator().manual_seed(2))
    stopper = VarianceStopper(StopRule(window=3, patience=10), frames[0])
    values = [stopper.update(i, f, f, torch.tensor(1.0)) for i, f in enumerate(frames)]
    assert all(torch.isnan(v) for v in values[:2])
    for i in range(2, 7):
        window = frames[i - 2 : i + 1].double()
        expected = window.var(dim=0, unbiased=False).mean()
        assert values[i].item() == pytest.approx(expected.item(), rel=1e-6)


ARMED = float("inf")  # an energy floor every energy is below: armed once the window is full


def feed(stopper, levels, energies=None):
    """Frames of constant value ``level`` (result = frame + 100), one per step."""
    for step, level in enumerate(levels):
        frame = torch.full(stopper.best_image.shape, level)
        energy = torch.tensor(1.0 if energies is None else energies[step])
        stopper.update(step, frame, frame + 100, energy)


def test_the_stopper_keeps_the_image_of_the_lowest_variance():
    stopper = VarianceStopper(StopRule(window=2, patience=2), torch.zeros(1, 1, 2, 2), ARMED)
    moves = [0.0, 1.0, 1.1, 1.15, 3.0, 6.0, 10.0]  # steps shrink, then grow
    feed(stopper, moves)
    assert stopper.chosen_step() == 3
    assert torch.equal(stopper.best_image, torch.full((1, 1, 2, 2), 101.15))
    assert stopper.should_stop(len(moves)) and stopper.decision == (3, len(moves))


def test_no_step_counts_before_the_energy_reaches_the_noise_floor():
    """The early transient (the lowest variance here, steps 1-2) is not a candidate while
    the energy is above the floor; the rule waits for the fit to reach the noise level."""
    stopper = VarianceStopper(StopRule(window=2, patience=2), torch.zeros(1, 1, 1, 1), 0.5)
    moves = [0.0, 0.01, 0.02, 1.0, 3.0, 3.5, 3.7, 4.5, 6.0, 9.0]
    energies = [9.0, 8.0, 7.0, 3.0, 1.0, 0.4, 0.3, 0.3, 0.2, 0.2]  # window mean < 0.5 at 6
    feed(stopper, moves, energies)
    assert stopper.chosen_step() == 6  # variance 0.01 at step 6, the lowest once armed
    unarmed = VarianceStopper(StopRule(window=2, patience=2), torch.zeros(1, 1, 1, 1), ARMED)
    feed(unarmed, moves, energies)
    assert unarmed.chosen_step() == 1  # what plain ES-WMV returns: the transient


def test_without_a_floor_the_rule_waits_for_the_energy_plateau():
    rule = StopRule(window=2, patience=2, plateau=0.05)
    stopper = VarianceStopper(rule, torch.zeros(1, 1, 1, 1))
    moves = [0.0, 0.01, 0.02, 1.0, 3.0, 3.5, 3.7, 4.5, 6.0, 9.0]
    # Window means from step 1: 8.5, 7.5, 5, 2.5, 1.5, 1, 1, 1: the drop against the window
    # before is 33% at step 7 and 0 at step 8, where the rule arms. Steps 5-7 have a lower
    # variance but come while the energy still falls.
    energies = [9.0, 8.0, 7.0, 3.0, 2.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    feed(stopper, moves, energies)
    assert stopper.chosen_step() == 8


def test_a_result_delay_keeps_the_result_that_many_steps_after_the_minimum():
    stopper = VarianceStopper(
        StopRule(window=2, patience=3, result_delay=1), torch.zeros(1, 1, 1, 1), ARMED
    )
    feed(stopper, [0.0, 1.0, 1.1, 1.15, 3.0, 6.0, 10.0])  # lowest variance at step 3
    assert stopper.chosen_step() == 4
    assert stopper.best_image.item() == pytest.approx(103.0)
    assert StopRule.for_averaging(50, 300, 0.99).result_delay == 100
    assert StopRule.for_averaging(50, 30, 0.99).result_delay == 29  # always before firing


def test_the_stopper_copies_nothing_from_the_host_per_step():
    """torch.tensor(step, device=cuda) is a host-to-device copy that syncs the stream: the
    per-step update must only launch kernels (``lift_fresh`` is how a copy shows up)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Recorder(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    stopper = VarianceStopper(StopRule(window=2, patience=5), torch.zeros(1, 3, 4, 4), ARMED)
    frames, energy = torch.rand(6, 1, 3, 4, 4), torch.tensor(0.1)
    with Recorder() as recorder:
        for step, frame in enumerate(frames):
            stopper.update(step, frame, frame, energy)
    assert recorder.ops and not [op for op in recorder.ops if "lift_fresh" in op]


def test_auto_stop_returns_the_image_its_decision_names():
    clean, noisy = noisy_image()
    rule = StopRule(window=10, patience=40)
    problem = build_problem("denoise", noisy, reference=clean, params=SMALL)
    observed = fit(problem, FitConfig(400, 0.01, 1 / 30, 0.0, stop=rule, stop_enforced=False))
    assert observed.stop_decision is not None, "the rule should fire on this noisy image"
    assert observed.iterations == 400 and observed.stop_reason == "iterations"
    chosen, fired = observed.stop_decision
    problem = build_problem("denoise", noisy, reference=clean, params=SMALL)
    stopped = fit(problem, FitConfig(400, 0.01, 1 / 30, 0.0, stop=rule))
    assert stopped.stop_reason == "auto" and stopped.stop_decision == (chosen, fired)
    assert stopped.stopped_at == chosen and stopped.iterations == fired < 400
    # The returned image is the output at the chosen step: its PSNR is that trace entry.
    assert stopped.psnr == pytest.approx(stopped.psnrs[chosen - 1].item(), abs=1e-4)
    # Before it fired, the enforced fit followed the same path as the recorded one.
    torch.testing.assert_close(stopped.energies, observed.energies[:fired])


def test_a_cap_shorter_than_the_rule_can_judge_runs_the_fixed_schedule():
    _, noisy = noisy_image()
    rule = StopRule(window=10, patience=40)  # judges fits of 2 * 10 + 40 = 60 steps or more
    problem = build_problem("denoise", noisy, params=SMALL)
    short = fit(problem, FitConfig(59, 0.01, 1 / 30, 0.0, stop=rule, sync_every=1))
    assert short.stop_reason == "iterations" and short.iterations == 59
    assert short.stop_stats is None and short.stop_decision is None


def test_noise_estimate_matches_the_noise_added():
    """Closed form: white Gaussian noise of a known sigma on a smooth image."""
    g = torch.Generator().manual_seed(3)
    ramp = torch.linspace(0.2, 0.8, 128)
    smooth = (ramp[None, :] + ramp[:, None]).div(2).expand(3, -1, -1)
    for sigma in (5 / 255, 25 / 255, 50 / 255):
        noisy = smooth + sigma * torch.randn(smooth.shape, generator=g)
        assert estimate_noise_sigma(noisy) == pytest.approx(sigma, rel=0.05)
    assert estimate_noise_sigma(smooth) < 1e-3
    assert estimate_noise_sigma(torch.rand(3, 1, 5)) == 0.0  # too small to tell


def test_only_denoising_knows_its_noise_floor():
    _, noisy = noisy_image(32)
    problem = build_problem("denoise", noisy, params=SMALL)
    assert problem.energy_floor == pytest.approx(0.9 * estimate_noise_sigma(noisy) ** 2)
    assert build_problem("jpeg", noisy, params=SMALL).energy_floor is None


def test_stop_params_reach_the_fit():
    _, noisy = noisy_image()
    params = {**SMALL, "stop": "auto", "stop_window": 10, "stop_patience": 30}
    result = restore("denoise", noisy, iterations=400, params=params, sync_every=10)
    assert result.stop_reason == "auto" and result.iterations < 400
    assert result.stop_stats is not None and torch.isnan(result.stop_stats[:9]).all()
    fixed = restore("denoise", noisy, iterations=50, params={**SMALL, "stop": "fixed"})
    assert fixed.stop_stats is None and fixed.iterations == 50


def test_ensemble_averages_members_with_consecutive_seeds():
    _, noisy = noisy_image(16)
    members = [restore("denoise", noisy, iterations=15, seed=s, params=SMALL) for s in (4, 5)]
    combined = restore("denoise", noisy, iterations=15, seed=4, params={**SMALL, "ensemble": 2})
    torch.testing.assert_close(combined.image, (members[0].image + members[1].image) / 2)
    assert combined.iterations == 30
