"""The level-0 merge convolution alone: which packing layout the engine should use.

Half the FLOPs of the paper's denoising network at 512 px are one layer: level 0's merge
conv, 3x3, 132 input channels (4 skip + 128 upsampled) to 128. The network pads its input
by reflection and then convolves with padding 0, so this takes a (H+2, W+2) input and
``padding=0``, as the network does; there is no bias (the BatchNorm after it cancels one).
Each case times the three passes of a training step separately: forward, the gradient of
the input (dgrad) and the gradient of the weight (wgrad), through the same aten kernels
autograd calls. Cases: packing (one dense conv for K=1; one grouped conv for K=4 fits on
(1, 4*C, H, W); 4 dense convs one after another), layout (NCHW / NHWC), precision (fp32,
on TF32 tensor cores where cuDNN allows it, which is torch's default; bf16) and 132 input
channels against 136 (a multiple of 8, zero-padded). Timed with CUDA events on a GPU,
with perf_counter and a sync on the CPU; cuDNN's autotuner is on, as in the engine.

    PYTHONPATH=. python -m benchmarks.conv_micro                      # GPU, 512 px
    PYTHONPATH=. python -m benchmarks.conv_micro --size 32 --channels 16 --iters 3  # CPU
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

PACKINGS = ("dense K=1", "grouped K=4", "4 x dense")
FITS = {"dense K=1": 1, "grouped K=4": 4, "4 x dense": 4}


@dataclass(frozen=True)
class ConvCase:
    packing: str  # one of PACKINGS
    channels_last: bool
    bf16: bool
    merged: int  # input channels of one fit's conv: skip + upsampled
    cout: int
    size: int  # output height and width
    padded: bool = False  # zero channels appended up to a multiple of 8

    @property
    def fits(self) -> int:
        return FITS[self.packing]

    @property
    def groups(self) -> int:
        return self.fits if self.packing == "grouped K=4" else 1

    @property
    def calls(self) -> int:
        return self.fits if self.packing == "4 x dense" else 1

    @property
    def cin(self) -> int:
        return round_up(self.merged) if self.padded else self.merged

    @property
    def name(self) -> str:
        layout = "NHWC" if self.channels_last else "NCHW"
        return f"{self.packing} {layout} {'bf16' if self.bf16 else 'fp32'} cin={self.cin}"

    def gflop(self) -> float:
        """Forward FLOPs of all its fits, zero channels included (each backward pass costs
        the same); ``ms per fit`` is what compares padded with unpadded."""
        return 2 * self.fits * self.cin * self.cout * 9 * self.size**2 / 1e9


def round_up(channels: int, multiple: int = 8) -> int:
    return -(-channels // multiple) * multiple


def cases(size: int, up: int = 128, skip: int = 4) -> list[ConvCase]:
    """Every case, dense K=1 first within each group (the others are compared with it)."""
    merged = skip + up
    paddings = (False, True) if round_up(merged) != merged else (False,)
    return [
        ConvCase(packing, channels_last, bf16, merged, up, size, padded)
        for bf16 in (True, False)
        for channels_last in (True, False)
        for padded in paddings
        for packing in PACKINGS
    ]


def time_ms(fn: Callable[[], object], device: torch.device, warmup: int, iters: int) -> float:
    """Mean milliseconds per call after warm-up (which also lets cuDNN choose its kernels)."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / iters
    started = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - started) * 1000 / iters


def _operands(case: ConvCase, device: torch.device) -> list[tuple[torch.Tensor, ...]]:
    """(input, weight, output gradient) of each conv call the case makes."""
    groups = case.groups
    dtype = torch.bfloat16 if case.bf16 else torch.float32
    fmt = torch.channels_last if case.channels_last else torch.contiguous_format
    side = case.size + 2  # reflection-padded by the layer before, convolved with padding 0

    def tensor(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device=device, dtype=dtype).contiguous(memory_format=fmt)

    return [
        (
            tensor(1, groups * case.cin, side, side),
            tensor(groups * case.cout, case.cin, 3, 3),
            tensor(1, groups * case.cout, case.size, case.size),
        )
        for _ in range(case.calls)
    ]


def passes(case: ConvCase, device: torch.device) -> dict[str, Callable[[], object]]:
    """The forward, dgrad and wgrad calls of one case, each a no-argument function."""
    operands, groups = _operands(case, device), case.groups

    def backward(mask: list[bool]) -> Callable[[], object]:
        return lambda: [
            torch.ops.aten.convolution_backward(
                g, x, w, None, [1, 1], [0, 0], [1, 1], False, [0, 0], groups, mask
            )
            for x, w, g in operands
        ]

    return {
        "fwd": lambda: [F.conv2d(x, w, groups=groups) for x, w, _ in operands],
        "dgrad": backward([True, False, False]),
        "wgrad": backward([False, True, False]),
    }


class ConvBench:
    """Measures cases one at a time; a row compares itself with earlier ones of its group."""

    def __init__(self, device: torch.device, warmup: int = 5, iters: int = 20) -> None:
        self.device, self.warmup, self.iters = device, warmup, iters
        self.per_fit: dict[ConvCase, float] = {}  # ms of one fit's three passes

    def measure(self, case: ConvCase) -> dict:
        ms = {
            name: time_ms(fn, self.device, self.warmup, self.iters)
            for name, fn in passes(case, self.device).items()
        }
        total = sum(ms.values())
        self.per_fit[case] = total / case.fits
        row: dict = {"size": case.size, "K": case.fits}
        row |= {f"{name} ms": value for name, value in ms.items()}
        row |= {"ms per fit": total / case.fits, "TFLOP/s": 3 * case.gflop() / total}
        row["x dense K=1"] = self._ratio(case, packing="dense K=1")
        row["x unpadded"] = self._ratio(case, padded=False) if case.padded else None
        return row

    def _ratio(self, case: ConvCase, **change) -> float | None:
        """How many times faster per fit than the case with ``change`` applied, if measured."""
        reference = self.per_fit.get(replace(case, **change))
        return None if reference is None else reference / self.per_fit[case]


def run(size: int, up: int, skip: int, device: torch.device, iters: int) -> Iterator[dict]:
    torch.backends.cudnn.benchmark = True
    bench = ConvBench(device, warmup=max(1, iters // 4), iters=iters)
    for case in cases(size, up, skip):
        yield {"name": case.name, **bench.measure(case)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--channels", type=int, default=128, help="upsampled channels")
    parser.add_argument("--skip", type=int, default=4, help="skip channels")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}")
    for row in run(args.size, args.channels, args.skip, device, args.iters):
        cells = [f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()]
        print(", ".join(cells), flush=True)


if __name__ == "__main__":
    main()
