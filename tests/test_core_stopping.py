"""The no-reference stopping rule and ensembles."""

import pytest
import torch

from dip_core import FitConfig, build_problem, fit, restore
from dip_core.stopping import StopRule, VarianceStopper, offline_stop

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
    values = [stopper.update(i, f, f) for i, f in enumerate(frames)]
    assert all(torch.isnan(v) for v in values[:2])
    for i in range(2, 7):
        window = frames[i - 2 : i + 1].double()
        expected = window.var(dim=0, unbiased=False).mean()
        assert values[i].item() == pytest.approx(expected.item(), rel=1e-6)


def test_the_stopper_keeps_the_image_of_the_lowest_variance():
    stopper = VarianceStopper(StopRule(window=2, patience=2), torch.zeros(1, 1, 2, 2))
    moves = [0.0, 1.0, 1.1, 1.15, 3.0, 6.0, 10.0]  # steps shrink, then grow
    for step, level in enumerate(moves):
        frame = torch.full((1, 1, 2, 2), level)
        stopper.update(step, frame, frame + 100)
    assert stopper.chosen_step() == 3
    assert torch.equal(stopper.best_image, torch.full((1, 1, 2, 2), 101.15))
    assert stopper.should_stop(len(moves))


def test_auto_stop_fires_where_the_offline_rule_does_and_returns_that_step():
    clean, noisy = noisy_image()
    rule = StopRule(window=10, patience=40)
    problem = build_problem("denoise", noisy, reference=clean, params=SMALL)
    observed = fit(problem, FitConfig(400, 0.01, 1 / 30, 0.0, stop=rule, stop_enforced=False))
    expected = offline_stop(observed.stop_stats, rule.patience)
    assert expected is not None, "the rule should fire on this noisy image"
    problem = build_problem("denoise", noisy, reference=clean, params=SMALL)
    stopped = fit(problem, FitConfig(400, 0.01, 1 / 30, 0.0, stop=rule, sync_every=1))
    assert stopped.stop_reason == "auto"
    assert stopped.stopped_at == expected[0] + 1
    assert stopped.iterations == expected[1] + 1 < 400
    # The returned image is the output at the chosen step: its PSNR is that trace entry.
    assert stopped.psnr == pytest.approx(stopped.psnrs[expected[0]].item(), abs=1e-4)


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


def test_a_result_delay_keeps_the_result_that_many_steps_after_the_minimum():
    stopper = VarianceStopper(
        StopRule(window=2, patience=3, result_delay=1), torch.zeros(1, 1, 1, 1)
    )
    moves = [0.0, 1.0, 1.1, 1.15, 3.0, 6.0, 10.0]  # lowest variance at step 3
    for step, level in enumerate(moves):
        frame = torch.full((1, 1, 1, 1), level)
        stopper.update(step, frame, frame + 100)
    assert stopper.chosen_step() == 4
    assert stopper.best_image.item() == pytest.approx(103.0)
    assert StopRule.for_averaging(50, 300, 0.99).result_delay == 100
    assert StopRule.for_averaging(50, 30, 0.99).result_delay == 29  # always before firing
