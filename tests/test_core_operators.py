"""Forward operators and energies: the Lanczos downsampler, masked averaging, features."""

import pytest
import torch
import torch.nn.functional as F

from dip_core.energies import MaskedMeanSquaredError
from dip_core.feature_nets import mobilenet_v2_features
from dip_core.operators import Downsampler, FeatureMap, resampling_kernel


def reference_lanczos2_conv(x: torch.Tensor, factor: int) -> torch.Tensor:
    """The reference code's downsampler: a 2-D separable conv, replicate padding, stride."""
    taps = resampling_kernel(factor, "lanczos2").float()
    kernel = (taps[:, None] * taps[None, :]).expand(x.shape[1], 1, -1, -1)
    pad = (len(taps) - 1) // 2
    padded = F.pad(x, (pad, pad, pad, pad), mode="replicate")
    return F.conv2d(padded, kernel, stride=factor, groups=x.shape[1])


@pytest.mark.parametrize("factor", [2, 4, 8])
def test_matrix_downsampler_equals_the_convolution(factor):
    x = torch.rand(1, 3, 8 * factor, 5 * factor, generator=torch.Generator().manual_seed(0))
    ours = Downsampler(8 * factor, 5 * factor, factor)(x)
    assert ours.shape == (1, 3, 8, 5)
    torch.testing.assert_close(ours, reference_lanczos2_conv(x, factor), atol=1e-5, rtol=0)


def test_lanczos2_kernel_has_the_reference_shape():
    taps = resampling_kernel(4, "lanczos2")
    assert len(taps) == 15 and taps.sum().item() == pytest.approx(1.0)
    torch.testing.assert_close(taps, taps.flip(0))  # symmetric


@pytest.mark.parametrize("kind", ["lanczos2", "lanczos3", "box"])
def test_downsampling_a_constant_keeps_it(kind):
    out = Downsampler(16, 24, 4, kind)(torch.full((1, 1, 16, 24), 0.3))
    torch.testing.assert_close(out, torch.full((1, 1, 4, 6), 0.3))


def test_downsampler_refuses_sizes_not_divisible_by_the_factor():
    with pytest.raises(ValueError, match="not a multiple"):
        Downsampler(10, 8, 4)


def test_masked_energy_averages_over_known_pixels_only():
    mask = torch.zeros(4, 4)
    mask[0, 0] = 1  # one known pixel
    x, y = torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 4, 4)
    x[..., 0, 0] = 0.5
    x[..., 3, 3] = 1.0  # an unknown pixel: must not count
    assert MaskedMeanSquaredError(mask)(x, y).item() == pytest.approx(0.25)


def test_feature_map_stays_frozen_and_in_eval_mode():
    phi = FeatureMap(mobilenet_v2_features(None, 4)).train()
    assert not phi.features.training
    assert not any(p.requires_grad for p in phi.parameters())
    x = torch.rand(1, 3, 32, 32, requires_grad=True)
    phi(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
