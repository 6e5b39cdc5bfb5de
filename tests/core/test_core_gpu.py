"""CUDA checks (skipped without a GPU): the engine's switches on the device they are for."""

import pytest
import torch

from dip_core import FitConfig, build_problem, fit
from dip_core.engine import EngineOptions
from dip_core.fit import FitItem, PackedRunner, fit_many

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]
SMALL = {"channels": 16, "depth": 3, "input_depth": 8}


def _problem(seed=0, size=32):
    clean = torch.rand(3, size, size, generator=torch.Generator().manual_seed(seed))
    return build_problem("denoise", clean, reference=clean, params=SMALL)


def test_cuda_fit_is_reproducible_and_close_to_the_cpu_start():
    config = FitConfig(30, 0.01, 0.03, 0.99, seed=3)
    first = fit(_problem(), config, device="cuda")
    second = fit(_problem(), config, device="cuda")
    cpu = fit(_problem(), config, device="cpu")
    assert first.device.startswith("cuda")
    # cuDNN picks its fastest kernels (cudnn.benchmark), some of which sum in no fixed
    # order: the same seed gives the same fit up to rounding.
    torch.testing.assert_close(first.energies, second.energies, rtol=1e-3, atol=1e-6)
    torch.testing.assert_close(first.energies[0], cpu.energies[0], rtol=1e-3, atol=0)


@pytest.mark.parametrize(
    "options",
    [
        EngineOptions(channels_last=True),
        EngineOptions(bf16=True),
        EngineOptions(compile=True),
        EngineOptions(cuda_graph=True),
        EngineOptions(bf16=True, channels_last=True, cuda_graph=True),
    ],
)
def test_each_switch_fits_on_cuda(options):
    config = FitConfig(40, 0.01, 0.03, 0.0, seed=1)  # jittered: the graph draws noise too
    result = fit(_problem(), config, device="cuda", options=options)
    assert result.energies[-1] < result.energies[0]
    assert result.image.dtype == torch.float32


def test_packed_fits_on_cuda():
    items = [FitItem(i, _problem(i), FitConfig(20, 0.01, 0.0, 0.0, seed=i)) for i in range(4)]
    results = dict(fit_many(items, slots=4, device="cuda"))
    assert sorted(results) == [0, 1, 2, 3]


def test_no_step_syncs_the_stream():
    """Between sync points a step must never wait for the device (CUDA's own detector)."""
    config = FitConfig(30, 0.01, 0.03, 0.99, sync_every=30)
    runner = PackedRunner(2, "cuda")
    for seed in (0, 1):
        runner.offer(FitItem(seed, _problem(seed), config))
    runner.step()  # first step: lazy set-up (cuDNN, allocator) may sync once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(27):
            runner.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len(runner.step() + runner.step()) == 2


def test_the_whole_step_graph_replays_the_eager_step():
    """Two fits, one refilled mid-way (a new capture): the graph's trace follows the eager
    one's, and steps were captured (not silently run eagerly). No input jitter here, so the
    two runs see the same numbers; the jittered graph is in test_each_switch_fits_on_cuda."""
    items = [FitItem(i, _problem(i), FitConfig(n, 0.01, 0.0, 0.99, seed=i, sync_every=10))
             for i, n in enumerate((40, 20, 30))]  # fmt: skip
    eager = dict(fit_many(items, slots=2, device="cuda"))
    items = [FitItem(i, _problem(i), item.config) for i, item in enumerate(items)]
    runner = PackedRunner(2, "cuda", EngineOptions(cuda_graph=True))
    graphed, queue = {}, list(items)
    while queue or runner.busy:
        while queue:
            taken, done = runner.offer(queue[0])
            graphed.update(done)
            if not taken:
                break
            queue.pop(0)
        graphed.update(runner.step())
    assert runner.pack is not None and runner.pack.graph is not None
    assert runner.pack.graph.captures >= 2
    for i in range(3):
        torch.testing.assert_close(graphed[i].energies, eager[i].energies, rtol=1e-3, atol=1e-6)
