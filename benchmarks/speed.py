"""Speed benchmark: the fitting engine against the plain loop, on one device, one process.

(a) the plain loop, as the reference code runs it: float32, batch 1, eager, for-loop Adam,
    a host read of the loss every step;
(b) our engine with each switch added in turn (flat Adam and no per-step sync, then
    channels_last, bf16 autocast, the whole-step CUDA graph, torch.compile);
(c) packing: K = 1, 2, 4, 8, 16 fits in one network.

Prints steps per second (per fit), images per hour per device at 3,000 steps, model FLOP
utilisation (FLOPs of one forward + backward counted by torch's FLOP counter: 460.1 GFLOP
at 512x512 for the paper's denoising network; the peak is chosen from the device name,
benchmarks/peaks.py) and the final PSNR of each variant on the same noisy image. Each row
is printed (and the JSON rewritten) as soon as it is measured. On CPU, use small sizes and
read the ratios. Runs with ``PYTHONPATH=.`` on torch, numpy and scikit-image.

    PYTHONPATH=. python -m benchmarks.speed --sizes 64 --channels 32 --steps 60     # CPU
    PYTHONPATH=. python -m benchmarks.speed --sizes 256,512 --steps 300             # GPU
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from benchmarks.peaks import peak_for
from dip_core import FitConfig, build_problem, psnr
from dip_core.engine import EngineOptions, seeded_network
from dip_core.fit import FitItem, fit_many
from dip_core.inputs import jittered
from dip_core.networks import SkipSpec, build_network

IMAGES = ("astronaut", "coffee", "chelsea")  # photos that ship inside scikit-image
NOISE_SIGMA = 25 / 255


@dataclass
class Measure:
    size: int
    variant: str
    slots: int
    steps_per_s: float  # per fit
    psnr: float
    gflop: float = 0.0  # one fit's forward + backward per step
    bf16: bool = False  # which peak MFU is taken against

    def images_per_hour(self, steps: int = 3000) -> float:
        return self.steps_per_s * self.slots * 3600 / steps

    def mfu(self, peak_tflops: float | None) -> float | None:
        if not peak_tflops or not self.gflop:
            return None
        return self.gflop * 1e9 * self.steps_per_s * self.slots / (peak_tflops * 1e12)

    def line(self) -> str:
        name = self.variant if "K=" in self.variant else f"{self.variant} K={self.slots}"
        return (
            f"[{self.size}px] {name}: {self.steps_per_s:.3g} steps/s "
            f"per fit, {self.images_per_hour():.4g} images/h, PSNR {self.psnr:.2f} dB"
        )


@functools.lru_cache(maxsize=16)
def step_gflop(spec: SkipSpec, height: int, width: int) -> float:
    """GFLOP of one forward + backward of one fit, counted on the meta device (no compute)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        net = build_network(spec)
        z = torch.empty(1, spec.in_channels, height, width)
    with FlopCounterMode(display=False) as counter:
        net(z).sum().backward()
    return counter.get_total_flops() / 1e9


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def peak_tflops(device: torch.device, bf16: bool, override: float | None = None) -> float | None:
    """The peak MFU is taken against: the override, else the device's from the table."""
    if override:
        return override
    peak = peak_for(device_name(device)) if device.type == "cuda" else None
    return peak.tflops(bf16) if peak else None


def test_image(size: int, seed: int, name: str = "astronaut") -> tuple[torch.Tensor, torch.Tensor]:
    """(clean, noisy) (3, size, size) images: a scikit-image photo, centre-cropped square and
    resized, with Gaussian noise of sigma 25/255 (the paper's denoising setting)."""
    from skimage import data, transform

    photo = getattr(data, name)()
    side = min(photo.shape[:2])
    top, left = (photo.shape[0] - side) // 2, (photo.shape[1] - side) // 2
    square = photo[top : top + side, left : left + side]
    image = transform.resize(square, (size, size), anti_aliasing=True)
    clean = torch.tensor(image, dtype=torch.float32).permute(2, 0, 1).contiguous()
    noise = torch.randn(clean.shape, generator=torch.Generator().manual_seed(seed))
    return clean, (clean + NOISE_SIGMA * noise).clamp(0, 1)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def plain_loop(problem, config, device, warmup: int) -> tuple[float, torch.Tensor]:
    """The reference code's loop: seconds per step after warm-up, and the result image."""
    net = seeded_network(problem.spec, config.seed).to(device)
    problem.to(device)
    generator = torch.Generator(device=device).manual_seed(config.seed)
    z = problem.network_input(generator)
    optimizer = torch.optim.Adam(net.parameters(), lr=config.lr, foreach=False)
    average, started = None, None
    for step in range(config.iterations):
        if step == warmup:
            sync(device)
            started = time.perf_counter()
        out = net(jittered(z, config.reg_noise_std, generator))
        loss = problem.data_energy(out)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        loss.item()  # the reference prints the loss every step: a host sync
        crop = problem.placement.crop(out.detach())
        average = crop if average is None else 0.99 * average + 0.01 * crop
    sync(device)
    assert started is not None and average is not None, "needs more steps than warm-up"
    return (time.perf_counter() - started) / (config.iterations - warmup), average[0]


def engine_run(problems, config, device, options, warmup) -> tuple[float, list[torch.Tensor]]:
    """Per-fit steps per second of packed fits (all slots start together), and images."""
    marks: list[tuple[int, float]] = []

    def clock(progress) -> None:
        marks.append((progress.step, progress.elapsed))

    items = [
        FitItem(i, p, replace(config, seed=config.seed + i), [clock] if i == 0 else [])
        for i, p in enumerate(problems)
    ]
    results = dict(fit_many(items, slots=len(items), device=device, options=options))
    after = [m for m in marks if m[0] > warmup] or marks
    first = next((m for m in marks if m[0] >= warmup), marks[0])
    rate = (after[-1][0] - first[0]) / max(after[-1][1] - first[1], 1e-9)
    return rate, [results[i].image for i in range(len(items))]


def switch_ladder(device: torch.device) -> list[tuple[str, EngineOptions]]:
    steps = [("engine fp32", EngineOptions())]
    if device.type == "cuda":
        steps.append(("+ channels_last", replace(steps[-1][1], channels_last=True)))
        steps.append(("+ bf16", replace(steps[-1][1], bf16=True)))
    if device.type == "cuda":  # on a CPU the same step runs eagerly: nothing to measure
        steps.append(("+ whole-step graph", replace(steps[-1][1], cuda_graph=True)))
    steps.append(("+ compile", replace(steps[-1][1], compile=True)))
    return steps


def measure_size(size: int, args, device: torch.device) -> Iterator[Measure]:
    """Every row at one size, yielded as soon as it is measured."""
    params = {"channels": args.channels} if args.channels else {}
    clean, noisy = test_image(size, 0)
    config = FitConfig(args.steps, 0.01, 1 / 30, 0.99, seed=0, sync_every=args.sync_every)

    def problem():
        return build_problem("denoise", noisy, reference=clean, params=params)

    p = problem().placement
    gflop = step_gflop(problem().spec, p.padded_height, p.padded_width)

    def row(variant: str, slots: int, rate: float, images, bf16: bool = False) -> Measure:
        quality = float(np.mean([psnr(image.cpu(), clean).item() for image in images]))
        return Measure(size, variant, slots, rate, quality, gflop, bf16)

    ladder = switch_ladder(device)
    # Seed by seed, the plain loop then each switch: a machine whose load drifts (a shared
    # CPU) then tilts no variant more than another.
    for seed in range(args.seeds):
        seconds, image = plain_loop(problem(), replace(config, seed=seed), device, args.warmup)
        yield row("plain loop", 1, 1 / seconds, [image])
        for name, options in ladder:
            rate, images = engine_run([problem()], replace(config, seed=seed), device, options,
                                      args.warmup)  # fmt: skip
            yield row(name, 1, rate, images, options.bf16)
    best = ladder[-1][1] if args.pack_options == "all" else EngineOptions.fastest_for(device)
    for slots in args.slots:
        problems = [problem() for _ in range(slots)]
        rate, images = engine_run(problems, config, device, best, args.warmup)
        yield row(f"packed K={slots}", slots, rate, images, best.bf16)


def summarise(rows: list[Measure], peak: Callable[[bool], float | None]) -> list[dict]:
    """One line per (size, variant): seeds averaged; ratios against the plain loop."""
    out = []
    for size in sorted({r.size for r in rows}):
        group = [r for r in rows if r.size == size]
        base = [r for r in group if r.variant == "plain loop"]
        base_rate = np.mean([r.images_per_hour() for r in base]) if base else np.nan
        base_psnr = np.mean([r.psnr for r in base]) if base else np.nan
        for variant in dict.fromkeys(r.variant for r in group):
            same = [r for r in group if r.variant == variant]
            mfu = same[0].mfu(peak(same[0].bf16))
            out.append({
                "size": size, "variant": variant, "K": same[0].slots,
                "steps/s per fit": float(np.mean([r.steps_per_s for r in same])),
                "images/h": float(np.mean([r.images_per_hour() for r in same])),
                "x plain": float(np.mean([r.images_per_hour() for r in same]) / base_rate),
                "MFU %": None if mfu is None else 100 * mfu,
                "PSNR dB": float(np.mean([r.psnr for r in same])),
                "dB vs plain": float(np.mean([r.psnr for r in same]) - base_psnr),
            })  # fmt: skip
    return out


def format_table(lines: list[dict]) -> str:
    heads = list(lines[0])
    cells = [[f"{v:.3g}" if isinstance(v, float) else ("-" if v is None else str(v))
              for v in line.values()] for line in lines]  # fmt: skip
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(heads)]
    text = ["  ".join(h.ljust(w) for h, w in zip(heads, widths, strict=True))]
    text += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="256,512")
    parser.add_argument("--channels", type=int, help="network width (default: the paper's 128)")
    parser.add_argument("--steps", type=int, default=300, help="steps per timed fit")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--sync-every", type=int, default=20)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--slots", default="1,2,4,8,16")
    parser.add_argument(
        "--pack-options", choices=["default", "all"], default="default",
        help="switches for the packed runs: the defaults, or every switch",
    )  # fmt: skip
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--peak-tflops", type=float, help="for MFU (default: from the device)")
    parser.add_argument("--json", type=Path, help="rewritten after every row")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (CPU runs)")
    args = parser.parse_args()
    args.slots = [int(s) for s in args.slots.split(",")]
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)

    def peak(bf16: bool) -> float | None:
        return peak_tflops(device, bf16, args.peak_tflops)

    print(f"device: {device_name(device)}; peak TFLOP/s bf16 {peak(True)}, fp32 {peak(False)}")
    rows: list[Measure] = []
    for size in (int(s) for s in args.sizes.split(",")):
        for measure in measure_size(size, args, device):
            rows.append(measure)
            print(measure.line(), flush=True)
            if args.json:
                args.json.write_text(json.dumps(summarise(rows, peak), indent=1))
    print(format_table(summarise(rows, peak)))


if __name__ == "__main__":
    main()
