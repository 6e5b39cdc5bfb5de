"""Several fits per GPU: one engine thread per worker process packs the fits of concurrent jobs.

A worker with ``--fits-per-gpu K`` accepts K jobs at once (K lanes, each a thread of the
Ray actor). Each lane loads its job's inputs and plans its fits, then hands them to the
shared :class:`PackedFitService`, whose single thread steps ``dip_core``'s PackedRunner:
every step advances all packed fits in one vmapped network, and a fit that ends frees its
slot for the next one. When a step itself fails (e.g. out of memory), every fit in the pack
fails with that error and the pack is rebuilt; other jobs are not affected.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass

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
        self.thread = threading.Thread(target=self._loop, name="packed-fits", daemon=True)
        self.thread.start()

    def run(self, items: list[FitItem]) -> list[FitResult]:
        """Fit every item (their tags are ignored) and return the results in order."""
        futures: list[Future[FitResult]] = [Future() for _ in items]
        for item, future in zip(items, futures, strict=True):
            item.tag = future
            self.inbox.put(item)
        return [future.result() for future in futures]

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
                self.waiting.popleft().tag.set_exception(error)
                continue
            try:
                self._deliver(self.runner.step())
            except Exception as error:  # the pack's step failed: fail its fits, go on
                for future in self.runner.abandon():
                    future.set_exception(error)

    def _admit(self) -> None:
        while self.waiting:
            taken, finished = self.runner.offer(self.waiting[0])
            self._deliver(finished)
            if not taken:
                return
            self.waiting.popleft()

    @staticmethod
    def _deliver(finished: list[tuple[Future, FitResult]]) -> None:
        for future, result in finished:
            future.set_result(result)
