"""Quality benchmark: DIP on the paper's sample images against classical baselines.

For each case it synthesises the degradation with a fixed seed, fits with the task's preset
(optionally narrowed and shortened for a CPU) at each budget, and prints one table:

- budget: ``preset`` (the preset's steps x --iterations-scale, at most --max-iterations) or
  a step cap (e.g. 500), as a user capping steps to fit their GPU hours would set it;
- fixed: the budget's steps, PSNR / SSIM of the returned image;
- auto: the stopping rule (stopping.py) on the same fit, recorded and not enforced: the
  step whose image it returns, the steps it would have run, and that image's PSNR (the
  fixed result when it does not fire). ``default`` is what the task does by default;
- oracle: the best PSNR anywhere on the trace (needs the reference), and its step;
- ens2: the mean image of the first two seeds (with --seeds 2 or more);
- the classical baseline measured in the same run on the same input (SR: Y channel too).

Runs from a checkout with ``PYTHONPATH=.`` on torch, numpy, Pillow and scikit-image alone
(BM3D is used when the ``bm3d`` package is installed). Cases and groups (``denoise``: every
colour image with sigma-25 noise; ``inpaint``; ``sr``) are listed by ``--help``. Example
(2-core CPU, see README "Quality" for the runs quoted there):

    PYTHONPATH=. python -m benchmarks.quality --cases denoise --size 64 --channels 32 \
        --depth 4 --iterations-scale 0.5 --max-iterations 2000 --budgets preset,500
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from benchmarks.baselines import BASELINES
from benchmarks.quality_cases import CASES, GROUPS, SR_CASES, Case, expand, load_case
from dip_core import fit, get_task, plan_restore, psnr, psnr_y, resolve_preset, ssim
from dip_core.stopping import StopRule


@dataclass
class Row:
    case: str
    task: str
    size: str
    budget: str
    steps: int
    fixed_psnr: float | None
    fixed_ssim: float | None
    auto_step: int | None
    auto_ran: int | None
    auto_psnr: float | None
    default_psnr: float | None  # auto where the task stops automatically by default
    oracle_step: int | None
    oracle_psnr: float | None
    ens2_psnr: float | None
    baseline: str
    baseline_psnr: float | None
    baseline_ssim: float | None
    seconds_per_step: float
    fixed_psnr_y: float | None = None  # super-resolution: Y channel, border cropped
    baseline_psnr_y: float | None = None
    rollbacks: int = 0  # divergence rollbacks over every seed's fit


def metric(case: Case, image: torch.Tensor) -> tuple[float | None, float | None]:
    """(PSNR over all channels, the metric of the fit's trace; SSIM)."""
    if case.reference is None:
        return None, None
    return psnr(image, case.reference).item(), ssim(image, case.reference).item()


def psnr_y_of(case: Case, image: torch.Tensor | None) -> float | None:
    """Y-channel PSNR with a border of ``scale`` pixels cropped, for tasks whose tables
    report it (super-resolution)."""
    if not get_task(case.task).luma_metric or image is None:
        return None
    return psnr_y(image, case.reference, border=case.scale).item()


def run_seed(case: Case, params: dict, iterations: int, seed: int, args):
    """One fit planned as ``restore`` plans it, with the stopping rule recorded, not enforced
    (tasks that do not stop by default get the preset's rule too, for the auto column)."""
    plan = plan_restore(
        case.task, case.observation, mask=case.mask, guide=case.guide, scale=case.scale,
        reference=case.reference, iterations=iterations, seed=seed, params=params,
        feature_net=case.feature_net, sync_every=100,
    )  # fmt: skip
    (problem, config), preset = plan.fits[0], plan.problem.preset
    rule = config.stop or StopRule.for_averaging(
        preset.stop_window, preset.stop_patience, preset.exp_weight
    )
    return fit(problem, replace(config, stop=rule, stop_enforced=False), device=args.device)


def budget_steps(preset, budget: str, args) -> int:
    if budget == "preset":
        return min(args.max_iterations, max(1, round(preset.iterations * args.iterations_scale)))
    return int(budget)


def evaluate(case: Case, args, budget: str) -> Row:
    params = {**args.params, **(case.params or {})}
    preset = resolve_preset(case.task, params, case.scale, mask=case.mask)
    iterations = budget_steps(preset, budget, args)
    results = [run_seed(case, params, iterations, s, args) for s in range(args.seeds)]
    fixed = [metric(case, r.image) for r in results]
    decisions = [r.stop_decision for r in results]
    auto_psnr = oracle = None
    if case.reference is not None and results[0].psnrs is not None:
        # The trace holds the PSNR of the image the rule keeps at each step (the average
        # where the task averages); a rule that never fires returns the fixed result.
        auto_psnr = mean([r.psnrs[d[0] - 1].item() if d else f[0]
                          for r, d, f in zip(results, decisions, fixed, strict=True)])  # fmt: skip
        # The best anywhere: on the trace (jittered outputs when the task does not
        # average) or the final image (the un-jittered output).
        best = [max(r.psnrs.max().item(), f[0]) for r, f in zip(results, fixed, strict=True)]
        oracle = (mean(best), int(results[0].psnrs.argmax()) + 1)
    fixed_psnr = mean([f[0] for f in fixed])
    ens2 = None
    if len(results) >= 2:
        ens2 = metric(case, (results[0].image + results[1].image) / 2)[0]
    name = get_task(case.task).baseline
    baseline = BASELINES[name] if name else None  # a task names one that exists
    base_name, base_image = (
        baseline(case) if baseline and case.reference is not None else ("-", None)
    )
    base = metric(case, base_image) if base_image is not None else (None, None)
    fixed_y = mean([psnr_y_of(case, r.image) for r in results])
    steps = sum(r.iterations for r in results)
    return Row(
        case.name, case.task, "x".join(map(str, case.observation.shape[-2:])), budget,
        iterations, fixed_psnr, mean([f[1] for f in fixed]),
        decisions[0][0] if decisions[0] else None, decisions[0][1] if decisions[0] else None,
        auto_psnr, auto_psnr if preset.stop == "auto" else fixed_psnr,
        oracle[1] if oracle else None, oracle[0] if oracle else None, ens2,
        base_name, base[0], base[1], sum(r.seconds for r in results) / steps,
        fixed_y, psnr_y_of(case, base_image), sum(r.rollbacks for r in results),
    )  # fmt: skip


def mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def fmt(value, digits=2) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


COLUMNS = (
    ("case", "case", 0), ("task", "task", 0), ("size", "size", 0), ("budget", "budget", 0),
    ("steps", "steps", 0), ("fixed dB", "fixed_psnr", 2), ("fixed SSIM", "fixed_ssim", 3),
    ("auto step", "auto_step", 0), ("auto ran", "auto_ran", 0), ("auto dB", "auto_psnr", 2),
    ("default dB", "default_psnr", 2), ("oracle step", "oracle_step", 0),
    ("oracle dB", "oracle_psnr", 2), ("ens2 dB", "ens2_psnr", 2), ("baseline", "baseline", 0),
    ("base dB", "baseline_psnr", 2), ("base SSIM", "baseline_ssim", 3),
    ("fixed Y dB", "fixed_psnr_y", 2), ("base Y dB", "baseline_psnr_y", 2),
    ("s/step", "seconds_per_step", 4), ("rollbacks", "rollbacks", 0),
)  # fmt: skip


def print_table(rows: list[Row]) -> None:
    cells = [[fmt(getattr(r, attr), d) for _, attr, d in COLUMNS] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, (h, _, _) in enumerate(COLUMNS)]
    print("  ".join(h.ljust(w) for (h, _, _), w in zip(COLUMNS, widths, strict=False)))
    for row in cells:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)))
    print_summary(rows)


def print_summary(rows: list[Row]) -> None:
    print()
    for budget in dict.fromkeys(r.budget for r in rows):
        scored = [r for r in rows if r.budget == budget and r.auto_psnr is not None
                  and r.oracle_psnr is not None and r.fixed_psnr is not None]  # fmt: skip
        if scored:
            worst = min(scored, key=lambda r: r.auto_psnr - r.fixed_psnr)
            loss = worst.auto_psnr - worst.fixed_psnr
            gap = mean([r.oracle_psnr - r.auto_psnr for r in scored])
            print(f"budget {budget}: auto - fixed at worst {loss:+.2f} dB ({worst.case});"
                  f" mean gap to the oracle {gap:.2f} dB over {len(scored)} cases")  # fmt: skip
        for task in dict.fromkeys(r.task for r in rows if r.budget == budget):
            mine = [r for r in rows if r.budget == budget and r.task == task]
            pairs = [(r.fixed_psnr_y, r.baseline_psnr_y) if get_task(r.task).luma_metric
                     else (r.default_psnr, r.baseline_psnr) for r in mine]  # fmt: skip
            pairs = [(a, b) for a, b in pairs if a is not None and b is not None]
            if pairs:
                wins = sum(a > b for a, b in pairs)
                margin = mean([a - b for a, b in pairs])
                print(f"  {task}: DIP (default stopping) above the baseline on {wins} of"
                      f" {len(pairs)}, mean margin {margin:+.2f} dB")  # fmt: skip
    for r in rows:
        if r.ens2_psnr is not None and r.fixed_psnr is not None:
            print(f"ensemble of 2 on {r.case}: {r.ens2_psnr - r.fixed_psnr:+.2f} dB over one run")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="../shared/data/dip-reference", type=Path)
    parser.add_argument("--size", type=int, default=64, help="longer side in px; 0 = native")
    parser.add_argument("--channels", type=int, help="network width (default: the preset's)")
    parser.add_argument("--depth", type=int, help="network levels (default: the preset's)")
    parser.add_argument("--iterations", type=int, help="steps for every case (not --budgets)")
    parser.add_argument("--iterations-scale", type=float, default=1.0)
    parser.add_argument("--max-iterations", type=int, default=1_000_000)
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument(
        "--budgets",
        default="preset",
        help="comma-separated: preset (the scaled preset) and/or step caps",
    )
    parser.add_argument(
        "--sr-size",
        type=int,
        default=256,
        help="longer side of the SR cases' HR image in px; 0 = native",
    )
    parser.add_argument(
        "--cases",
        default="all",
        help=f"cases or groups ({', '.join(GROUPS)}) from {', '.join(CASES)}",
    )
    parser.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="KEY=JSON",
        help="extra preset params for every case, e.g. lr=0.005",
    )
    parser.add_argument("--device", default=None)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    args.params = {k: v for k, v in (("channels", args.channels), ("depth", args.depth)) if v}
    for item in args.param:
        key, _, value = item.partition("=")
        args.params[key] = json.loads(value)
    return args


def main() -> None:
    args = parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()) if args.device == "cuda" else 1)
    rows = []
    names = list(CASES) if args.cases == "all" else expand(args.cases)
    for name in names:
        started = time.perf_counter()
        case = load_case(name, args.data, args.sr_size if name in SR_CASES else args.size)
        for budget in [str(args.iterations)] if args.iterations else args.budgets.split(","):
            rows.append(evaluate(case, args, budget))
            tried = f" (baseline tried: {case.notes})" if case.notes else ""
            print(f"[{name} {budget}] {time.perf_counter() - started:.0f} s: {rows[-1]}{tried}",
                  flush=True)  # fmt: skip
            if args.json:  # after every row: a long run that dies keeps what it measured
                args.json.write_text(json.dumps([r.__dict__ for r in rows], indent=1))
    print()
    print_table(rows)


if __name__ == "__main__":
    main()
