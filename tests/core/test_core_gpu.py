"""CUDA checks (skipped without a GPU): the engine's switches on the device they are for."""

import pytest
import torch

from benchmarks import gpu_correctness
from dip_core import FitConfig, build_problem, fit
from dip_core.fit import FitItem, fit_many

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


@pytest.mark.parametrize("switch", list(gpu_correctness.SWITCHES))
def test_each_switch_fits_on_cuda(switch):
    gpu_correctness.switch_fits(torch.device("cuda"), switch)


def test_packed_fits_on_cuda():
    items = [FitItem(i, _problem(i), FitConfig(20, 0.01, 0.0, 0.0, seed=i)) for i in range(4)]
    results = dict(fit_many(items, slots=4, device="cuda"))
    assert sorted(results) == [0, 1, 2, 3]


def test_no_step_syncs_the_stream():
    """Between sync points a step never waits for the device (CUDA's own detector)."""
    gpu_correctness.no_step_syncs(torch.device("cuda"))


def test_the_whole_step_graph_replays_the_eager_step():
    gpu_correctness.graph_matches_eager(torch.device("cuda"))
