"""PSNR, Y-channel PSNR and SSIM against known values and scikit-image."""

import math

import pytest
import torch

from dip_core.metrics import psnr, psnr_y, rgb_to_y, ssim


def test_psnr_of_known_error():
    x = torch.zeros(3, 8, 8)
    assert psnr(x, x + 0.1).item() == pytest.approx(20.0, abs=1e-6)


def test_psnr_y_ignores_the_border():
    x = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(0))
    y = x.clone()
    y[:, :2, :] = 1 - y[:, :2, :]
    assert math.isinf(psnr_y(x, y, border=2).item()) or psnr_y(x, y, border=2).item() > 150
    assert psnr_y(x, y).item() < 30


def test_y_of_white_and_black():
    assert rgb_to_y(torch.ones(3, 1, 1)).item() == pytest.approx(235 / 255)
    assert rgb_to_y(torch.zeros(3, 1, 1)).item() == pytest.approx(16 / 255)


def test_ssim_matches_scikit_image():
    metrics = pytest.importorskip("skimage.metrics")
    g = torch.Generator().manual_seed(1)
    x = torch.rand(3, 32, 32, generator=g)
    y = (x + 0.1 * torch.randn(3, 32, 32, generator=g)).clamp(0, 1)
    expected = metrics.structural_similarity(
        x.permute(1, 2, 0).numpy(), y.permute(1, 2, 0).numpy(), channel_axis=2,
        gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0,
    )  # fmt: skip
    assert ssim(x, y).item() == pytest.approx(expected, abs=2e-3)
    assert ssim(x, x).item() == pytest.approx(1.0)


def test_metrics_refuse_mismatched_shapes():
    with pytest.raises(ValueError, match="differ in shape"):
        psnr(torch.zeros(3, 4, 4), torch.zeros(3, 4, 5))
