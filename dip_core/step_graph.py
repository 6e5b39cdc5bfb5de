"""A pack's whole step (forward, backward, Adam, the trace write) replayed as one CUDA graph.

A DIP step at small and mid sizes costs more in kernel launches than in arithmetic: ~170
launches for the network and hundreds more for the optimiser, the energies and the trace.
Captured once, a step is one graph launch. Capture needs a step that reads nothing back
and keeps every tensor it writes at a fixed address, which the engine's step is built to be
(slot.py writes in place at a device-side step index; FlatAdam updates flat buffers in place).

The step is captured again whenever what it depends on besides its tensors changes: a slot
is filled or freed, or a stopping rule decides (``signature``). Before each capture a few
steps run eagerly on a side stream (autograd and cuDNN set themselves up lazily, which a
capture must not see); they are real steps of the fit, not extra ones.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence

import torch

WARMUP_STEPS = 3  # eager steps before a capture, as the PyTorch CUDA graph notes advise


class StepGraph:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.pool = torch.cuda.graph_pool_handle()  # one memory pool for every capture
        self.signature: Hashable = None
        self.warm = 0
        self.captures = 0  # how many times a step was captured (for tests and benchmarks)

    def run(
        self, step: Callable[[], None], signature: Hashable, generators: Sequence[torch.Generator]
    ) -> None:
        """Run one step: eagerly while warming up for ``signature``, then by replay.
        ``generators``: the random generators the step draws from (their state advances
        with each replay)."""
        if signature != self.signature:
            self.reset()
            self.signature = signature
        if self.graph is None and self.warm < WARMUP_STEPS:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.stream):
                step()
            torch.cuda.current_stream(self.device).wait_stream(self.stream)
            self.warm += 1
            return
        if self.graph is None:
            self.graph = self._capture(step, generators)
        self.graph.replay()

    def _capture(
        self, step: Callable[[], None], generators: Sequence[torch.Generator]
    ) -> torch.cuda.CUDAGraph:
        graph = torch.cuda.CUDAGraph()
        for generator in generators:  # a fit's own generator, not the device's default one
            graph.register_generator_state(generator)
        # thread_local: a worker's other threads (progress, memory checks) may use CUDA
        # while this one captures.
        with torch.cuda.graph(
            graph, pool=self.pool, stream=self.stream, capture_error_mode="thread_local"
        ):
            step()  # recorded, not run: the replay that follows runs it
        self.captures += 1
        return graph

    def reset(self) -> None:
        if self.graph is not None:
            self.graph.reset()
        self.graph, self.signature, self.warm = None, None, 0
