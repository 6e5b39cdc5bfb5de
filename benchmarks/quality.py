"""Quality benchmark: DIP on the paper's sample images against classical baselines.

For each case it synthesises the degradation with a fixed seed, fits with the task's preset
(optionally narrowed and shortened for a CPU), and prints one table:

- fixed: the preset's step count, PSNR / SSIM of the returned image;
- auto: the no-reference stopping rule (windowed output variance): the step it returns,
  the step at which it fired (steps run), and that image's PSNR;
- oracle: the best PSNR anywhere on the trace (needs the reference), and its step;
- ens2: the mean image of the first two seeds (with --seeds 2 or more);
- the classical baseline measured in the same run on the same input.

Runs from a checkout with ``PYTHONPATH=.`` on torch, numpy, Pillow and scikit-image alone
(BM3D is used when the ``bm3d`` package is installed). Example (2-core CPU, minutes):

    PYTHONPATH=. python -m benchmarks.quality --size 64 --channels 32 --depth 4 \
        --iterations-scale 0.5 --max-iterations 2000 --seeds 2
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.quality_cases import CASES, Case, load_case
from dip_core import FitConfig, build_problem, fit, psnr, psnr_y, resolve_preset, ssim
from dip_core.stopping import StopRule, offline_stop


@dataclass
class Row:
    case: str
    task: str
    size: str
    steps: int
    fixed_psnr: float | None
    fixed_ssim: float | None
    auto_step: int | None
    auto_ran: int | None
    auto_psnr: float | None
    oracle_step: int | None
    oracle_psnr: float | None
    ens2_psnr: float | None
    baseline: str
    baseline_psnr: float | None
    baseline_ssim: float | None
    seconds_per_step: float
    fixed_psnr_y: float | None = None  # super-resolution: Y channel, border cropped
    baseline_psnr_y: float | None = None


def metric(case: Case, image: torch.Tensor) -> tuple[float | None, float | None]:
    """(PSNR over all channels, the metric of the fit's trace; SSIM)."""
    if case.reference is None:
        return None, None
    return psnr(image, case.reference).item(), ssim(image, case.reference).item()


def psnr_y_of(case: Case, image: torch.Tensor | None) -> float | None:
    """Y-channel PSNR with a border of ``scale`` pixels cropped: the SR tables' metric."""
    if case.task != "super_resolution" or image is None:
        return None
    return psnr_y(image, case.reference, border=case.scale).item()


def run_seed(case: Case, params: dict, iterations: int | None, seed: int, args):
    problem = build_problem(
        case.task, case.observation, mask=case.mask, guide=case.guide, scale=case.scale,
        reference=case.reference, params=params, feature_net=case.feature_net,
    )  # fmt: skip
    config = FitConfig.from_preset(problem.preset, iterations, seed, sync_every=100)
    rule = StopRule.for_averaging(args.stop_window, args.stop_patience, config.exp_weight)
    config = FitConfig(**{**config.__dict__, "stop": rule, "stop_enforced": False})
    return fit(problem, config, device=args.device)


def evaluate(case: Case, args) -> Row:
    params = dict(args.params)
    preset = resolve_preset(case.task, params, case.scale, case.mask)
    iterations = min(args.max_iterations, max(1, round(preset.iterations * args.iterations_scale)))
    if args.iterations:
        iterations = args.iterations
    results = [run_seed(case, params, iterations, s, args) for s in range(args.seeds)]
    fixed = [metric(case, r.image) for r in results]
    autos = [offline_stop(r.stop_stats, args.stop_patience) for r in results]
    delay = StopRule.for_averaging(1, args.stop_patience, preset.exp_weight).result_delay
    autos = [None if a is None else (min(a[0] + delay, a[1]), a[1]) for a in autos]
    auto_psnr = oracle = None
    if case.reference is not None and results[0].psnrs is not None:
        # A rule that never fires lets the fit run to the end: the fixed result.
        auto_psnr = mean([r.psnrs[a[0]].item() if a else f[0]
                          for r, a, f in zip(results, autos, fixed, strict=True)])  # fmt: skip
        # The best anywhere: on the trace (jittered outputs when the task does not
        # average) or the final image (the un-jittered output).
        best = [max(r.psnrs.max().item(), f[0]) for r, f in zip(results, fixed, strict=True)]
        oracle = (mean(best), int(results[0].psnrs.argmax()))
    ens2 = None
    if len(results) >= 2:
        ens2 = metric(case, (results[0].image + results[1].image) / 2)[0]
    base_name, base_image = case.baseline() if case.baseline else ("-", None)
    base = metric(case, base_image) if base_image is not None else (None, None)
    fixed_y = mean([psnr_y_of(case, r.image) for r in results])
    steps = sum(r.iterations for r in results)
    return Row(
        case.name, case.task, "x".join(map(str, case.observation.shape[-2:])), iterations,
        mean([f[0] for f in fixed]), mean([f[1] for f in fixed]),
        autos[0][0] + 1 if autos[0] else None, autos[0][1] + 1 if autos[0] else None, auto_psnr,
        oracle[1] + 1 if oracle else None, oracle[0] if oracle else None, ens2,
        base_name, base[0], base[1], sum(r.seconds for r in results) / steps,
        fixed_y, psnr_y_of(case, base_image),
    )  # fmt: skip


def mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def fmt(value, digits=2) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


COLUMNS = (
    ("case", "case", 0), ("task", "task", 0), ("size", "size", 0), ("steps", "steps", 0),
    ("fixed dB", "fixed_psnr", 2), ("fixed SSIM", "fixed_ssim", 3),
    ("auto step", "auto_step", 0), ("auto ran", "auto_ran", 0), ("auto dB", "auto_psnr", 2),
    ("oracle step", "oracle_step", 0), ("oracle dB", "oracle_psnr", 2),
    ("ens2 dB", "ens2_psnr", 2), ("baseline", "baseline", 0), ("base dB", "baseline_psnr", 2),
    ("base SSIM", "baseline_ssim", 3), ("fixed Y dB", "fixed_psnr_y", 2),
    ("base Y dB", "baseline_psnr_y", 2), ("s/step", "seconds_per_step", 4),
)  # fmt: skip


def print_table(rows: list[Row]) -> None:
    cells = [[fmt(getattr(r, attr), d) for _, attr, d in COLUMNS] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, (h, _, _) in enumerate(COLUMNS)]
    print("  ".join(h.ljust(w) for (h, _, _), w in zip(COLUMNS, widths, strict=False)))
    for row in cells:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)))
    print_summary(rows)


def print_summary(rows: list[Row]) -> None:
    scored = [r for r in rows if r.auto_psnr is not None and r.oracle_psnr is not None]
    if scored:
        gap = mean([r.oracle_psnr - r.auto_psnr for r in scored])
        print(
            f"\nauto-stop: mean gap to the oracle-best PSNR {gap:.2f} dB over {len(scored)} cases"
        )
    ens = [r for r in rows if r.ens2_psnr is not None and r.fixed_psnr is not None]
    for r in ens:
        print(f"ensemble of 2 on {r.case}: {r.ens2_psnr - r.fixed_psnr:+.2f} dB over one run")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="../shared/data/dip-reference", type=Path)
    parser.add_argument("--size", type=int, default=64, help="longer side in px; 0 = native")
    parser.add_argument("--channels", type=int, help="network width (default: the preset's)")
    parser.add_argument("--depth", type=int, help="network levels (default: the preset's)")
    parser.add_argument("--iterations", type=int, help="steps for every case")
    parser.add_argument("--iterations-scale", type=float, default=1.0)
    parser.add_argument("--max-iterations", type=int, default=1_000_000)
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--stop-window", type=int, default=StopRule.window)
    parser.add_argument("--stop-patience", type=int, default=StopRule.patience)
    parser.add_argument("--cases", default=",".join(CASES), help=f"from {','.join(CASES)}")
    parser.add_argument("--device", default=None)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    args.params = {k: v for k, v in (("channels", args.channels), ("depth", args.depth)) if v}
    return args


def main() -> None:
    args = parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()) if args.device == "cuda" else 1)
    rows = []
    for name in args.cases.split(","):
        started = time.perf_counter()
        case = load_case(name, args.data, args.size)
        rows.append(evaluate(case, args))
        print(f"[{name}] done in {time.perf_counter() - started:.0f} s: {rows[-1]}", flush=True)
        if args.json:  # after every case: a long run that dies keeps what it measured
            args.json.write_text(json.dumps([r.__dict__ for r in rows], indent=1))
    print()
    print_table(rows)


if __name__ == "__main__":
    main()
