"""The skip hourglass: shapes for every configuration, size rules, clear errors."""

import pytest
import torch

from dip_core.networks import SkipSpec, build_network

torch.set_num_threads(1)


def spec(**kw) -> SkipSpec:
    base = dict(
        in_channels=4, out_channels=3, channels_down=(8, 8, 8), channels_up=(8, 8, 8),
        channels_skip=(2, 2, 2), kernels_down=(3, 3, 3), kernels_up=(3, 3, 3),
    )  # fmt: skip
    return SkipSpec(**{**base, **kw})


@pytest.mark.parametrize("upsample", ["nearest", "bilinear"])
@pytest.mark.parametrize("downsample", ["stride", "avg"])
@pytest.mark.parametrize("padding", ["reflection", "zero"])
def test_output_shape_matches_input_for_every_mode(upsample, downsample, padding):
    net = build_network(spec(upsample=upsample, downsample=downsample, padding=padding))
    out = net(torch.rand(1, 4, 32, 48))
    assert out.shape == (1, 3, 32, 48)
    assert out.min() >= 0 and out.max() <= 1  # sigmoid head


@pytest.mark.parametrize("out_channels", [1, 3, 5])
def test_any_number_of_output_channels(out_channels):
    assert build_network(spec(out_channels=out_channels))(torch.rand(1, 4, 16, 16)).shape[1] == (
        out_channels
    )


def test_levels_without_skip_and_per_level_kernels():
    net = build_network(spec(channels_skip=(0, 0, 4), kernels_down=(5, 3, 3), kernels_up=(3, 3, 1)))
    assert net(torch.rand(1, 4, 32, 32)).shape == (1, 3, 32, 32)
    assert net.body.skip is None  # level 0 has no skip branch


def test_input_not_a_multiple_of_two_to_the_depth_is_refused():
    with pytest.raises(ValueError, match="multiple of 8"):
        build_network(spec())(torch.rand(1, 4, 20, 16))


def test_mismatched_per_level_settings_are_refused():
    with pytest.raises(ValueError, match="per-level"):
        spec(channels_up=(8, 8))


def test_minimum_side_runs_and_smaller_fails():
    s = spec(kernels_down=(7, 7, 5))
    side = s.minimum_side()
    assert side % 8 == 0
    build_network(s)(torch.rand(1, 4, side, side))
    with pytest.raises((RuntimeError, ValueError)):
        build_network(s)(torch.rand(1, 4, side - 8, side - 8))
