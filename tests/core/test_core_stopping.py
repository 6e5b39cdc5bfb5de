"""The no-reference stopping rule and ensembles."""

from dataclasses import replace

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


# A Python scalar made a tensor (a host-to-device copy), a tensor read as a Python number,
# and a data-dependent shape: each makes a CUDA stream and the host wait for each other.
# (.cpu() and .tolist() do not dispatch on a CPU tensor, so they are not counted here.)
SYNCING_OPS = ("lift_fresh", "_local_scalar_dense", "nonzero")


class HostSyncCounter:
    """Counts the SYNCING_OPS dispatched while it is active."""

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if any(op in str(func) for op in SYNCING_OPS):
                    counter.syncs += 1
                return func(*args, **(kwargs or {}))

        self.syncs, self.mode = 0, Mode()
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)


def test_the_stopper_syncs_nothing_per_step():
    stopper = VarianceStopper(StopRule(window=2, patience=5), torch.zeros(1, 3, 4, 4), ARMED)
    frames, energy = torch.rand(6, 1, 3, 4, 4), torch.tensor(0.1)
    with HostSyncCounter() as counter:
        for step, frame in enumerate(frames):
            stopper.update(step, frame, frame, energy)
    assert counter.syncs == 0


def test_a_whole_fit_syncs_only_at_its_sync_points():
    """Twice the steps between the same sync points: the same number of host syncs."""
    _, noisy = noisy_image(16)
    rule = StopRule(window=5, patience=5)
    counts = []
    for steps in (20, 40):
        problem = build_problem("denoise", noisy, params=SMALL)
        config = FitConfig(steps, 0.01, 1 / 30, 0.99, stop=rule, sync_every=steps)
        with HostSyncCounter() as counter:
            fit(problem, config)
        counts.append(counter.syncs)
    assert counts[0] == counts[1]


def test_a_rollback_before_the_capture_drops_the_pending_choice():
    """Lowest variance at step 2, its image due at step 4 (delay 2); a rollback to step 3
    empties the window, so step 4 would never be captured: the choice must go too, and the
    image kept must be the one of the step the stopper names. Every variance after the
    rollback is higher than step 2's: keeping the old choice would return a blank image."""
    rule = StopRule(window=3, patience=50, result_delay=2)
    stopper = VarianceStopper(rule, torch.zeros(1, 1, 1, 1), ARMED)
    feed(stopper, [0.0, 0.1, 0.2, 5.0])  # variance lowest at step 2
    assert stopper.chosen_step() == 4
    stopper.forget_from(3)
    levels = {3: 7.0, 4: 8.0, 5: 9.5, 6: 11.0, 7: 13.0}
    for step, level in levels.items():
        frame = torch.full((1, 1, 1, 1), level)
        stopper.update(step, frame, frame + 100, torch.tensor(1.0))
    chosen = stopper.chosen_step()
    assert chosen == 7  # the first full window after the rollback (step 5), plus 2
    assert stopper.best_image.item() == pytest.approx(levels[chosen] + 100)


def test_a_rollback_before_the_chosen_step_clears_the_decision():
    """Not enforced, the rule has decided; a rollback to before the image it chose throws
    that image's path away, so the decision goes too."""
    stopper = VarianceStopper(StopRule(window=2, patience=2), torch.zeros(1, 1, 1, 1), ARMED)
    feed(stopper, [0.0, 1.0, 1.1, 1.15, 3.0, 6.0, 10.0])
    assert stopper.should_stop(7) and stopper.decision == (3, 7)
    stopper.forget_from(5)  # after the chosen step: the choice stands
    assert stopper.decision == (3, 7)
    stopper.forget_from(3)
    assert stopper.decision is None and int(stopper.best_step) == -1


def offline_rule(stats, energies, floor, rule):
    """The rule written out step by step from the recorded traces, for a fit that syncs
    every step: (step count of the returned image, steps run when it fires), or None."""
    best, best_step, armed = float("inf"), -1, False
    for t, value in enumerate(stats.tolist()):
        if t >= rule.window - 1:
            armed = armed or energies[t - rule.window + 1 : t + 1].mean().item() < floor
        if armed and value < best:
            best, best_step = value, t
        if best_step >= 0 and t - best_step >= rule.patience:
            return best_step + rule.result_delay + 1, t + 1
    return None


def test_auto_stop_fires_where_the_rule_written_out_does_and_returns_that_image():
    clean, noisy = noisy_image()
    rule = StopRule.for_averaging(10, 40, 0.9)  # averaging: the result 10 steps later
    config = FitConfig(400, 0.01, 1 / 30, 0.9, stop=rule, sync_every=1, stop_enforced=False)
    problem = build_problem("denoise", noisy, reference=clean, params=SMALL)
    observed = fit(problem, config)
    expected = offline_rule(observed.stop_stats, observed.energies, problem.energy_floor, rule)
    assert expected is not None, "the rule should fire on this noisy image"
    assert observed.rollbacks == 0  # the written-out rule knows nothing of rollbacks
    assert observed.stop_decision == expected and observed.iterations == 400
    chosen, fired = expected
    problem = build_problem("denoise", noisy, reference=clean, params=SMALL)
    stopped = fit(problem, replace(config, stop_enforced=True))
    assert stopped.stop_reason == "auto" and stopped.stop_decision == expected
    assert stopped.stopped_at == chosen and stopped.iterations == fired < 400
    # The returned image is the average at the chosen step: its PSNR is that trace entry.
    assert stopped.psnr == pytest.approx(stopped.psnrs[chosen - 1].item(), abs=1e-4)


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
    assert problem.energy_floor == pytest.approx(0.9 * 0.1**2, rel=0.2)  # the noise added
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
