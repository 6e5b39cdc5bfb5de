"""The skip hourglass: shapes for every configuration, size rules, clear errors."""

import pytest
import torch

from dip_core.networks import SkipLevel, SkipSpec, build_network

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


def level_upsamplers(net) -> list[torch.nn.Upsample]:
    """Each level's own x2 upsampling layer, finest level first."""
    found, level = [], net.body
    while level is not None:
        found.append(level.deeper[-1])
        level = next((m for m in level.deeper if isinstance(m, SkipLevel)), None)
    return found


def test_upsampling_mode_per_level():
    modes = ("nearest", "bilinear", "nearest")
    net = build_network(spec(upsample=list(modes)))
    assert net.spec.upsample == modes
    upsamplers = level_upsamplers(net)
    assert [type(m) for m in upsamplers] == [torch.nn.Upsample] * 3
    outputs = {}
    for level, layer in enumerate(upsamplers):
        layer.register_forward_hook(lambda _m, _i, out, level=level: outputs.update({level: out}))
    assert net(torch.rand(1, 4, 32, 48)).shape == (1, 3, 32, 48)
    for level, mode in enumerate(modes):
        out = outputs[level]
        assert out.shape[-2:] == (32 // 2**level, 48 // 2**level)
        # Nearest repeats every value over a 2x2 block; bilinear interpolates between them.
        blocky = torch.equal(out[..., ::2, ::2], out[..., 1::2, 1::2])
        assert blocky == (mode == "nearest"), (level, mode)


def test_one_upsampling_mode_means_every_level_and_equal_specs_are_equal():
    one = spec(upsample="nearest")
    assert one.upsample == ("nearest",) * 3
    assert one == spec(upsample=("nearest",) * 3) and hash(one) == hash(
        spec(upsample=["nearest"] * 3)
    )
    with pytest.raises(ValueError, match="per-level"):
        spec(upsample=("nearest", "bilinear"))
    with pytest.raises(ValueError, match="upsample"):
        spec(upsample=("nearest", "cubic", "nearest"))


def test_upsample_params_one_mode_a_list_per_level_and_depth_resizes():
    from dip_core import DipInputError, resolve_preset

    flash = ("nearest", "nearest", "bilinear", "bilinear", "bilinear")
    assert resolve_preset("flash_no_flash", None).upsample == flash
    assert resolve_preset("flash_no_flash", {"upsample": "nearest"}).upsample == ("nearest",) * 5
    listed = ["bilinear", "nearest", "nearest", "bilinear", "nearest"]
    assert resolve_preset("denoise", {"upsample": listed}).upsample == tuple(listed)
    assert resolve_preset("flash_no_flash", {"depth": 3}).upsample == flash[:3]
    assert resolve_preset("flash_no_flash", {"depth": 7}).upsample == flash + ("bilinear",) * 2
    three = resolve_preset("denoise", {"channels": [8, 8, 8], "upsample": ["nearest"] * 3})
    assert three.upsample == ("nearest",) * 3
    for bad in (["nearest"] * 4, ["nearest", "bilinear", 3, "nearest", "nearest"], "cubic"):
        with pytest.raises(DipInputError, match=r"params\.upsample"):
            resolve_preset("denoise", {"upsample": bad})
