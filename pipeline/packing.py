"""Several fits per GPU: one engine thread per worker process packs the fits of concurrent jobs.

A worker with ``--fits-per-gpu K`` accepts K jobs at once (K lanes, each a thread of the
Ray actor). Each lane loads its job's inputs and plans its fits, then hands them to the
shared :class:`PackedFitService`, whose single thread steps ``dip_core``'s PackedRunner:
every step advances all packed fits in one grouped network, and a fit that ends frees its
slot for the next one. When a step itself fails (e.g. out of memory), every fit in the pack
fails with that error and the pack is rebuilt; other jobs are not affected.

Occupancy: each step counts the fits it advanced and the slots its pack has (``stats()``);
the run reports their ratio summed over all steps and workers (``summarize``, run.json's
``packing``). Fits of other buckets only join once the pack drains, so a mixed-size stream fed
in manifest order keeps packs part empty; the scheduler's look-ahead (lookahead.py) fixes that.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections import deque
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass
from typing import Any

import torch

from dip_core import FitItem, FitResult, PackedRunner, resolve_device, slots_that_fit


@dataclass(frozen=True)
class PackingConfig:
    lanes: int  # the worker's lanes: an upper bound on the fits packed together
    device: str | None = None


def _memory_limited_slots(device: torch.device):
    """On CUDA, cap each new pack by what its bucket needs per fit and the free memory."""
    if device.type != "cuda":
        return None

    def slots_for(item: FitItem, limit: int) -> int:
        free, _ = torch.cuda.mem_get_info(device)
        _, height, width = item.bucket
        return slots_that_fit(item.problem.spec, height, width, free, limit)

    return slots_for


class PackedFitService:
    """A background thread that runs the fits submitted by any thread, packed."""

    def __init__(self, config: PackingConfig) -> None:
        device = resolve_device(config.device)
        self.runner = PackedRunner(config.lanes, device, slots_for=_memory_limited_slots(device))
        self.inbox: queue.Queue[FitItem] = queue.Queue()
        self.waiting: deque[FitItem] = deque()
        self.steps = 0  # steps that advanced at least one fit
        self.fit_steps = 0  # fits advanced, summed over those steps
        self.slot_steps = 0  # slots of the pack, summed over those steps
        self.thread = threading.Thread(target=self._loop, name="packed-fits", daemon=True)
        self.thread.start()

    def run(self, items: list[FitItem]) -> list[FitResult]:
        """Fit every item (their tags are ignored) and return the results in order. When
        one fails, the others not yet started are dropped (a job's tiles, say: the job has
        failed); those already running stop when their callbacks say so (worker.py)."""
        futures: list[Future[FitResult]] = [Future() for _ in items]
        for item, future in zip(items, futures, strict=True):
            item.tag = future
            self.inbox.put(item)
        try:
            return [future.result() for future in futures]
        except BaseException:
            for future in futures:
                future.cancel()  # a no-op once it has a result
            raise

    def _loop(self) -> None:
        while True:
            block = not self.runner.busy and not self.waiting
            try:
                self.waiting.append(self.inbox.get(block=block))
                while True:
                    self.waiting.append(self.inbox.get_nowait())
            except queue.Empty:
                pass
            try:
                self._admit()
            except Exception as error:  # this item could not join a pack: it alone fails
                _fail(self.waiting.popleft().tag, error)
                continue
            self._count_step()
            try:
                self._deliver(self.runner.step())
            except Exception as error:  # the pack's step failed: fail its fits, go on
                for future in self.runner.abandon():
                    _fail(future, error)

    def _count_step(self) -> None:
        pack = self.runner.pack
        if pack is None or not self.runner.busy:
            return
        self.fit_steps += len(pack.active)
        self.slot_steps += len(pack.slots)
        self.steps += 1

    def stats(self) -> dict[str, Any]:
        """Steps run so far, fits and slots summed over them, and the lanes (see summarize)."""
        return {
            "steps": self.steps,
            "fit_steps": self.fit_steps,
            "slot_steps": self.slot_steps,
            "lanes": self.runner.max_slots,
        }

    def _admit(self) -> None:
        while self.waiting:
            if self.waiting[0].tag.cancelled():  # its caller has given up on it
                self.waiting.popleft()
                continue
            taken, finished = self.runner.offer(self.waiting[0])
            self._deliver(finished)
            if not taken:
                return
            self.waiting.popleft()

    @staticmethod
    def _deliver(finished: list[tuple[Future, FitResult]]) -> None:
        for future, result in finished:
            with contextlib.suppress(InvalidStateError):  # cancelled meanwhile: unwanted
                future.set_result(result)


def _fail(future: Future, error: BaseException) -> None:
    with contextlib.suppress(InvalidStateError):  # cancelled meanwhile: unwanted
        future.set_exception(error)


def summarize(stats: list[dict[str, Any]]) -> dict[str, Any] | None:
    """run.json's ``packing`` from the workers' ``stats()``: ``mean_occupancy``, the share of
    pack slots that held a fit, over every step of every worker (1.0: packs always full;
    a pack capped by GPU memory counts its own slots, not the lanes); ``mean_fits``, fits
    per step; ``steps``; ``workers`` that reported. None when no worker packs."""
    if not stats:
        return None
    steps = sum(s["steps"] for s in stats)
    fits = sum(s["fit_steps"] for s in stats)
    slots = sum(s["slot_steps"] for s in stats)
    return {
        "mean_occupancy": round(fits / slots, 4) if slots else None,
        "mean_fits": round(fits / steps, 4) if steps else None,
        "steps": steps,
        "workers": len(stats),
        "lanes": max(s["lanes"] for s in stats),
    }
