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
from .tasks import Problem

Callback = Callable[[FitProgress], "bool | None"]
StepHook = Callable[[int, torch.Tensor], None]  # (step, the slot's flat weights)

__all__ = ["FitConfig", "FitItem", "FitProgress", "FitResult", "fit", "fit_many"]


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
) -> Iterator[tuple[Any, FitResult]]:
    """Yield (tag, result) for every item, as fits finish (not in input order)."""
    dev = resolve_device(device)
    options = options or EngineOptions.fastest_for(dev)
    queue = iter(items)
    waiting = next(queue, None)
    while waiting is not None:
        pack = _Pack(waiting.problem.spec, slots, dev, options)
        bucket = waiting.bucket
        while True:
            while waiting is not None and waiting.bucket == bucket and pack.has_room():
                yield from pack.add(waiting)
                waiting = next(queue, None)
            if not pack.active:
                break
            yield from pack.step()


class _Pack:
    def __init__(self, spec, slots: int, device: torch.device, options: EngineOptions):
        self.device = device
        self.net = PackedNetwork(spec, slots, device, options)
        self.adam = FlatAdam(self.net.flat)
        self.slots: list[FitSlot | None] = [None] * slots
        self.idle_input: torch.Tensor | None = None

    @property
    def active(self) -> list[FitSlot]:
        return [s for s in self.slots if s is not None]

    def has_room(self) -> bool:
        return None in self.slots

    def add(self, item: FitItem) -> Iterator[tuple[Any, FitResult]]:
        index = self.slots.index(None)
        slot = FitSlot(item.tag, item.problem, item.config, index, self.device,
                       (item.callbacks, item.step_hook))  # fmt: skip
        self.idle_input = torch.zeros_like(slot.z)
        slot.start(self.net, self.adam)
        if item.config.iterations <= 0:
            yield item.tag, slot.result("iterations", self._final_output(slot), self.device)
            self.adam.release_slot(index)
            return
        self.slots[index] = slot

    def step(self) -> Iterator[tuple[Any, FitResult]]:
        inputs = [s.network_input(self.net) if s else self.idle_input for s in self.slots]
        out = self.net(torch.stack(inputs))
        energies = [s.energy(out[s.index]) for s in self.active]
        torch.stack(energies).sum().backward()
        self.adam.step()
        for slot, energy in zip(self.active, energies, strict=True):
            slot.record(out[slot.index].detach(), energy.detach())
        for slot in self.active:
            if slot.due():
                reason = slot.sync(self.net, self.adam)
                if reason is not None:
                    yield slot.tag, slot.result(reason, self._final_output(slot), self.device)
                    self.slots[slot.index] = None
                    self.adam.release_slot(slot.index)

    @torch.no_grad()
    def _final_output(self, slot: FitSlot) -> torch.Tensor | None:
        """The network's output for the slot's un-jittered input (only when needed)."""
        if slot.average is not None:
            return None
        inputs = [slot.z if i == slot.index else self.idle_input for i in range(len(self.slots))]
        return self.net(torch.stack(inputs))[slot.index]
