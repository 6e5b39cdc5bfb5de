"""Every preset builds exactly the network its reference notebook builds.

The expected networks come from an independent port of the reference code's ``skip()``
(models/skip.py and models/common.py of DmitryUlyanov/deep-image-prior, read from the
repository; written here from scratch in plain torch.nn, following its structure) configured
as each notebook configures it. Our networks come from dip_core's presets through
``build_problem``. For each preset: equal parameter counts, equal layer sequences (type and
hyper-parameters) in definition order and in forward order, and equal outputs for equal weights.
"""

import pytest
import torch
from torch import nn

from dip_core import PRESETS, build_problem
from dip_core.networks import build_network

torch.set_num_threads(1)


# --- The port of the reference skip() ---------------------------------------------------------


class PortConcat(nn.Module):
    """The reference's Concat: runs every branch on the same input, centre-crops the results to
    the smallest height/width and concatenates them along channels."""

    def __init__(self, *branches: nn.Module) -> None:
        super().__init__()
        self.branches = nn.ModuleList(branches)

    def forward(self, x):
        outs = [branch(x) for branch in self.branches]
        h = min(o.shape[2] for o in outs)
        w = min(o.shape[3] for o in outs)
        cropped = []
        for o in outs:
            top, left = (o.shape[2] - h) // 2, (o.shape[3] - w) // 2
            cropped.append(o[:, :, top : top + h, left : left + w])
        return torch.cat(cropped, dim=1)


def port_conv(cin, cout, kernel, stride=1, pad="zero", downsample="stride"):
    """common.conv(): [reflection pad] -> conv -> [pooling]. A strided conv in a non-'stride'
    mode becomes a stride-1 conv followed by the pooling; reflection mode always adds its pad
    layer (even a zero-sized one before a 1x1 conv), zero mode pads inside the conv."""
    layers = []
    pool = None
    if stride != 1 and downsample != "stride":
        assert downsample == "avg", downsample  # the only other mode any notebook uses here
        pool, stride = nn.AvgPool2d(stride, stride), 1
    amount = (kernel - 1) // 2
    if pad == "reflection":
        layers.append(nn.ReflectionPad2d(amount))
        amount = 0
    layers.append(nn.Conv2d(cin, cout, kernel, stride, padding=amount, bias=True))
    if pool is not None:
        layers.append(pool)
    return nn.Sequential(*layers)


def _per_level(value, n):
    return list(value) if isinstance(value, (list, tuple)) else [value] * n


def port_skip(
    cin, cout, down, up, skip, k_down=3, k_up=3, k_skip=1, sigmoid=True, pad="zero",
    upsample="nearest", downsample="stride", need1x1_up=True,
):  # fmt: skip
    """skip() with its defaults (pad zero, nearest, stride, 1x1 skip, need1x1_up, LeakyReLU 0.2).

    Level i lives in a container: either Concat(skip branch, deep branch) or the deep branch
    alone, followed by BN(concat) -> k_up conv -> BN -> act [-> 1x1 conv -> BN -> act]. The deep
    branch is: downsampling conv -> BN -> act -> conv -> BN -> act -> [level i+1] -> upsample.
    """
    n = len(down)
    upsample, downsample = _per_level(upsample, n), _per_level(downsample, n)
    k_down, k_up = _per_level(k_down, n), _per_level(k_up, n)
    model = nn.Sequential()
    container = model
    depth_in = cin
    for i in range(n):
        deep, side = nn.Sequential(), nn.Sequential()
        container.append(PortConcat(side, deep) if skip[i] else deep)
        below = up[i + 1] if i < n - 1 else down[i]  # the deepest level upsamples its own output
        container.append(nn.BatchNorm2d(skip[i] + below))
        if skip[i]:
            side.append(port_conv(depth_in, skip[i], k_skip, pad=pad))
            side.append(nn.BatchNorm2d(skip[i]))
            side.append(nn.LeakyReLU(0.2, inplace=True))
        deep.append(port_conv(depth_in, down[i], k_down[i], 2, pad, downsample[i]))
        deep.append(nn.BatchNorm2d(down[i]))
        deep.append(nn.LeakyReLU(0.2, inplace=True))
        deep.append(port_conv(down[i], down[i], k_down[i], pad=pad))
        deep.append(nn.BatchNorm2d(down[i]))
        deep.append(nn.LeakyReLU(0.2, inplace=True))
        inner = nn.Sequential()
        if i < n - 1:
            deep.append(inner)
        deep.append(nn.Upsample(scale_factor=2, mode=upsample[i]))
        container.append(port_conv(skip[i] + below, up[i], k_up[i], pad=pad))
        container.append(nn.BatchNorm2d(up[i]))
        container.append(nn.LeakyReLU(0.2, inplace=True))
        if need1x1_up:
            container.append(port_conv(up[i], up[i], 1, pad=pad))
            container.append(nn.BatchNorm2d(up[i]))
            container.append(nn.LeakyReLU(0.2, inplace=True))
        depth_in = down[i]
        container = inner
    model.append(port_conv(up[0], cout, 1, pad=pad))
    if sigmoid:
        model.append(nn.Sigmoid())
    return model


def port_get_net(input_depth, pad, upsample, n_channels=3, d=128, u=128, s=4, scales=5):
    """models.get_net(..., 'skip', ...): skip() with widths repeated per level, default kernels
    (3, 3, skip 1), need1x1_up on, stride downsampling, sigmoid and bias on."""
    return port_skip(
        input_depth, n_channels, [d] * scales, [u] * scales, [s] * scales, pad=pad,
        upsample=upsample,
    )  # fmt: skip


# --- Each notebook's network, and how our preset is reached ------------------------------------
# name: (how to call build_problem, the reference network as the notebook builds it)

DENOISE_NET = dict(input_depth=32, pad="reflection", upsample="bilinear")  # get_net(...)
REFERENCE = {
    # denoising.ipynb, F16: get_net(32, 'skip', 'reflection', 128, 128, 4, 5 scales, bilinear)
    "denoise": (dict(task="denoise"), lambda: port_get_net(**DENOISE_NET)),
    # Not in the paper: deblurring takes the denoising network.
    "deblur": (
        dict(task="deblur", params={"blur_sigma": 1.0}),
        lambda: port_get_net(**DENOISE_NET),
    ),
    # denoising.ipynb, snail (JPEG): skip(3, 3, [8..128], [8..128], [0,0,0,4,4], bilinear)
    "jpeg": (
        dict(task="jpeg"),
        lambda: port_skip(
            3,
            3,
            [8, 16, 32, 64, 128],
            [8, 16, 32, 64, 128],
            [0, 0, 0, 4, 4],
            upsample="bilinear",
            pad="reflection",
        ),
    ),
    # super-resolution.ipynb: the denoising get_net for factor 4 and 8 (x2 takes x4's settings)
    "super_resolution_x2": (
        dict(task="super_resolution", scale=2),
        lambda: port_get_net(**DENOISE_NET),
    ),
    "super_resolution_x4": (
        dict(task="super_resolution", scale=4),
        lambda: port_get_net(**DENOISE_NET),
    ),
    "super_resolution_x8": (
        dict(task="super_resolution", scale=8),
        lambda: port_get_net(**DENOISE_NET),
    ),
    # inpainting.ipynb, kate: skip(32, 3, [128]*5, [128]*5, [128]*5, k 3/3/1, nearest)
    "inpaint_text": (
        dict(task="inpaint", params={"variant": "text"}),
        lambda: port_skip(
            32, 3, [128] * 5, [128] * 5, [128] * 5, upsample="nearest", pad="reflection"
        ),
    ),
    # inpainting.ipynb, vase: meshgrid (2 ch), skip(2, 3, [128]*5, [128]*5, [0]*5, nearest)
    "inpaint_region": (
        dict(task="inpaint", params={"variant": "region"}),
        lambda: port_skip(
            2, 3, [128] * 5, [128] * 5, [0] * 5, upsample="nearest", pad="reflection"
        ),
    ),
    # inpainting.ipynb, library with NET_TYPE 'skip_depth6': 1 input channel, no skip,
    # k_down 5, k_up 3, nearest, need1x1_up=False
    "inpaint_large_hole": (
        dict(task="inpaint", params={"variant": "large_hole"}),
        lambda: port_skip(
            1,
            3,
            [16, 32, 64, 128, 128, 128],
            [16, 32, 64, 128, 128, 128],
            [0] * 6,
            k_down=5,
            k_up=3,
            upsample="nearest",
            pad="reflection",
            need1x1_up=False,
        ),
    ),
    # restoration.ipynb, barbara (grey): get_net(32, 'skip', 'reflection', n_channels=1, ...)
    "inpaint_pixels": (
        dict(task="inpaint", params={"variant": "pixels"}, channels=1),
        lambda: port_get_net(**DENOISE_NET, n_channels=1),
    ),
    # flash-no-flash.ipynb: the flash image (3 ch) in, skip 4, per-level upsampling
    "flash_no_flash": (
        dict(task="flash_no_flash"),
        lambda: port_skip(
            3,
            3,
            [128] * 5,
            [128] * 5,
            [4] * 5,
            pad="reflection",
            upsample=["nearest", "nearest", "bilinear", "bilinear", "bilinear"],
        ),
    ),
    # feature_inversion.ipynb (first network): 32 noise channels, zero padding, avg downsampling
    "preimage": (
        dict(task="preimage"),
        lambda: port_skip(
            32,
            3,
            [16, 32, 64, 128, 128, 128],
            [16, 32, 64, 128, 128, 128],
            [4] * 6,
            k_down=[7, 7, 5, 5, 3, 3],
            k_up=[7, 7, 5, 5, 3, 3],
            upsample="nearest",
            downsample="avg",
            pad="zero",
        ),
    ),
}


def test_every_preset_has_a_reference_network():
    assert sorted(REFERENCE) == sorted(PRESETS)


def our_spec(name):
    how = dict(REFERENCE[name][0])
    channels = how.pop("channels", 3)
    observation = torch.rand(channels, 16, 16)
    if how["task"] == "inpaint":
        how["mask"] = torch.ones(16, 16)
    if how["task"] == "flash_no_flash":
        how["guide"] = torch.rand(3, 16, 16)
    if how["task"] == "preimage":
        how["feature_net"] = nn.Identity()
    return build_problem(observation=observation, **how).spec


# --- Comparison --------------------------------------------------------------------------------


def signature(module):
    """A layer's type and the hyper-parameters that define its computation; None for layers that
    compute nothing (empty containers; the zero-sized reflection pad the reference puts before
    every 1x1 conv, an identity that dip_core leaves out)."""
    if isinstance(module, nn.Conv2d):
        return (
            "conv", module.in_channels, module.out_channels, module.kernel_size, module.stride,
            module.padding, module.dilation, module.groups, module.bias is not None,
        )  # fmt: skip
    if isinstance(module, nn.BatchNorm2d):
        # track_running_stats differs on purpose (dip_core keeps none: it never uses them): in
        # train mode, which DIP never leaves, both normalise by the current batch.
        return ("bn", module.num_features, module.eps, module.affine)
    if isinstance(module, nn.LeakyReLU):
        return ("leaky_relu", module.negative_slope)
    if isinstance(module, nn.Upsample):
        return ("upsample", module.mode, float(module.scale_factor), module.align_corners)
    if isinstance(module, nn.AvgPool2d):
        return ("avgpool", module.kernel_size, module.stride, module.padding)
    if isinstance(module, nn.ReflectionPad2d):
        return None if not any(module.padding) else ("reflection_pad", module.padding)
    if isinstance(module, nn.Sigmoid):
        return ("sigmoid",)
    if isinstance(module, (nn.Sequential, nn.ModuleList)):
        return None  # an empty container (the reference adds some)
    raise AssertionError(f"no signature for {type(module).__name__}: extend the comparison")


def leaves(net):
    return [m for m in net.modules() if not list(m.children())]


def definition_order(net):
    return [s for s in map(signature, leaves(net)) if s is not None]


def forward_order(net, x):
    """Layer signatures in the order the layers run, and the output."""
    calls = []
    hooks = [
        m.register_forward_hook(lambda mod, _i, _o: calls.append(signature(mod)))
        for m in leaves(net)
    ]
    try:
        out = net(x)
    finally:
        for hook in hooks:
            hook.remove()
    return [s for s in calls if s is not None], out


def parameter_count(net):
    return sum(p.numel() for p in net.parameters())


# Both networks nest the levels the same way (skip branch, deep branch with the next level
# inside, then the merge), so their definition orders and forward orders are directly
# comparable, layer for layer: no per-level multiset comparison is needed.


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_preset_builds_the_reference_network(name):
    spec = our_spec(name)
    ours, reference = build_network(spec), REFERENCE[name][1]()
    assert parameter_count(ours) == parameter_count(reference)
    assert definition_order(ours) == definition_order(reference)

    # Same weights (both define their parameters in the same order) -> same output, through
    # the same sequence of layer calls, on the smallest input the network accepts.
    theirs = list(reference.parameters())
    mine = list(ours.parameters())
    assert [p.shape for p in mine] == [p.shape for p in theirs]
    with torch.no_grad():
        for a, b in zip(mine, theirs, strict=True):
            a.copy_(b)
    side = spec.minimum_side()
    z = torch.rand(1, spec.in_channels, side, side, generator=torch.Generator().manual_seed(0))
    ours.train(), reference.train()
    with torch.no_grad():
        our_calls, our_out = forward_order(ours, z)
        their_calls, their_out = forward_order(reference, z)
    assert our_calls == their_calls
    torch.testing.assert_close(our_out, their_out, rtol=1e-5, atol=1e-6)


# Literal counts as a second check. Obtained by running port_skip above with the notebooks'
# settings (sum of p.numel()); the large hole count was also computed by hand: per level
# (cin -> c, below = the next level's c, or c at the deepest; no skip, no 1x1 conv):
#   5x5 conv (25*cin*c + c) + BN (2c) + 5x5 conv (25*c*c + c) + BN (2c) + BN of the upsampled
#   (2*below) + 3x3 conv (9*below*c + c) + BN (2c); plus the head 16*3 + 3.
# reference-method.md rounds the denoising net to 2.2 M and the text inpainting net to 3.0 M.
LITERAL_COUNTS = {
    "denoise": 2_217_831,
    "inpaint_large_hole": 2_996_467,
    "inpaint_text": 3_002_627,
}


@pytest.mark.parametrize(("name", "count"), sorted(LITERAL_COUNTS.items()))
def test_literal_parameter_counts(name, count):
    assert parameter_count(build_network(our_spec(name))) == count
