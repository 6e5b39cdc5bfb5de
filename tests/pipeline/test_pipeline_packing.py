"""PackedFitService: fits submitted from several threads share one pack, results in order."""

from __future__ import annotations

import threading

import torch

from dip_core import FitConfig, build_problem, fit
from dip_core.fit import FitItem
from pipeline.packing import PackedFitService, PackingConfig

torch.set_num_threads(1)
SMALL = {"channels": 8, "depth": 3, "input_depth": 4}


def _item(seed: int, steps: int, size: int = 16) -> FitItem:
    image = torch.rand(3, size, size, generator=torch.Generator().manual_seed(seed))
    problem = build_problem("denoise", image, params=SMALL)
    return FitItem(None, problem, FitConfig(steps, 0.01, 0.0, 0.0, seed=seed, sync_every=5))


def test_threads_share_one_pack_and_each_gets_its_own_results():
    service = PackedFitService(PackingConfig(lanes=3, device="cpu"))
    widest, results = [0], {}

    def watch(_progress) -> None:
        pack = service.runner.pack
        widest[0] = max(widest[0], len(pack.active) if pack else 0)

    def lane(seed: int, steps: int, size: int) -> None:
        item = _item(seed, steps, size)
        item.callbacks = [watch]
        results[seed] = service.run([item])[0]

    jobs = [(1, 30, 16), (2, 20, 16), (3, 25, 16), (4, 10, 24)]  # the 24 px job: a new pack
    threads = [threading.Thread(target=lane, args=job) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert widest[0] >= 2, "fits from different threads never ran in the same pack"
    for seed, steps, size in jobs:
        assert results[seed].iterations == steps and results[seed].image.shape == (3, size, size)
        lone = fit(_item(seed, steps, size).problem, _item(seed, steps, size).config)
        torch.testing.assert_close(results[seed].energies[0], lone.energies[0], rtol=1e-5, atol=0)


def test_a_failing_item_fails_alone():
    service = PackedFitService(PackingConfig(lanes=2, device="cpu"))
    bad = _item(1, 5)
    bad.problem.data = bad.problem.data[..., :4]  # breaks its energy: shapes no longer match
    errors = []

    def run_bad() -> None:
        try:
            service.run([bad])
        except RuntimeError as error:
            errors.append(error)

    thread = threading.Thread(target=run_bad)
    thread.start()
    thread.join(timeout=60)
    assert errors, "the broken fit should raise in its caller"
    assert service.run([_item(2, 5)])[0].iterations == 5  # the service keeps working


def test_occupancy_counts_fits_and_slots_per_step():
    service = PackedFitService(PackingConfig(lanes=2, device="cpu"))
    assert service.stats() == {"steps": 0, "fit_steps": 0, "slot_steps": 0, "lanes": 2}
    assert service.run([_item(1, 12)])[0].iterations == 12  # alone: half the pack
    stats = service.stats()
    assert stats["steps"] == 12 and stats["fit_steps"] == 12 and stats["slot_steps"] == 24
    service.run([_item(2, 10), _item(3, 10)])  # together: a full pack
    stats = service.stats()
    assert stats["steps"] == 22 and stats["fit_steps"] == 32 and stats["slot_steps"] == 44
