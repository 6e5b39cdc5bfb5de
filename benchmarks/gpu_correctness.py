"""The engine's CUDA-only promises: no step syncs the stream, the whole-step graph replays the
eager step, and every switch fits. Each check returns a row's fields and raises when the
promise is broken. The GPU script runs them first (a bare GPU machine may lack pytest) and
tests/core/test_core_gpu.py runs the same functions where CUDA exists."""

from __future__ import annotations

from dataclasses import replace

import torch

from dip_core import EngineOptions, FitConfig, build_problem
from dip_core.fit import FitItem, PackedRunner, fit_many
from dip_core.stopping import StopRule

SIZE = 64
PARAMS = {"channels": 32, "depth": 4, "input_depth": 8}
# A stopping rule short enough to decide within these fits: its statistic runs every step,
# and its decision changes what a captured step does (a new capture).
RULE = StopRule(window=5, patience=10)


def _problem(seed: int, size: int = SIZE):
    clean = torch.rand(3, size, size, generator=torch.Generator().manual_seed(seed))
    return build_problem("denoise", clean, reference=clean, params=PARAMS)


def no_step_syncs(device: torch.device) -> dict:
    """28 steps of 2 packed fits, with every per-step feature on, under CUDA's sync
    detector ("error": a sync raises)."""
    steps = 30
    config = FitConfig(steps, 0.01, 0.03, 0.99, sync_every=steps, stop=RULE, stop_enforced=False)
    runner = PackedRunner(2, device)
    for seed in (0, 1):
        runner.offer(FitItem(seed, _problem(seed), config))
    runner.step()  # lazy set-up (cuDNN, the allocator) may sync once
    torch.cuda.synchronize(device)
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(steps - 2):
            runner.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    finished = runner.step()
    if len(finished) != 2:
        raise AssertionError(f"{len(finished)} of 2 fits finished")
    return {"steps checked": steps - 2, "syncs": 0}


def graph_matches_eager(device: torch.device) -> dict:
    """Three fits through 2 slots (a refill and the stopping rule's decisions: new
    captures), the same switches both ways, no input jitter so both runs draw the same
    numbers: the largest relative energy difference over the traces."""
    lengths = (60, 30, 45)
    eager = EngineOptions.fastest_for(device)

    def items() -> list[FitItem]:
        return [
            FitItem(i, _problem(i), FitConfig(n, 0.01, 0.0, 0.99, seed=i, sync_every=10,
                                              stop=RULE, stop_enforced=False))
            for i, n in enumerate(lengths)
        ]  # fmt: skip

    expected = dict(fit_many(items(), slots=2, device=device, options=eager))
    runner = PackedRunner(2, device, replace(eager, cuda_graph=True))
    graphed = dict(fit_many(items(), runner=runner))
    captures = runner.pack.graph.captures if runner.pack and runner.pack.graph else 0
    worst = max(
        float(((graphed[i].energies - expected[i].energies).abs() / expected[i].energies).max())
        for i in range(len(lengths))
    )
    if captures < 2 or worst > 1e-3:
        raise AssertionError(f"captures {captures}, worst relative energy difference {worst:.3g}")
    return {"captures": captures, "max rel energy diff": worst}


SWITCHES = {
    "channels_last": EngineOptions(channels_last=True),
    "bf16": EngineOptions(bf16=True, channels_last=True),
    "cuda_graph": EngineOptions(cuda_graph=True, channels_last=True),
    "bf16 + cuda_graph": EngineOptions(bf16=True, channels_last=True, cuda_graph=True),
    "checkpointing + cuda_graph": EngineOptions(checkpointing=True, cuda_graph=True),
    "packed K=2 cuda_graph": EngineOptions(cuda_graph=True, channels_last=True),
}


def switch_fits(device: torch.device, name: str, size: int = SIZE) -> dict:
    """60 jittered steps with the switch on: the energy falls and the image is finite."""
    slots = 2 if name.startswith("packed") else 1
    config = FitConfig(60, 0.01, 0.03, 0.99, sync_every=20)
    items = [FitItem(i, _problem(i, size), config) for i in range(slots)]
    results = dict(fit_many(items, slots=slots, device=device, options=SWITCHES[name]))
    first = max(float(r.energies[0]) for r in results.values())
    last = max(float(r.energies[-1]) for r in results.values())
    for result in results.values():
        if not result.energies[-1] < result.energies[0] or not torch.isfinite(result.image).all():
            raise AssertionError(f"energy {result.energies[0]:.4g} -> {result.energies[-1]:.4g}")
    return {"energy first": first, "energy last": last, "fits": len(results)}
