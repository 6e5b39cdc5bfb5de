"""The fitting loop: it fits, it beats the trivial answer, it reproduces, it recovers."""

import pytest
import torch

from dip_core import FitConfig, build_problem, fit, restore
from dip_core.api import plan_restore
from dip_core.engine import EngineOptions, FlatAdam, PackedNetwork
from dip_core.metrics import psnr
from dip_core.slot import FitSlot, _bad_start, _Checkpoint, _diverged

torch.set_num_threads(1)
SMALL = {"channels": 16, "depth": 3, "input_depth": 8}


def synthetic(height=32, width=32, sigma=0.1, seed=1):
    """A piecewise-flat clean image and a noisy copy."""
    clean = torch.full((3, height, width), 0.25)
    clean[:, height // 4 : 3 * height // 4, width // 4 : 3 * width // 4] = 0.8
    clean[1] *= 0.7
    g = torch.Generator().manual_seed(seed)
    noisy = (clean + sigma * torch.randn(clean.shape, generator=g)).clamp(0, 1)
    return clean, noisy


def test_a_short_fit_lowers_the_energy_and_beats_the_noisy_input():
    clean, noisy = synthetic()
    result = restore("denoise", noisy, reference=clean, iterations=150, seed=0, params=SMALL)
    assert result.energies[-10:].mean() < result.energies[:10].mean() / 2
    assert result.psnr > psnr(noisy, clean).item() + 2
    assert result.image.shape == clean.shape and result.iterations == 150
    assert len(result.steps) == len(result.energies) == len(result.psnrs) == 150
    assert result.stop_reason == "iterations" and result.device == "cpu"


def test_same_seed_same_result_other_seed_other_result():
    _, noisy = synthetic(16, 16)
    runs = [restore("denoise", noisy, iterations=12, seed=s, params=SMALL) for s in (5, 5, 6)]
    assert torch.equal(runs[0].image, runs[1].image)
    assert torch.equal(runs[0].energies, runs[1].energies)
    assert not torch.equal(runs[0].image, runs[2].image)


@pytest.mark.parametrize("size", [(17, 23), (5, 3), (40, 33)])
def test_odd_sizes_round_trip(size):
    _, noisy = synthetic(*size)
    assert restore("denoise", noisy, iterations=3, params=SMALL).image.shape == (3, *size)


def test_super_resolution_returns_the_high_resolution_size():
    _, low = synthetic(12, 10)
    result = restore("super_resolution", low, scale=4, iterations=3, params=SMALL)
    assert result.image.shape == (3, 48, 40)


def test_averaging_returns_the_averaged_output_not_the_last_one():
    _, noisy = synthetic(16, 16)
    averaged = restore("denoise", noisy, iterations=20, params={**SMALL, "exp_weight": 0.9})
    plain = restore("denoise", noisy, iterations=20, params={**SMALL, "exp_weight": 0.0})
    assert not torch.equal(averaged.image, plain.image)
    # The plain result is the network's output on z without jitter: deterministic, in range.
    assert plain.image.min() >= 0 and plain.image.max() <= 1


def test_callbacks_see_progress_and_can_stop_the_fit():
    _, noisy = synthetic(16, 16)
    seen = []

    def stop_at_20(progress):
        seen.append(progress.step)
        return progress.step >= 20

    result = restore(
        "denoise", noisy, iterations=100, params=SMALL, callbacks=[stop_at_20], sync_every=10
    )
    assert seen == [10, 20]
    assert result.iterations == 20 and result.stop_reason == "callback"
    assert result.stopped_at == 20 and len(result.energies) == 20


def test_checkpoint_restores_a_slots_weights_and_adam_state():
    _, noisy = synthetic(16, 16)
    problem = build_problem("denoise", noisy, params=SMALL)
    cpu = torch.device("cpu")
    net = PackedNetwork(problem.spec, 2, cpu, EngineOptions())
    adam = FlatAdam(net)
    slot = FitSlot(None, problem, FitConfig(10, 0.01, 0.0, 0.0), 1, cpu, ((), None))
    slot.start(net, adam)

    def one_step():
        out = net(torch.stack([torch.zeros_like(slot.z), slot.network_input(net)]))
        energy = slot.energy(out[1])
        net.zero_grad()
        energy.backward()
        adam.step()
        slot.write(out[1].detach(), energy.detach())
        slot.step += 1

    one_step()
    saved = _Checkpoint(slot, net, adam)
    weights, moment, steps = net.slot_weights(1), adam.state(1)[0], adam.steps[1].item()
    untouched = net.slot_weights(0)
    for _ in range(3):
        one_step()
    assert not torch.equal(net.slot_weights(1), weights)
    saved.restore(slot, net, adam)
    assert torch.equal(net.slot_weights(1), weights) and torch.equal(adam.state(1)[0], moment)
    assert adam.steps[1].item() == steps == 1 and slot.step == 1
    assert torch.equal(net.slot_weights(0), untouched)  # the idle slot never moved


def blow_up_after_update(monkeypatch, update: int) -> list[float]:
    """Make Adam's ``update``-th step (counting from 1) multiply every weight by -30: a
    divergence inside the optimiser, after that step's energy was recorded. Returns the
    learning rate of slot 0 at each update, filled as the fit runs."""
    original, rates = FlatAdam.step, []

    def diverging_step(self):
        rates.append(float(self.lr[0]))
        original(self)
        if len(rates) == update:
            with torch.no_grad():
                self.flat.mul_(-30.0)

    monkeypatch.setattr(FlatAdam, "step", diverging_step)
    return rates


def test_a_diverged_window_is_rolled_back_and_the_fit_recovers():
    clean, noisy = synthetic(16, 16)
    problem = build_problem("denoise", noisy, reference=clean, params=SMALL)
    config = FitConfig(120, 0.01, 0.0, 0.0, seed=0, sync_every=20, divergence_warmup=20)
    corrupted = []

    def corrupt_once(step, weights):
        if step == 70 and not corrupted:
            corrupted.append(step)
            with torch.no_grad():
                for w in weights:
                    w.mul_(-30.0)

    healthy = fit(problem, config)
    recovered = fit(build_problem("denoise", noisy, reference=clean, params=SMALL), config,
                    step_hook=corrupt_once)  # fmt: skip
    assert corrupted == [70] and recovered.rollbacks == 1 and healthy.rollbacks == 0
    assert recovered.iterations == 120
    assert recovered.energies[20:].max() < 2 * healthy.energies[20:].max()  # the jump is gone
    assert recovered.energy == pytest.approx(healthy.energy, rel=0.5)


def test_a_checkpoint_taken_after_a_diverging_update_is_not_restored(monkeypatch):
    """The update of step 59 blows the weights up just before the checkpoint of step 60 is
    saved: that checkpoint's own energy is only seen in the next window, so the rollback
    must go to the checkpoint before it (restoring the bad one would loop until
    max_rollbacks and end diverged)."""
    clean, noisy = synthetic(16, 16)
    config = FitConfig(120, 0.01, 0.0, 0.0, seed=0, sync_every=20, divergence_warmup=20)
    healthy = fit(build_problem("denoise", noisy, reference=clean, params=SMALL), config)
    blow_up_after_update(monkeypatch, 60)  # the update made by step 59
    recovered = fit(build_problem("denoise", noisy, reference=clean, params=SMALL), config)
    assert recovered.rollbacks == 1 and recovered.iterations == 120
    assert recovered.energies[20:].max() < 2 * healthy.energies[20:].max()  # the jump is gone
    assert recovered.energy < 2 * healthy.energy  # at half the learning rate from step 40


def test_a_divergence_in_the_last_steps_is_not_returned(monkeypatch):
    """The update of step 56 blows up 3 steps before the end: too few to move the final
    window's medians, so the final window's last 3 steps are judged on their own."""
    clean, noisy = synthetic(16, 16)
    config = FitConfig(60, 0.01, 0.0, 0.0, seed=0, sync_every=20, divergence_warmup=20)
    healthy = fit(build_problem("denoise", noisy, reference=clean, params=SMALL), config)
    blow_up_after_update(monkeypatch, 57)
    recovered = fit(build_problem("denoise", noisy, reference=clean, params=SMALL), config)
    assert recovered.rollbacks == 1 and recovered.iterations == 60
    assert recovered.energy < 2 * healthy.energy


def test_divergence_is_judged_against_the_previous_window():
    """Diverged: a non-finite energy, or a window whose median (or its second half's) is
    5 dB above the previous window's (the reference compares with its previous check); not
    a single spike (not even at the end), and not a low point from long ago."""
    cfg = FitConfig(100, 0.01, 0.0, 0.0, divergence_warmup=0)
    level = 0.4  # the previous window's median (the best ever was, say, 0.1)
    window = lambda *values: torch.tensor(values, dtype=torch.float64)  # noqa: E731
    assert not _diverged(window(0.38, 0.45, 0.41, 0.5), level, 40, cfg)
    assert not _diverged(window(0.38, 0.45, 9.0, 0.5), level, 40, cfg)  # one spike
    assert _diverged(window(0.38, 1.5, 1.4, 2.0), level, 40, cfg)  # 1.45 > 3.16 * 0.4
    assert _diverged(window(0.38, float("nan"), 0.4), level, 40, cfg)
    late = window(0.38, 0.4, 0.41, 0.39, 1.5, 1.6, 1.7, 1.4)  # the second half diverged
    assert _diverged(late, level, 40, cfg)
    last = window(0.38, 0.4, 0.41, 0.39, 0.4, 0.42, 1.3, 1.4)  # the last 2 of 3 diverged
    assert not _diverged(last, level, 40, cfg) and _diverged(last, level, 40, cfg, final=True)
    spike = window(0.38, 0.4, 0.41, 0.39, 0.4, 0.42, 0.4, 9.0)
    assert not _diverged(spike, level, 40, cfg, final=True)
    warm = FitConfig(100, 0.01, 0.0, 0.0, divergence_warmup=50)
    assert not _diverged(window(0.38, 1.5, 1.4, 2.0), level, 40, warm)  # early bounces
    assert _bad_start(window(1.5, 1.4), level, cfg) and not _bad_start(window(0.4, 2), level, cfg)


def test_a_rollback_halves_the_learning_rate(monkeypatch):
    """Without jitter a rollback would replay the same steps into the same divergence."""
    clean, noisy = synthetic(16, 16)
    config = FitConfig(60, 0.01, 0.0, 0.0, seed=0, sync_every=20, divergence_warmup=20)
    rates = blow_up_after_update(monkeypatch, 30)
    result = fit(build_problem("denoise", noisy, reference=clean, params=SMALL), config)
    assert result.rollbacks == 1
    assert rates[0] == pytest.approx(0.01) and rates[-1] == pytest.approx(0.005)


def test_bad_iterations_and_seed_are_refused():
    _, noisy = synthetic(8, 8)
    with pytest.raises(ValueError, match="iterations"):
        restore("denoise", noisy, iterations=-1)
    with pytest.raises(ValueError, match="seed"):
        restore("denoise", noisy, seed="abc")


def test_a_capped_slow_preset_raises_its_learning_rate():
    """50%-pixels inpainting: lr 0.001 over 11,000 steps; capped at 1,500 steps it takes
    0.001 * sqrt(11000 / 1500) = 0.00271 (closed form), unless the user set lr."""
    _, noisy = synthetic(16, 16)
    mask = torch.rand(16, 16, generator=torch.Generator().manual_seed(0)) < 0.5
    job = {"mask": mask.float(), "params": {**SMALL, "variant": "pixels"}}
    capped = plan_restore("inpaint", noisy, iterations=1500, **job).fits[0][1]
    assert capped.lr == pytest.approx(0.001 * (11000 / 1500) ** 0.5)
    assert plan_restore("inpaint", noisy, iterations=11000, **job).fits[0][1].lr == 0.001
    assert plan_restore("inpaint", noisy, iterations=20, **job).fits[0][1].lr == 0.01  # ceiling
    user = {**job, "params": {**job["params"], "lr": 0.002}}
    assert plan_restore("inpaint", noisy, iterations=1500, **user).fits[0][1].lr == 0.002
    assert plan_restore("denoise", noisy, iterations=100, params=SMALL).fits[0][1].lr == 0.01
