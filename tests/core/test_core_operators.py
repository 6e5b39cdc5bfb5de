"""Forward operators and energies: the Lanczos downsampler, masked averaging, features."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from skimage import data as skimage_data

from dip_core.energies import MaskedMeanSquaredError
from dip_core.feature_nets import mobilenet_v2_features
from dip_core.metrics import psnr
from dip_core.operators import Downsampler, FeatureMap, resampling_kernel


def reference_lanczos_kernel(factor: int, support: int) -> np.ndarray:
    """A port of the reference code's ``get_kernel(factor, 'lanczos', phase=0.5,
    kernel_width=2 * support * factor + 1, support)`` (models/downsampler.py): a 2-D kernel of
    2 * support * factor taps per side, evaluated pixel by pixel, normalised as a whole."""
    width = 2 * support * factor + 1
    size, center = width - 1, (width + 1) / 2.0
    kernel = np.zeros((size, size))
    for i in range(1, size + 1):
        for j in range(1, size + 1):
            value = 1.0
            for d in (abs(i + 0.5 - center) / factor, abs(j + 0.5 - center) / factor):
                if d != 0:
                    value *= support * np.sin(np.pi * d) * np.sin(np.pi * d / support)
                    value /= np.pi * np.pi * d * d
            kernel[i - 1, j - 1] = value
    return kernel / kernel.sum()


def reference_downsampler(x: torch.Tensor, factor: int, support: int = 2) -> torch.Tensor:
    """The reference ``Downsampler(..., phase=0.5, preserve_size=True)``: replicate padding
    of (taps - factor) / 2, then a strided convolution with the 2-D kernel per channel."""
    kernel = torch.from_numpy(reference_lanczos_kernel(factor, support)).float()
    pad = (kernel.shape[0] - factor) // 2
    padded = F.pad(x, (pad, pad, pad, pad), mode="replicate")
    weight = kernel.expand(x.shape[1], 1, -1, -1)
    return F.conv2d(padded, weight, stride=factor, groups=x.shape[1])


@pytest.mark.parametrize("factor", [2, 4, 8])
@pytest.mark.parametrize(("kind", "support"), [("lanczos2", 2), ("lanczos3", 3)])
def test_kernel_equals_the_reference_half_phase_kernel(factor, kind, support):
    taps = resampling_kernel(factor, kind)
    ours = (taps[:, None] * taps[None, :]).numpy()
    np.testing.assert_allclose(ours, reference_lanczos_kernel(factor, support), rtol=0, atol=1e-6)


@pytest.mark.parametrize("factor", [2, 4, 8])
def test_matrix_downsampler_equals_the_reference_convolution(factor):
    x = torch.rand(1, 3, 8 * factor, 5 * factor, generator=torch.Generator().manual_seed(0))
    ours = Downsampler(8 * factor, 5 * factor, factor)(x)
    assert ours.shape == (1, 3, 8, 5)
    torch.testing.assert_close(ours, reference_downsampler(x, factor), atol=1e-5, rtol=0)


def natural_image(side: int = 256) -> Image.Image:
    """A photo bundled with scikit-image (no download), scaled to ``side`` px."""
    return Image.fromarray(skimage_data.astronaut()).resize((side, side), Image.LANCZOS)


def as_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, np.float32) / 255).permute(2, 0, 1)[None]


@pytest.mark.parametrize(
    ("kind", "factor", "floor_db"),
    [
        ("lanczos2", 2, 40.0), ("lanczos2", 4, 40.0), ("lanczos2", 8, 38.0),
        # Pillow's LANCZOS is Lanczos-3: the same kernel, so a far closer match.
        ("lanczos3", 2, 47.0), ("lanczos3", 4, 47.0), ("lanczos3", 8, 45.0),
    ],
)  # fmt: skip
def test_downsampler_agrees_with_pillow_lanczos(kind, factor, floor_db):
    """A user's low-resolution photo was made the usual, centred way: the operator must
    reproduce Pillow's LANCZOS downscale, not a copy shifted by (factor - 1) / 2 pixels."""
    hr = natural_image()
    side = hr.width // factor
    pillow = as_tensor(hr.resize((side, side), Image.LANCZOS))
    ours = Downsampler(hr.height, hr.width, factor, kind)(as_tensor(hr)).clamp(0, 1)
    # Pillow rounds to 8 bits, worth ~59 dB alone: the floors leave room for that only.
    assert psnr(ours, pillow).item() >= floor_db


def test_box_downsampler_is_the_mean_of_each_block():
    x = torch.rand(1, 2, 8, 12, generator=torch.Generator().manual_seed(1))
    expected = F.avg_pool2d(x, 4)
    torch.testing.assert_close(Downsampler(8, 12, 4, "box")(x), expected, atol=1e-6, rtol=0)


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
