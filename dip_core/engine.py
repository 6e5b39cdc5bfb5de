"""K networks of one architecture as one: packed weights and a vectorised Adam.

With batch 1 in train mode, BatchNorm normalises each image by its own statistics, so K
independent fits can share one forward pass through one grouped network (networks.py with
``slots=K``): every conv a grouped conv, one BatchNorm over all K slots' channels, on a
``(1, K*C, H, W)`` tensor (channels_last where the options say so), while each slot keeps
its own weights, statistics and optimiser state. All weights live in one flat buffer, so
Adam is a handful of kernels per step whatever the number of layers (a for-loop Adam costs
~1,000 launches per step), and each slot has its own step count, so a finished slot is
refilled in place with a fresh network.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import nn

from .networks import Layout, SkipSpec, build_network


@dataclass(frozen=True)
class EngineOptions:
    """Speed switches; each can be turned off so the speed benchmark can show its effect."""

    bf16: bool = False  # autocast convolutions to bfloat16 (CUDA); energies stay float32
    channels_last: bool = False  # NHWC activations and conv weights
    compile: bool = False  # torch.compile the network's forward (and Adam)
    compile_mode: str | None = None  # torch.compile's mode, e.g. "max-autotune-no-cudagraphs"
    checkpointing: bool = False  # recompute activations in backward: large images fit memory
    float64: bool = False  # double precision weights (equivalence tests, debugging)
    # One static step (forward, backward, flat Adam, trace write with a device-side step
    # index) captured whole in one CUDA graph; on a CPU the same static step runs eagerly.
    cuda_graph: bool = False

    def __post_init__(self) -> None:
        # These compile modes capture CUDA graphs of their own: not inside the step's graph.
        if self.cuda_graph and self.compile_mode in ("reduce-overhead", "max-autotune"):
            raise ValueError(f"cuda_graph=True cannot be combined with compile_mode "
                             f"{self.compile_mode!r} (try max-autotune-no-cudagraphs)")  # fmt: skip

    @classmethod
    def fastest_for(cls, device: torch.device) -> EngineOptions:
        """The defaults: switches that keep results and help on this kind of device.

        bf16, compile and the whole-step graph stay opt-in until a GPU run of
        benchmarks/gpu_checks.sh shows they pay and keep quality within 0.1 dB;
        channels_last helps tensor cores on CUDA only.
        """
        return cls(channels_last=device.type == "cuda")


def seeded_network(spec: SkipSpec, seed: int) -> nn.Module:
    """The network a fit with this seed starts from, built on the CPU so the same seed gives
    the same weights on every device."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_network(spec)


class PackedNetwork:
    """K slots of one SkipSpec, their weights in one flat buffer.

    The buffer is parameter-major: parameter i of every slot forms one contiguous (K, ...)
    block, which is exactly the grouped layer's parameter (K*out, in, kh, kw). The grouped
    module's parameters ARE these blocks (leaf tensors sharing the buffer's memory), and each
    one's ``.grad`` is a view of one flat gradient buffer, so the module runs as it is (no
    parameter swapping per call), backward accumulates in place, and the optimiser works on
    two flat tensors. With channels_last, conv weights are kept (out, kh, kw, in) in the
    buffer, the layout NHWC convolutions read.
    """

    def __init__(self, spec: SkipSpec, slots: int, device: torch.device, options: EngineOptions):
        self.spec, self.slots, self.device, self.options = spec, slots, device, options
        template = build_network(spec)
        self.names = [name for name, _ in template.named_parameters()]
        self.shapes = [p.shape for _, p in template.named_parameters()]
        self.sizes = [math.prod(s) for s in self.shapes]
        self.dtype = torch.float64 if options.float64 else torch.float32
        total = slots * sum(self.sizes)
        self.flat = torch.zeros(total, device=device, dtype=self.dtype)
        self.flat_grad = torch.zeros_like(self.flat)
        # A bias that BatchNorm cancels costs cuDNN a reduction per conv in backward; on a
        # CPU it stays, since oneDNN's backward without one ran 2x slower at 2 threads (128 px,
        # 32 channels: 8.05 against 4.01 ms, torch 2.13).
        layout = Layout(slots=slots, skip_cancelled_bias=device.type == "cuda")
        self.module = build_network(spec, layout).to(device, self.dtype)
        self.params: dict[str, nn.Parameter] = {}
        offset = 0
        for name, shape, size in zip(self.names, self.shapes, self.sizes, strict=True):
            block = slice(offset, offset + slots * size)
            leaf = nn.Parameter(self._block_view(self.flat[block], shape))  # shares memory
            leaf.grad = self._block_view(self.flat_grad[block], shape)
            owner, _, attr = name.rpartition(".")
            self.module.get_submodule(owner).register_parameter(attr, leaf)
            self.params[name] = leaf
            offset += slots * size
        if device.type == "cuda":
            # One image size per pack: let cuDNN time its kernels once per shape and keep the
            # fastest. Process-wide, as the reference code sets it; results then match to
            # rounding, not bit for bit (README "What differs from the reference code").
            torch.backends.cudnn.benchmark = True
        # Static shapes: a pack holds one padded size, so each size compiles once (dynamic
        # shapes failed to compile after a size change, and CUDA graphs need static ones).
        self._forward = torch.compile(self._call, mode=options.compile_mode, dynamic=False) if (
            options.compile
        ) else self._call  # fmt: skip

    def _block_view(self, block: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """One parameter's block of the flat buffer as the grouped layer's (K*out, ...)."""
        rows = self.slots * shape[0]
        if self.options.channels_last and len(shape) == 4:  # a conv weight, kept NHWC
            _, cin, kh, kw = shape
            return block.view(rows, kh, kw, cin).permute(0, 3, 1, 2)
        return block.view(rows, *shape[1:])

    def slot_views(self, slot: int) -> list[torch.Tensor]:
        """Slot ``slot``'s parameters, as views into the flat buffer."""
        return [leaf.detach().unflatten(0, (self.slots, -1))[slot] for leaf in self.params.values()]

    def slot_weights(self, slot: int) -> torch.Tensor:
        return torch.cat([view.reshape(-1) for view in self.slot_views(slot)])

    @torch.no_grad()
    def set_slot_weights(self, slot: int, weights: torch.Tensor) -> None:
        offset = 0
        for view, size in zip(self.slot_views(slot), self.sizes, strict=True):
            view.copy_(weights[offset : offset + size].view(view.shape))
            offset += size

    def load_slot(self, slot: int, seed: int) -> None:
        weights = torch.cat(
            [p.detach().reshape(-1) for p in seeded_network(self.spec, seed).parameters()]
        )
        self.set_slot_weights(slot, weights.to(self.device, self.dtype))

    def zero_grad(self) -> None:
        self.flat_grad.zero_()

    def _call(self, z: torch.Tensor) -> torch.Tensor:
        if self.options.checkpointing:
            # The network draws no random numbers, and reading the CUDA RNG state is not
            # allowed while a step graph is captured.
            return torch.utils.checkpoint.checkpoint(
                self.module, z, use_reentrant=False, preserve_rng_state=False
            )
        return self.module(z)

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        """(K, 1, C, H, W) inputs -> (K, 1, C_out, H, W) outputs."""
        k, _, c, h, w = z.shape
        z = z.to(self.dtype).reshape(1, k * c, h, w)
        if self.options.channels_last:
            z = z.contiguous(memory_format=torch.channels_last)
        # No cast cache: each weight is used once per step, and a CUDA graph cannot keep one.
        with torch.autocast(self.device.type, torch.bfloat16, enabled=self.options.bf16,
                            cache_enabled=False):  # fmt: skip
            out = self._forward(z)
        out = out.float() if out.dtype == torch.bfloat16 else out
        return out.reshape(k, 1, -1, h, w)


class FlatAdam:
    """Adam over a packed network's flat buffer, with per-slot learning rates and steps.

    The arithmetic follows torch.optim.Adam (lerp for the first moment, bias corrections,
    ``param -= lr / bc1 * m / (sqrt(v) / sqrt(bc2) + eps)``); per-slot factors are spread
    over the parameter-major buffer with one ``repeat_interleave``.
    """

    def __init__(self, net: PackedNetwork, betas=(0.9, 0.999), eps: float = 1e-8) -> None:
        self.net, (self.beta1, self.beta2), self.eps = net, betas, eps
        self.flat, self.grad = net.flat, net.flat_grad
        self.m = torch.zeros_like(self.flat)
        self.v = torch.zeros_like(self.flat)
        k, device = net.slots, self.flat.device
        self.steps = torch.zeros(k, device=device, dtype=self.flat.dtype)
        self.lr = torch.zeros(k, device=device, dtype=self.flat.dtype)
        self.active = torch.zeros(k, device=device, dtype=self.flat.dtype)
        self.repeats = torch.tensor(net.sizes, device=device).repeat_interleave(k)
        self.blocks = len(net.sizes)
        # With compile, Inductor fuses the update's elementwise ops (eagerly, one pass over
        # the flat buffers each).
        self._run_update = torch.compile(self._update, dynamic=False) if (
            net.options.compile
        ) else self._update  # fmt: skip

    def _per_element(self, per_slot: torch.Tensor) -> torch.Tensor:
        return torch.repeat_interleave(
            per_slot.repeat(self.blocks), self.repeats, output_size=self.flat.numel()
        )

    def _slot_views(self, tensor: torch.Tensor, slot: int) -> list[torch.Tensor]:
        """Slot ``slot``'s part of each block of a flat tensor, in memory order (a conv
        weight kept channels_last reads (out, kh, kw, in), unlike PackedNetwork.slot_views):
        ``state`` and ``load_state`` use it both ways, so the order never leaks."""
        views, offset, k = [], 0, self.net.slots
        for size in self.net.sizes:
            views.append(tensor[offset : offset + k * size].view(k, size)[slot])
            offset += k * size
        return views

    def reset_slot(self, slot: int, lr: float) -> None:
        for view in self._slot_views(self.m, slot) + self._slot_views(self.v, slot):
            view.zero_()
        self.steps[slot] = 0
        self.lr[slot] = lr
        self.active[slot] = 1

    def release_slot(self, slot: int) -> None:
        self.active[slot] = 0

    def step(self) -> None:
        self._run_update()

    @torch.no_grad()
    def _update(self) -> None:
        self.steps += self.active
        steps = self.steps.clamp_min(1)
        step_size = self._per_element(self.lr / (1 - self.beta1**steps) * self.active)
        bc2_sqrt = self._per_element((1 - self.beta2**steps).sqrt())
        self.m.lerp_(self.grad, 1 - self.beta1)
        self.v.mul_(self.beta2).addcmul_(self.grad, self.grad, value=1 - self.beta2)
        denom = (self.v.sqrt() / bc2_sqrt).add_(self.eps)
        self.flat.sub_(step_size * (self.m / denom))

    def state(self, slot: int) -> tuple[torch.Tensor, ...]:
        m = torch.cat(self._slot_views(self.m, slot))
        v = torch.cat(self._slot_views(self.v, slot))
        return (m, v, self.steps[slot].clone())

    def load_state(self, slot: int, state: tuple[torch.Tensor, ...]) -> None:
        for tensor, saved in ((self.m, state[0]), (self.v, state[1])):
            offset = 0
            for view in self._slot_views(tensor, slot):
                view.copy_(saved[offset : offset + view.numel()])
                offset += view.numel()
        self.steps[slot] = state[2]


def activation_bytes(spec: SkipSpec, height: int, width: int, bytes_per_value: int = 4) -> int:
    """A rough upper estimate of one fit's training memory at a padded size: every layer's
    output kept for backward (conv, BN, activation, padding copies) plus its gradient."""
    values = 0
    for level in range(spec.depth):
        here = height * width // 4**level
        below = here // 4
        up_in = spec.channels_up[level + 1] if level + 1 < spec.depth else spec.channels_down[level]
        values += below * spec.channels_down[level] * 2 * 4  # two convs: pad, conv, BN, act
        if spec.downsample == "avg":  # the first conv runs at full size, then is pooled
            values += here * spec.channels_down[level]
        values += here * spec.channels_skip[level] * 4
        values += here * up_in * 2  # upsampled, and its normalised concat share
        up_convs = 2 if spec.need_1x1_up else 1  # the k_up conv (and the 1x1 conv)
        values += here * spec.channels_up[level] * up_convs * 4
    return 2 * values * bytes_per_value  # activations + their gradients


def fit_bytes(spec: SkipSpec, height: int, width: int) -> int:
    """A rough upper estimate of one fit's memory at a padded size: its activations
    (``activation_bytes``) plus its weights, their gradient and two Adam moments. The one
    estimate packing (``slots_that_fit``) and tiling (tiling.py) both use."""
    return activation_bytes(spec, height, width) + 16 * weight_count(spec)


@functools.lru_cache(maxsize=64)
def weight_count(spec: SkipSpec) -> int:
    """The number of weights of a network of this spec (built once per spec)."""
    return sum(p.numel() for p in build_network(spec).parameters())


def slots_that_fit(spec: SkipSpec, height: int, width: int, free_bytes: int, limit: int) -> int:
    """How many packed fits of this bucket fit in ``free_bytes`` (keeping 30% spare)."""
    per_fit = fit_bytes(spec, height, width)
    return max(1, min(limit, int(0.7 * free_bytes // max(per_fit, 1))))
