"""Packing: K fits in one grouped network behave like K separate fits.

Grouped and plain convolutions are different kernels, so even in float64 they may round
differently (BLAS and oneDNN promise no bit-exactness across shapes, thread counts or
alignment): packed and separate networks are compared at 1e-12 relative."""

import pytest
import torch

from dip_core import FitConfig, build_problem, fit
from dip_core.engine import EngineOptions, FlatAdam, PackedNetwork, seeded_network
from dip_core.fit import FitItem, fit_many
from dip_core.networks import Conv, Layout, build_network

torch.set_num_threads(1)
SMALL = {"channels": 8, "depth": 3, "input_depth": 4}
CPU = torch.device("cpu")


def images(n, size=16):
    g = torch.Generator().manual_seed(9)
    return [torch.rand(3, size, size, generator=g) for _ in range(n)]


VARIANTS = {
    "paper": {},
    "avg, zero padding, nearest": {"downsample": "avg", "padding": "zero", "upsample": "nearest"},
    "no skip at one level": {"skip_channels": [4, 0, 4]},
}


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("variant", list(VARIANTS), ids=list(VARIANTS))
def test_packed_outputs_and_gradients_equal_separate_networks_in_float64(variant, channels_last):
    """The reference-exact network (networks.py, checked against the reference code's
    ``skip()``) is the independent side: one per seed, biases included."""
    params = {**SMALL, **VARIANTS[variant]}
    problem = build_problem("denoise", images(1)[0], params=params)
    options = EngineOptions(float64=True, channels_last=channels_last)
    net = PackedNetwork(problem.spec, 3, CPU, options)
    seeds = (3, 4, 5)
    for slot, seed in enumerate(seeds):
        net.load_slot(slot, seed)
    z = torch.rand(3, 1, 4, 16, 16, dtype=torch.float64)
    packed = net(z).double()
    net.zero_grad()
    (packed * torch.linspace(0, 1, 16, dtype=torch.float64)).sum().backward()
    for leaf in net.params.values():  # backward accumulated into the flat buffer
        assert leaf.grad._base is net.flat_grad
    assert net.flat_grad.abs().sum() > 0
    for slot, seed in enumerate(seeds):
        lone = seeded_network(problem.spec, seed).double()
        out = lone(z[slot])
        (out * torch.linspace(0, 1, 16, dtype=torch.float64)).sum().backward()
        torch.testing.assert_close(packed[slot], out, rtol=1e-12, atol=1e-12)
        for name, (leaf, p) in zip(net.params, zip(net.params.values(), lone.parameters(),
                                                   strict=True), strict=True):  # fmt: skip
            # A bias before a BatchNorm is cancelled: its exact gradient is 0, which the
            # packed network (skipping it) gives and the lone one gives up to rounding.
            grad = leaf.grad.unflatten(0, (3, -1))[slot]
            torch.testing.assert_close(grad, p.grad, rtol=1e-10, atol=1e-12,
                                       msg=lambda m, name=name: f"{name}: {m}")  # fmt: skip


def test_a_grouped_network_without_cancelled_biases_computes_the_same():
    """The layout CUDA packs use: three seeds' networks as one grouped network whose convs
    that feed a BatchNorm skip their bias. Same outputs as the reference networks; those
    biases get no gradient; the head's bias still does."""
    spec = build_problem("denoise", images(1)[0], params=SMALL).spec
    lone = [seeded_network(spec, seed).double() for seed in (3, 4, 5)]
    grouped = build_network(spec, Layout(slots=3, skip_cancelled_bias=True)).double()
    with torch.no_grad():
        for name, param in grouped.named_parameters():
            param.copy_(torch.cat([dict(n.named_parameters())[name] for n in lone]))
    z = torch.rand(3, 4, 16, 16, dtype=torch.float64)
    out = grouped(z.reshape(1, 12, 16, 16)).reshape(3, 1, 3, 16, 16)
    for k, net in enumerate(lone):
        torch.testing.assert_close(out[k], net(z[k : k + 1]), rtol=1e-12, atol=1e-12)
    out.sum().backward()
    convs = [m for m in grouped.modules() if isinstance(m, Conv)]
    assert [c.apply_bias for c in convs].count(True) == 1  # the head only
    assert all(c.bias.grad is None for c in convs if not c.apply_bias)
    assert all(c.bias.grad.abs().sum() > 0 for c in convs if c.apply_bias)


def test_channels_last_is_real_in_every_convolution():
    """Every conv of a channels_last engine reads NHWC activations and weights."""
    problem = build_problem("denoise", images(1)[0], params=SMALL)
    net = PackedNetwork(problem.spec, 2, CPU, EngineOptions(channels_last=True))
    seen = []

    def check(module, inputs):
        nhwc = torch.channels_last
        seen.append(inputs[0].is_contiguous(memory_format=nhwc))

    convs = [m for m in net.module.modules() if isinstance(m, torch.nn.Conv2d)]
    handles = [conv.register_forward_pre_hook(check) for conv in convs]
    net(torch.rand(2, 1, 4, 16, 16))
    for handle in handles:
        handle.remove()
    assert len(seen) == len(convs) and all(seen), seen
    weights = [leaf for leaf in net.params.values() if leaf.dim() == 4]
    assert weights and all(w.is_contiguous(memory_format=torch.channels_last) for w in weights)
    assert all(w.grad.is_contiguous(memory_format=torch.channels_last) for w in weights)


def test_flat_adam_matches_torch_adam_per_slot():
    """Two slots, the second started later: each follows torch's Adam from its own start."""
    problem = build_problem("denoise", images(1)[0], params=SMALL)
    net = PackedNetwork(problem.spec, 2, CPU, EngineOptions(float64=True))
    ours = FlatAdam(net)
    lone = [seeded_network(problem.spec, seed).double() for seed in (0, 1)]
    theirs = [torch.optim.Adam(n.parameters(), lr=0.01, foreach=False) for n in lone]
    net.load_slot(0, 0)
    ours.reset_slot(0, lr=0.01)
    z = torch.rand(2, 1, 4, 16, 16, generator=torch.Generator().manual_seed(1)).double()
    for step in range(6):
        if step == 2:  # slot 1 joins: refilled in place with its own step count
            net.load_slot(1, 1)
            ours.reset_slot(1, lr=0.01)
        live = [0] if step < 2 else [0, 1]
        out = net(z)
        net.zero_grad()
        sum(out[k].square().mean() for k in live).backward()
        ours.step()
        for k in live:
            theirs[k].zero_grad()
            lone[k](z[k]).square().mean().backward()
            theirs[k].step()
    for k in (0, 1):
        expected = torch.cat([p.detach().reshape(-1) for p in lone[k].parameters()])
        torch.testing.assert_close(net.slot_weights(k), expected, rtol=1e-9, atol=1e-9)


def test_fit_many_equals_lone_fits_and_refills_slots():
    """In float64 packing changes nothing at all, also across a refilled slot. (In float32,
    grouped and plain convolutions round differently and Adam's normalised steps let that
    grow, so only the first step is compared there.)"""
    exact = EngineOptions(float64=True)
    jobs = []
    for i, (image, steps) in enumerate(zip(images(3), (12, 30, 20), strict=True)):
        problem = build_problem("denoise", image, params=SMALL)
        jobs.append(FitItem(i, problem, FitConfig(steps, 0.01, 0.03, 0.0, seed=i)))
    packed = dict(fit_many(jobs, slots=2, device="cpu", options=exact))
    single = dict(fit_many(jobs, slots=2, device="cpu"))
    assert sorted(packed) == [0, 1, 2]  # job 2 went into the slot job 0 freed
    for i, job in enumerate(jobs):
        problem = build_problem("denoise", images(3)[i], params=SMALL)
        lone = fit(problem, job.config, options=exact)
        assert packed[i].iterations == lone.iterations == job.config.iterations
        torch.testing.assert_close(packed[i].energies, lone.energies, rtol=1e-12, atol=0)
        torch.testing.assert_close(packed[i].image, lone.image, rtol=1e-12, atol=1e-12)
        lone32 = fit(build_problem("denoise", images(3)[i], params=SMALL), job.config)
        torch.testing.assert_close(single[i].energies[0], lone32.energies[0], rtol=1e-5, atol=0)


def test_jobs_of_other_sizes_run_in_their_own_pack():
    small, large = images(1, 16)[0], images(1, 40)[0]
    jobs = [
        FitItem(name, build_problem("denoise", img, params=SMALL), FitConfig(5, 0.01, 0.0, 0.9))
        for name, img in (("a", small), ("b", large), ("c", small))
    ]
    results = dict(fit_many(jobs, slots=4, device="cpu"))
    assert results["b"].image.shape == (3, 40, 40) and results["c"].image.shape == (3, 16, 16)


@pytest.mark.parametrize(
    "options", [EngineOptions(checkpointing=True), EngineOptions(channels_last=True)]
)
def test_memory_and_layout_switches_keep_the_result(options):
    image = images(1)[0]
    config = FitConfig(6, 0.01, 0.0, 0.0, seed=1)
    base = fit(build_problem("denoise", image, params=SMALL), config, options=EngineOptions())
    other = fit(build_problem("denoise", image, params=SMALL), config, options=options)
    torch.testing.assert_close(other.image, base.image, rtol=1e-4, atol=1e-5)


def test_a_compile_mode_with_its_own_cuda_graphs_is_refused_under_the_step_graph():
    with pytest.raises(ValueError, match="reduce-overhead"):
        EngineOptions(cuda_graph=True, compile=True, compile_mode="reduce-overhead")
    EngineOptions(cuda_graph=True, compile=True, compile_mode="max-autotune-no-cudagraphs")
