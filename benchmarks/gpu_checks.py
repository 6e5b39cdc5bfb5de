"""Every GPU check in one run, written row by row so that no timeout or error loses a row.

Stages, in order, under one wall budget: the environment; the engine's CUDA promises (no
step syncs, the whole-step graph replays the eager step, every switch fits); the level-0 merge conv
(conv_micro.py); the speed ladder at 512 px (the plain loop, then the engine with each
switch, each compiled variant built once); packing K = 1, 2, 4 at 256 px; a full-length
(3,000 steps) fp32 against bf16 denoising fit at 512 px, which decides whether bf16 may be a
default; then the ladder at 256 px if time is left. Each row is appended to
``OUT/rows.jsonl`` (flushed and synced) and ``OUT/table.md`` is rewritten, the moment it is
measured. A row that raises becomes an error row and the run goes on; a row that cannot
finish within the budget is skipped ("skipped: budget"), and one that runs past it is
interrupted. The test images are scikit-image's own photos, made at start: nothing outside
the repository is read. Imports only torch, numpy, scikit-image and dip_core.

    PYTHONPATH=. python -m benchmarks.gpu_checks --out bench-out            # GPU, ~6 min
    PYTHONPATH=. python -m benchmarks.gpu_checks --smoke --out /tmp/smoke   # CPU, tiny
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from benchmarks import conv_micro, gpu_correctness, speed
from benchmarks.peaks import peak_for
from dip_core import EngineOptions, FitConfig, build_problem, psnr

DEFAULT_BUDGET = 330.0  # seconds: with start-up, the run fits in 6 minutes
QUALITY_TOLERANCE_DB = 0.1


@dataclass(frozen=True)
class Plan:
    """Sizes and lengths of one run: the GPU run's defaults, or a tiny CPU smoke run."""

    large: int = 512
    small: int = 256
    params: dict = field(default_factory=dict)  # network overrides (the paper's: none)
    steps: int = 200  # per timed fit
    warmup: int = 40  # steps before timing: graph capture and cuDNN's autotuning
    sync_every: int = 20
    fit_steps: int = 3000  # the full-length quality fit
    slots: tuple[int, ...] = (1, 2, 4)
    conv_up: int = 128
    conv_skip: int = 4
    conv_iters: int = 20
    compile: bool = True
    compile_seconds: float = 90.0  # what a compile is assumed to cost when planning
    compile_cap: float = 150.0  # a compiled row is stopped after this long


SMOKE = Plan(
    large=32, small=16, params={"channels": 16, "depth": 3, "input_depth": 8}, steps=12,
    warmup=4, sync_every=4, fit_steps=30, conv_up=16, conv_iters=3, compile=False,
)  # fmt: skip


# -- rows: written the moment they are measured ---------------------------------------------


def _finite(value):
    """JSON has no NaN or infinity: they become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.3g}"
    return str(value).replace("|", "/").replace("\n", " ")


def markdown(rows: list[dict], title: str) -> str:
    """One table per stage, its columns the union of its rows' keys (tracebacks left out)."""
    parts = [f"# {title}", ""]
    for stage in dict.fromkeys(row["stage"] for row in rows):
        group = [row for row in rows if row["stage"] == stage]
        heads = [k for k in dict.fromkeys(k for r in group for k in r) if k not in HIDDEN]
        parts += [f"## {stage}", "", "| " + " | ".join(heads) + " |"]
        parts.append("|" + "---|" * len(heads))
        parts += ["| " + " | ".join(_cell(r.get(h)) for h in heads) + " |" for r in group]
        parts.append("")
    return "\n".join(parts)


HIDDEN = ("stage", "traceback")


class RowLog:
    """rows.jsonl (appended, flushed and synced per row) and table.md (rewritten per row)."""

    def __init__(self, out: Path, title: str = "GPU checks") -> None:
        self.out, self.title = out, title
        self.rows: list[dict] = []
        out.mkdir(parents=True, exist_ok=True)
        (out / "rows.jsonl").write_text("", encoding="utf-8")  # a run starts its own file

    def add(self, row: dict) -> dict:
        row = {key: _finite(value) for key, value in row.items()}
        self.rows.append(row)
        with open(self.out / "rows.jsonl", "a", encoding="utf-8") as file:
            file.write(json.dumps(row, default=str) + "\n")
            file.flush()
            os.fsync(file.fileno())
        staged = self.out / "table.md.tmp"
        staged.write_text(markdown(self.rows, self.title), encoding="utf-8")
        os.replace(staged, self.out / "table.md")
        print(_line(row), flush=True)
        return row


def _line(row: dict) -> str:
    cells = [f"{k}={_cell(v)}" for k, v in row.items() if k not in (*HIDDEN, "name", "status")]
    return f"[{row['stage']}] {row['name']}: {row['status']}  " + "  ".join(cells)


# -- the budget, and one row at a time ----------------------------------------------------


class BudgetExceeded(BaseException):
    """Raised inside a row that runs past its deadline. A BaseException, so that library
    code catching Exception does not swallow it."""


class Budget:
    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Interrupt the block after ``seconds`` (SIGALRM: main thread on POSIX; elsewhere the
    block just runs, and the shell's timeout is the backstop)."""
    usable = hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()
    if not usable or not math.isfinite(seconds):
        yield
        return

    def expire(signum, frame):
        raise BudgetExceeded(f"stopped after {seconds:.0f} s: the budget ran out mid-row")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 1e-3))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class Runner:
    """Runs each measurement as one row: measured, skipped or an error, never lost."""

    def __init__(self, log: RowLog, budget: Budget) -> None:
        self.log, self.budget = log, budget

    def row(
        self,
        stage: str,
        name: str,
        measure: Callable[[], dict],
        *,
        estimate: float = 0.0,
        skip: str | None = None,
        cap: float | None = None,
        reserve: float = 0.0,
        budgeted: bool = True,
    ) -> dict:
        """``estimate``: seconds the row is expected to need (it is skipped when less is
        left); ``skip``: a reason not to run it; ``cap``: the most seconds it may take;
        ``reserve``: seconds kept for a later, more important row (the row neither starts
        nor runs into them); ``budgeted=False``: run whatever is left (the environment)."""
        head = {"stage": stage, "name": name}
        if skip is not None:
            return self.log.add({**head, "status": f"skipped: {skip}"})
        left = self.budget.left() - reserve if budgeted else math.inf
        if left <= 0 or left < estimate:
            kept = f" (+{reserve:.0f} s kept for later rows)" if reserve else ""
            detail = f"needs ~{estimate:.0f} s{kept}, {max(left, 0):.0f} s left"
            return self.log.add({**head, "status": "skipped: budget", "detail": detail})
        started = time.perf_counter()
        try:
            with deadline(min(left, cap or math.inf)):
                fields = measure()
        except (Exception, BudgetExceeded) as error:
            return self.log.add({**head, **_error_fields(error), "seconds": _since(started)})
        finally:
            _release_memory()
        return self.log.add({**head, "status": "ok", **fields, "seconds": _since(started)})


def _error_fields(error: BaseException) -> dict:
    lines = traceback.format_exception(type(error), error, error.__traceback__)
    tail = "".join(lines).strip().splitlines()[-12:]
    message = f"{type(error).__name__}: {error}"[:500]
    return {"status": "error", "error": message, "traceback": "\n".join(tail)}


def _since(started: float) -> float:
    return round(time.perf_counter() - started, 2)


def _release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# -- the environment --------------------------------------------------------------------


def raise_recompile_limit(limit: int = 64) -> str:
    """Every fit builds a new network object, and dynamo guards on it: past its default
    limit (8) a compiled variant would fall back to eager. Whichever name this torch has."""
    import torch._dynamo.config as dynamo

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo, name):
            setattr(dynamo, name, max(getattr(dynamo, name), limit))
            for total in ("accumulated_recompile_limit", "accumulated_cache_size_limit"):
                if hasattr(dynamo, total):
                    setattr(dynamo, total, max(getattr(dynamo, total), 4 * limit))
                    break
            return f"{name}={getattr(dynamo, name)}"
    return "no limit found"


def _nvidia_smi() -> str | None:
    if shutil.which("nvidia-smi") is None:
        return None
    query = ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"]
    try:
        done = subprocess.run(query, capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"failed: {error}"
    text = (done.stdout or done.stderr).strip()
    return text.splitlines()[0] if text else ""


def _triton_version() -> str | None:
    from importlib import metadata

    for package in ("triton", "pytorch-triton"):  # the name differs between builds
        with contextlib.suppress(metadata.PackageNotFoundError):
            return metadata.version(package)
    return None


def environment(device: torch.device, limit: str) -> dict:
    cuda = device.type == "cuda"
    name = speed.device_name(device)
    peak = peak_for(name) if cuda else None
    memory = torch.cuda.get_device_properties(device).total_memory / 2**30 if cuda else None
    return {
        "device": name,
        "peak": "unknown: MFU blank" if peak is None else peak.model,
        "peak bf16 TFLOP/s": peak.bf16 if peak else None,
        "peak TF32 TFLOP/s": peak.tf32 if peak else None,
        "GPU GiB": memory,
        "driver (nvidia-smi)": _nvidia_smi(),
        "torch": torch.__version__,
        "CUDA": torch.version.cuda,
        "cuDNN": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "Triton": _triton_version(),
        "C compiler": shutil.which("cc") or shutil.which("gcc"),
        "CPUs": os.cpu_count(),
        "torch threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "cudnn.benchmark": torch.backends.cudnn.benchmark,
        "cudnn TF32": torch.backends.cudnn.allow_tf32,
        "matmul TF32": torch.backends.cuda.matmul.allow_tf32,
        "dynamo": limit,
    }


# -- the checks ---------------------------------------------------------------------------


@dataclass
class Rung:
    """One engine variant of the ladder: its options, and why it cannot run here, if so."""

    options: EngineOptions
    skip: str | None = None

    @property
    def name(self) -> str:
        o = self.options
        words = ["bf16" if o.bf16 else "fp32", "NHWC" if o.channels_last else ""]
        words += ["graph" if o.cuda_graph else "", "compile" if o.compile else ""]
        return "engine " + " ".join(w for w in words if w)


def ladder(cuda: bool, compile_ok: bool) -> list[Rung]:
    """Each switch added in turn. The whole-step graph runs before compile: it needs no
    compile, so a slow compile cannot cost its row. Then the candidate fastest (graph and
    compile), then compile alone. Each compiled variant is built once per size."""
    cuda_only = None if cuda else "needs CUDA"
    best = EngineOptions()
    rungs = [Rung(best)]
    for options in (
        EngineOptions(channels_last=True),
        EngineOptions(channels_last=True, bf16=True),
    ):
        rungs.append(Rung(options, cuda_only))
        best = options if cuda else best
    rungs.append(Rung(replace(best, cuda_graph=True)))  # on a CPU the same step runs eagerly
    no_compile = None if compile_ok else "smoke mode"
    rungs.append(Rung(replace(best, compile=True, cuda_graph=True), no_compile))
    rungs.append(Rung(replace(best, compile=True), no_compile))  # if the graph fails
    return rungs


class Checks:
    """The stages, sharing what earlier rows measured (the plain loop's rate and PSNR)."""

    def __init__(self, runner: Runner, plan: Plan, device: torch.device) -> None:
        self.runner, self.plan, self.device = runner, plan, device
        self.cuda = device.type == "cuda"
        self.images: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
        self.plain: dict[int, dict] = {}  # size -> the plain loop's row
        self.engine: dict[tuple[int, str], dict] = {}  # (size, variant) -> its row
        self.options: dict[tuple[int, str], EngineOptions] = {}  # and its switches

    def run(self) -> None:
        self.make_images()
        self.correctness()
        self.conv()
        self.speed_ladder(self.plan.large)
        self.packing(self.plan.small)
        self.quality(self.plan.large)
        self.speed_ladder(self.plan.small, plain_measured=True)

    # images ----------------------------------------------------------------------------

    def make_images(self) -> None:
        def make() -> dict:
            for size in (self.plan.large, self.plan.small):
                for seed, name in enumerate(speed.IMAGES):
                    self.images[size, name] = speed.test_image(size, seed, name)
            sizes = f"{self.plan.large}, {self.plan.small} px"
            return {"images": ", ".join(speed.IMAGES), "sizes": sizes, "sigma": "25/255"}

        self.runner.row("images", "scikit-image photos + noise", make)

    def problem(self, size: int, name: str = "astronaut"):
        clean, noisy = self.images[size, name]
        return build_problem("denoise", noisy, reference=clean, params=self.plan.params)

    def config(self, steps: int | None = None, seed: int = 0) -> FitConfig:
        plan = self.plan
        return FitConfig(steps or plan.steps, 0.01, 1 / 30, 0.99, seed, plan.sync_every)

    # the engine's CUDA promises ---------------------------------------------------------

    def correctness(self) -> None:
        """On a CPU (the smoke run) the switches still fit: the graph runs eagerly there."""
        device, stage = self.device, "engine on CUDA"
        cuda_only = {
            "no step syncs the stream": lambda: gpu_correctness.no_step_syncs(device),
            "whole-step graph == eager": lambda: gpu_correctness.graph_matches_eager(device),
        }
        for name, check in cuda_only.items():
            skip = None if self.cuda else "needs CUDA"
            self.runner.row(stage, name, check, estimate=5, skip=skip, cap=60)
        for name in gpu_correctness.SWITCHES:

            def fits(name: str = name) -> dict:
                size = gpu_correctness.SIZE if self.cuda else 32  # a CPU smoke run: small
                return gpu_correctness.switch_fits(device, name, size)

            self.runner.row(stage, f"fits with {name}", fits, estimate=5, cap=60)

    # the merge conv --------------------------------------------------------------------

    def conv(self) -> None:
        plan = self.plan
        bench = conv_micro.ConvBench(self.device, max(1, plan.conv_iters // 4), plan.conv_iters)
        for case in conv_micro.cases(plan.large, plan.conv_up, plan.conv_skip):

            def measure(case: conv_micro.ConvCase = case) -> dict:
                return bench.measure(case)

            self.runner.row(f"conv {plan.large} px", case.name, measure, estimate=3)

    # speed -----------------------------------------------------------------------------

    def speed_ladder(self, size: int, plain_measured: bool = False) -> None:
        if not plain_measured:
            self.plain_row(size)
        for rung in ladder(self.cuda, self.plan.compile):
            compiled = rung.options.compile

            def measure(rung: Rung = rung) -> dict:
                return self.engine_row(size, rung.options, rung.name)

            cap = self.plan.compile_cap if compiled and self.cuda else None
            # A slow compile must not cost the quality fit that follows at the large size.
            reserve = self.fit_estimate(size) if compiled and size == self.plan.large else 0.0
            self.runner.row(
                f"speed {size} px", rung.name, measure, estimate=self.estimate(size, compiled),
                skip=rung.skip, cap=cap, reserve=reserve,
            )  # fmt: skip

    def plain_row(self, size: int) -> None:
        def measure() -> dict:
            config = self.config()
            seconds, image = speed.plain_loop(
                self.problem(size), config, self.device, self.plan.warmup
            )
            row = self.speed_fields(size, "plain loop", 1, 1 / seconds, [image], False)
            row["options"] = "reference loop"
            self.plain[size] = row
            return row

        self.runner.row(f"speed {size} px", "plain loop", measure, estimate=self.estimate(size))

    def engine_row(self, size: int, options: EngineOptions, name: str, slots: int = 1) -> dict:
        problems = [self.problem(size) for _ in range(slots)]
        rate, images = speed.engine_run(
            problems, self.config(), self.device, options, self.plan.warmup
        )
        row = self.speed_fields(size, name, slots, rate, images, options.bf16)
        row["options"] = _options_text(options)
        self.engine[size, name], self.options[size, name] = row, options
        return row

    def speed_fields(self, size, variant, slots, rate, images, bf16) -> dict:
        clean = self.images[size, "astronaut"][0]
        quality = float(np.mean([psnr(image.cpu(), clean).item() for image in images]))
        problem = self.problem(size)
        p = problem.placement
        gflop = speed.step_gflop(problem.spec, p.padded_height, p.padded_width)
        measure = speed.Measure(size, variant, slots, rate, quality, gflop, bf16)
        peak = speed.peak_tflops(self.device, bf16)
        plain = self.plain.get(size, {})
        mfu = measure.mfu(peak)
        return {
            "size": size, "K": slots, "steps/s": rate,
            "images/h": measure.images_per_hour(),
            "x plain": _ratio(measure.images_per_hour(), plain.get("images/h")),
            "MFU %": None if mfu is None else 100 * mfu, "peak TFLOP/s": peak,
            "GFLOP/step": gflop, "PSNR": quality,
            "dB vs plain": _difference(quality, plain.get("PSNR")),
        }  # fmt: skip

    def estimate(self, size: int, compiled: bool = False) -> float:
        """Seconds a timed fit is expected to take, from the slowest rate seen at the size."""
        rates = [r["steps/s"] for r in [*self.plain_rows(size), *self.engine_rows(size)]]
        seconds = 1.5 * self.plan.steps / min(rates) + 5 if rates else 30.0
        return seconds + (self.plan.compile_seconds if compiled else 0.0)

    def plain_rows(self, size: int) -> list[dict]:
        return [self.plain[size]] if size in self.plain else []

    def engine_rows(self, size: int) -> list[dict]:
        return [row for (s, _), row in self.engine.items() if s == size and row.get("steps/s")]

    def best_eager(self) -> EngineOptions:
        """The fastest measured variant that needs no compile (the defaults if none ran)."""
        measured = {
            key: row["steps/s"]
            for key, row in self.engine.items()
            if key[0] == self.plan.large and not self.options[key].compile and row["K"] == 1
        }
        if not measured:
            return EngineOptions.fastest_for(self.device)
        return self.options[max(measured, key=measured.__getitem__)]

    # packing ---------------------------------------------------------------------------

    def packing(self, size: int) -> None:
        self.plain_row(size)
        options = self.best_eager()
        for slots in self.plan.slots:

            def measure(slots: int = slots) -> dict:
                return self.packed_row(size, options, slots)

            estimate = slots * self.estimate(size)
            self.runner.row(f"packing {size} px", f"packed K={slots}", measure, estimate=estimate)

    def packed_row(self, size: int, options: EngineOptions, slots: int) -> dict:
        row = self.engine_row(size, options, f"packed K={slots}", slots)
        single = self.engine.get((size, "packed K=1"), {})
        row["x K=1"] = _ratio(row["images/h"], single.get("images/h"))
        return row

    # quality ---------------------------------------------------------------------------

    def quality(self, size: int) -> None:
        """Full-length fits, fp32 and bf16 from the same seed, one image after another while
        the budget allows; then the verdict over the images measured."""
        differences: list[float] = []
        for name in speed.IMAGES:

            def measure(name: str = name) -> dict:
                return self.fit_pair(size, name)

            estimate = self.fit_estimate(size)
            stage, label = f"quality {size} px", f"fp32 vs bf16, {name}"
            row = self.runner.row(stage, label, measure, estimate=estimate)
            if row["status"] == "ok":
                differences.append(row["dB bf16 - fp32"])
        skip = None if differences else "no fit pair was measured"
        self.runner.row(f"quality {size} px", "verdict", lambda: _verdict(differences), skip=skip)

    def quality_arms(self) -> tuple[EngineOptions, EngineOptions]:
        """fp32 and bf16, the defaults otherwise: no graph, no compile, numerics only."""
        fp32 = EngineOptions(channels_last=self.cuda)
        return fp32, replace(fp32, bf16=True)

    def fit_pair(self, size: int, name: str) -> dict:
        clean = self.images[size, name][0]
        row: dict = {"size": size, "steps": self.plan.fit_steps}
        for label, options in zip(("fp32", "bf16"), self.quality_arms(), strict=True):
            started = time.perf_counter()
            config = self.config(self.plan.fit_steps)
            _, (image,) = speed.engine_run(
                [self.problem(size, name)], config, self.device, options, 0
            )
            row[f"PSNR {label}"] = psnr(image, clean).item()
            row[f"s {label}"] = time.perf_counter() - started
        row["dB bf16 - fp32"] = row["PSNR bf16"] - row["PSNR fp32"]
        if not self.cuda:
            row["note"] = "CPU autocast: the GPU run decides"
        return row

    def fit_estimate(self, size: int) -> float:
        """Seconds for one fit of each arm, from the ladder's rows of the same options."""
        seconds = 0.0
        for options in self.quality_arms():
            row = self.engine.get((size, Rung(options).name), {})
            rates = [r["steps/s"] for r in [*self.plain_rows(size), *self.engine_rows(size)]]
            rate = row.get("steps/s") or (min(rates) if rates else 10.0)
            seconds += 1.2 * self.plan.fit_steps / rate + 5
        return seconds


def _verdict(differences: list[float]) -> dict:
    mean = float(np.mean(differences))
    keeps = "yes" if mean >= -QUALITY_TOLERANCE_DB else "no"
    return {
        "bf16 keeps quality within 0.1 dB": keeps,
        "mean dB bf16 - fp32": mean,
        "worst dB": min(differences),
        "images": len(differences),
    }


def _ratio(value: float | None, reference: float | None) -> float | None:
    return value / reference if value is not None and reference else None


def _difference(value: float | None, reference: float | None) -> float | None:
    return value - reference if value is not None and reference is not None else None


SWITCHES = ("bf16", "channels_last", "cuda_graph", "compile")


def _options_text(options: EngineOptions) -> str:
    return ",".join(name for name in SWITCHES if getattr(options, name)) or "defaults off"


# -- the command --------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="rows.jsonl and table.md go here")
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET, help="wall seconds")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU (CI)")
    parser.add_argument("--device", help="default: cuda if there is one (the CPU in --smoke)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    budget = Budget(args.budget)  # counted from here: imports are already done
    device = torch.device(
        args.device or ("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    )
    plan = SMOKE if args.smoke else Plan()
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as the reference code sets it
    limit = raise_recompile_limit()
    log = RowLog(args.out, f"GPU checks on {speed.device_name(device)}")
    runner = Runner(log, budget)
    run = {"plan": "smoke" if args.smoke else "full", "budget s": args.budget}
    runner.row("env", "environment", lambda: {**environment(device, limit), **run}, budgeted=False)
    Checks(runner, plan, device).run()
    errors = sum(row["status"] == "error" for row in log.rows)
    print(
        f"\n{len(log.rows)} rows, {errors} errors, {args.budget - budget.left():.0f} s; {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
