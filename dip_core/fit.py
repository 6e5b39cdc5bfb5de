"""The fitting loop: K fits of one shape bucket advance together, step by step.

``fit`` runs one problem; ``fit_many`` streams many through ``slots`` packed slots on one
device, refilling a slot as soon as its fit ends. Fits only share a pack when their
networks and padded sizes match (a bucket); a job of another bucket waits until the pack
drains. Each slot behaves exactly as a lone fit with the same seed would.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .config import FitConfig, FitProgress, FitResult
from .engine import EngineOptions, FlatAdam, PackedNetwork
from .slot import FitSlot
from .step_graph import StepGraph
from .tasks import Problem

Callback = Callable[[FitProgress], "bool | None"]
StepHook = Callable[[int, list[torch.Tensor]], None]  # (step, views of the slot's weights)

__all__ = [
    "FitConfig", "FitItem", "FitProgress", "FitResult", "PackedRunner", "fit", "fit_many",
]  # fmt: skip


@dataclass
class FitItem:
    tag: Any  # the caller's handle, returned with the result
    problem: Problem
    config: FitConfig
    callbacks: Sequence[Callback] = ()
    step_hook: StepHook | None = None
    bucket: tuple = field(init=False)

    def __post_init__(self) -> None:
        p = self.problem.placement
        self.bucket = (self.problem.spec, p.padded_height, p.padded_width)


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def fit(
    problem: Problem,
    config: FitConfig,
    *,
    device: str | torch.device | None = None,
    callbacks: Sequence[Callback] = (),
    step_hook: StepHook | None = None,
    options: EngineOptions | None = None,
) -> FitResult:
    """Fit a fresh, seeded network to one problem."""
    item = FitItem(None, problem, config, callbacks, step_hook)
    return next(fit_many([item], slots=1, device=device, options=options))[1]


def fit_many(
    items: Iterable[FitItem],
    *,
    slots: int = 1,
    device: str | torch.device | None = None,
    options: EngineOptions | None = None,
    runner: PackedRunner | None = None,
) -> Iterator[tuple[Any, FitResult]]:
    """Yield (tag, result) for every item, as fits finish (not in input order). ``runner``:
    one to run them in (then ``slots``, ``device`` and ``options`` are its own)."""
    runner = runner or PackedRunner(slots, device, options)
    queue = iter(items)
    waiting = next(queue, None)
    while waiting is not None or runner.busy:
        while waiting is not None:
            taken, finished = runner.offer(waiting)
            yield from finished
            if not taken:
                break
            waiting = next(queue, None)
        yield from runner.step()


class PackedRunner:
    """Packing for a stream of fits: ``offer`` items as they come, ``step`` while busy.

    An item joins the current pack when a slot is free and its bucket matches; an item of
    another bucket is refused until the pack has drained, and then starts a new pack.
    ``slots_for`` may shrink a new pack (e.g. to what fits in GPU memory).
    """

    def __init__(self, slots: int, device=None, options: EngineOptions | None = None,
                 slots_for: Callable[[FitItem, int], int] | None = None):  # fmt: skip
        self.max_slots = max(1, slots)
        self.device = resolve_device(device)
        self.options = options or EngineOptions.fastest_for(self.device)
        self.slots_for = slots_for
        self.pack: _Pack | None = None
        self.bucket: tuple | None = None

    @property
    def busy(self) -> bool:
        return self.pack is not None and bool(self.pack.active)

    def offer(self, item: FitItem) -> tuple[bool, list[tuple[Any, FitResult]]]:
        """(taken, results of fits that ended at once, e.g. zero iterations)."""
        pack = self.pack
        if pack is not None and pack.active:
            if item.bucket != self.bucket or not pack.has_room():
                return False, []
        elif pack is None or item.bucket != self.bucket:  # no pack has no bucket either
            slots = self.slots_for(item, self.max_slots) if self.slots_for else self.max_slots
            pack = self.pack = _Pack(item.problem.spec, max(1, slots), self.device, self.options)
            self.bucket = item.bucket
        return True, list(pack.add(item))

    def step(self) -> list[tuple[Any, FitResult]]:
        pack = self.pack
        return list(pack.step()) if pack is not None and pack.active else []

    def abandon(self) -> list[Any]:
        """Drop every running fit (after an error in a step); returns their tags."""
        tags = [] if self.pack is None else [slot.tag for slot in self.pack.active]
        self.pack, self.bucket = None, None
        return tags


class _Pack:
    def __init__(self, spec, slots: int, device: torch.device, options: EngineOptions):
        self.device = device
        self.net = PackedNetwork(spec, slots, device, options)
        self.adam = FlatAdam(self.net)
        self.slots: list[FitSlot | None] = [None] * slots
        self.idle_input: torch.Tensor | None = None
        graphed = options.cuda_graph and device.type == "cuda"
        self.graph = StepGraph(device) if graphed else None

    @property
    def active(self) -> list[FitSlot]:
        return [s for s in self.slots if s is not None]

    def has_room(self) -> bool:
        return None in self.slots

    def add(self, item: FitItem) -> Iterator[tuple[Any, FitResult]]:
        index = self.slots.index(None)
        slot = FitSlot(item.tag, item.problem, item.config, index, self.device,
                       (item.callbacks, item.step_hook))  # fmt: skip
        if self.idle_input is None:  # once per pack: a captured step reads it
            self.idle_input = torch.zeros_like(slot.z)
        slot.start(self.net, self.adam)
        if item.config.iterations <= 0:
            yield item.tag, slot.result("iterations", self._final_output(slot), self.device)
            self.adam.release_slot(index)
            return
        self.slots[index] = slot

    def step(self) -> Iterator[tuple[Any, FitResult]]:
        active = self.active
        if self.graph is not None and all(slot.graphable for slot in active):
            signature = tuple(None if s is None else s.graph_key() for s in self.slots)
            generators = [s.generator for s in active if s.config.reg_noise_std > 0]
            self.graph.run(self._advance, signature, generators)
        else:
            if self.graph is not None:  # a step hook joined: the captured step is stale
                self.graph.reset()
            self._advance()
        for slot in active:
            slot.step += 1
        for slot in active:
            if slot.due():
                reason = slot.sync(self.net, self.adam)
                if reason is not None:
                    yield slot.tag, slot.result(reason, self._final_output(slot), self.device)
                    self.slots[slot.index] = None
                    self.adam.release_slot(slot.index)

    def _advance(self) -> None:
        """The device side of one step of every slot: no host read, everything written in
        place (what a CUDA graph replays)."""
        idle = self._idle()
        inputs = [s.network_input(self.net) if s else idle for s in self.slots]
        out = self.net(torch.stack(inputs))
        energies = [s.energy(out[s.index]) for s in self.active]
        self.net.zero_grad()
        torch.stack(energies).sum().backward()
        self.adam.step()
        for slot, energy in zip(self.active, energies, strict=True):
            slot.write(out[slot.index].detach(), energy.detach())

    @torch.no_grad()
    def _final_output(self, slot: FitSlot) -> torch.Tensor | None:
        """The network's output for the slot's un-jittered input (only when needed)."""
        if slot.averaged:
            return None
        idle = self._idle()
        inputs = [slot.z if i == slot.index else idle for i in range(len(self.slots))]
        return self.net(torch.stack(inputs))[slot.index]

    def _idle(self) -> torch.Tensor:
        """The input of a free slot (zeros of the bucket's input shape)."""
        assert self.idle_input is not None, "add() sets it before any step"
        return self.idle_input
