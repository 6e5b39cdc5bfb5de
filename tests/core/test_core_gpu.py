"""CUDA checks (skipped without a GPU): the engine's switches on the device they are for."""

import pytest
import torch

from dip_core import FitConfig, build_problem, fit
from dip_core.engine import EngineOptions
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
    torch.testing.assert_close(first.energies, second.energies)
    torch.testing.assert_close(first.energies[0], cpu.energies[0], rtol=1e-3, atol=0)


@pytest.mark.parametrize(
    "options",
    [EngineOptions(channels_last=True), EngineOptions(bf16=True), EngineOptions(compile=True)],
)
def test_each_switch_fits_on_cuda(options):
    config = FitConfig(40, 0.01, 0.0, 0.0, seed=1)
    result = fit(_problem(), config, device="cuda", options=options)
    assert result.energies[-1] < result.energies[0]
    assert result.image.dtype == torch.float32


def test_packed_fits_on_cuda():
    items = [FitItem(i, _problem(i), FitConfig(20, 0.01, 0.0, 0.0, seed=i)) for i in range(4)]
    results = dict(fit_many(items, slots=4, device="cuda"))
    assert sorted(results) == [0, 1, 2, 3]
