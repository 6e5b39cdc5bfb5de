"""One fit's own state inside a packed engine: input, trace, averaging, stopping, rollback.

The trace stays on the device and is read back only at the slot's sync points (every
``sync_every`` steps). A step writes its trace entry, average and stopping statistic in place
at a device-side step index, and reads nothing back: the whole step can be replayed as one
CUDA graph (step_graph.py), and never waits for the device.

Divergence is checked at the sync points: a window with a non-finite energy, or whose
median (or its second half's, or at the end its last 3 steps') is ``divergence_ratio``
above the previous window's median, is thrown away whole, the slot's weights AND Adam state
are restored from its last good checkpoint, its learning rate is halved, and the fit
continues (the reference code keeps Adam's moments and still applies the bad step).
"""

from __future__ import annotations

import itertools
import math
import time

import torch

from .config import FitConfig, FitProgress, FitResult
from .engine import FlatAdam, PackedNetwork
from .inputs import jittered
from .metrics import psnr
from .stopping import VarianceStopper
from .tasks import Problem


class _Checkpoint:
    """A copy of everything a rollback of one slot must restore, kept on the device."""

    def __init__(self, slot: FitSlot, net: PackedNetwork, adam: FlatAdam) -> None:
        self.step = slot.step
        self.weights = net.slot_weights(slot.index)
        self.adam = adam.state(slot.index)
        self.average = None if slot.average is None else slot.average.clone()

    @torch.no_grad()
    def restore(self, slot: FitSlot, net: PackedNetwork, adam: FlatAdam) -> None:
        net.set_slot_weights(slot.index, self.weights)
        adam.load_state(slot.index, self.adam)
        if slot.average is not None and self.average is not None:
            slot.average.copy_(self.average)  # in place: a captured step graph reads it
        slot.step = self.step
        slot.step_index.fill_(self.step)


_SERIALS = itertools.count()
LAST_STEPS = 3  # the final window's last steps, judged on their own


def _diverged(
    window: torch.Tensor, level: float, first_step: int, cfg: FitConfig, final: bool = False
) -> bool:
    """True when a step's energy is non-finite, or the window's median sits more than
    ``divergence_ratio`` above ``level`` (the previous window's median: where the fit just
    was, as the reference compares with its previous check). A median, not any step: Adam's
    single-step spikes settle by themselves (large-hole inpainting has dozens per fit)."""
    if not bool(torch.isfinite(window).all()):
        return True
    checked = window[torch.arange(first_step, first_step + len(window)) >= cfg.divergence_warmup]
    # The whole window and its second half: a divergence late in the window moves only the
    # latter's median. The next window's first step catches one later still, but the final
    # window has no next one: there its last 3 steps are judged too (a median of 3: one
    # spike at the very end is not a divergence; a pre-image fit has them).
    tail = [checked[-LAST_STEPS:]] if final else []
    parts = [checked, checked[len(checked) // 2 :], *tail]
    return any(len(p) > 0 and float(p.median()) > cfg.divergence_ratio * level for p in parts)


def _bad_start(window: torch.Tensor, level: float, cfg: FitConfig) -> bool:
    """True when the window's first energy, that of the checkpoint's own weights, is bad:
    the update just before the checkpoint went wrong."""
    first = float(window[0])
    return not math.isfinite(first) or first > cfg.divergence_ratio * level


class FitSlot:
    def __init__(self, tag, problem: Problem, config: FitConfig, index: int, device, hooks):
        self.tag, self.problem, self.config, self.index = tag, problem, config, index
        self.serial = next(_SERIALS)  # unlike id(), never reused by a later slot
        self.callbacks, self.step_hook = hooks
        self.started = time.perf_counter()
        problem.to(device)
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(config.seed)
        self.z = problem.network_input(self.generator)
        n = config.iterations
        self.energies = torch.full((n,), float("nan"), device=device)
        self.psnrs = None
        if problem.reference is not None:
            self.psnrs = torch.full((n,), float("nan"), device=device)
        self.stop_stats = None
        # A cap too short for the rule to judge runs the fixed schedule.
        self.stop_rule = config.stop
        if self.stop_rule is not None and n < self.stop_rule.shortest_fit():
            self.stop_rule = None
        if self.stop_rule is not None:
            self.stop_stats = torch.full((n,), float("nan"), dtype=torch.float64, device=device)
        self.stopper: VarianceStopper | None = None  # set by start(), with the rule
        self.average: torch.Tensor | None = None  # the running average, where it averages
        # Steps done: on the host for the loop, on the device for what a step writes.
        self.step, self.rollbacks, self.level = 0, 0, float("inf")
        self.step_index = torch.zeros((), dtype=torch.long, device=device)
        # ``checkpoint`` starts the window being checked; its own energy is the window's
        # first entry, so it is trusted only once that window passes. ``trusted`` is the one
        # before it: where a rollback goes if the checkpoint itself was already diverged.
        self.checkpoint: _Checkpoint | None = None
        self.trusted: _Checkpoint | None = None

    def start(self, net: PackedNetwork, adam: FlatAdam) -> None:
        net.load_slot(self.index, self.config.seed)
        adam.reset_slot(self.index, self.config.lr)
        # Every buffer a step writes exists before the first step: a step graph needs them.
        p = self.problem.placement
        shape = (1, self.problem.spec.out_channels, p.height, p.width)
        crop = torch.zeros(shape, device=self.z.device, dtype=net.dtype)
        if self.config.exp_weight > 0:
            self.average = torch.zeros_like(crop)
        if self.stop_rule is not None:
            self.stopper = VarianceStopper(self.stop_rule, crop, self.problem.energy_floor)
        self.checkpoint = self.trusted = _Checkpoint(self, net, adam)

    @property
    def graphable(self) -> bool:
        """Whether this slot's step can be replayed as a CUDA graph: a step hook is Python
        that runs every step, with the host's step count."""
        return self.step_hook is None

    def graph_key(self) -> tuple:
        """What a captured step of this slot depends on besides its tensors: a change means
        capturing again (the stopping rule stops updating once it has decided)."""
        return (self.serial, self.stopper is None or self.stopper.decision is None)

    def network_input(self, net: PackedNetwork) -> torch.Tensor:
        if self.step_hook is not None:
            self.step_hook(self.step, net.slot_views(self.index))
        return jittered(self.z, self.config.reg_noise_std, self.generator)

    def energy(self, padded_output: torch.Tensor) -> torch.Tensor:
        return self.problem.data_energy(padded_output)

    @torch.no_grad()
    def write(self, padded_output: torch.Tensor, energy: torch.Tensor) -> None:
        """The device side of recording a step: trace, average, stopping statistic, all in
        place at ``step_index`` (no host read, no new tensor kept)."""
        crop = self.problem.placement.crop(padded_output)
        at = self.step_index.view(1)
        current = crop
        if self.average is not None:
            w = self.config.exp_weight
            first = self.step_index == 0
            self.average.copy_(torch.where(first, crop, self.average * w + crop * (1 - w)))
            current = self.average
        self.energies.index_copy_(0, at, energy.view(1).to(self.energies.dtype))
        reference = self.problem.reference
        if self.psnrs is not None and reference is not None:  # psnrs exist iff reference does
            self.psnrs.index_copy_(0, at, psnr(current, reference).view(1).to(self.psnrs.dtype))
        if self.stopper is not None and self.stop_stats is not None:  # both set or neither
            stat = self.stopper.update(self.step_index, crop, current, energy)
            self.stop_stats.index_copy_(0, at, stat.view(1))
        self.step_index.add_(1)

    @property
    def averaged(self) -> bool:
        """Whether the result is the running average (it exists once a step has run)."""
        return self.average is not None and self.step > 0

    def due(self) -> bool:
        return self.step % self.config.sync_every == 0 or self.step >= self.config.iterations

    def sync(self, net: PackedNetwork, adam: FlatAdam) -> str | None:
        """Check the window since the last checkpoint (one host read); the stop reason when
        the fit is over, None to go on."""
        assert self.checkpoint is not None and self.trusted is not None, "start() comes first"
        cfg, start = self.config, self.checkpoint.step
        window = self.energies[start : self.step].double().cpu()
        final = self.step >= cfg.iterations
        if _diverged(window, self.level, start, cfg, final) and self.rollbacks < cfg.max_rollbacks:
            # If the checkpoint's own weights had diverged, go back to the one before.
            target = self.trusted if _bad_start(window, self.level, cfg) else self.checkpoint
            target.restore(self, net, adam)
            self.checkpoint = target
            self.rollbacks += 1
            # Without input jitter the same steps would diverge the same way again.
            adam.lr[self.index] = cfg.lr * cfg.rollback_lr_factor**self.rollbacks
            if self.stopper is not None:
                self.stopper.forget_from(self.step)
            return None
        finite = window[torch.isfinite(window)]
        if len(finite):
            self.level = float(finite.median())
        self.trusted, self.checkpoint = self.checkpoint, _Checkpoint(self, net, adam)
        if self._notify(window):
            return "callback"
        # Asked even when not enforced: the rule then records where it would have stopped.
        if self.stopper is not None and self.stopper.should_stop(self.step) and cfg.stop_enforced:
            return "auto"
        return "iterations" if final else None

    def _notify(self, window: torch.Tensor) -> bool:
        if not self.callbacks:
            return False
        last_psnr = None if self.psnrs is None else float(self.psnrs[self.step - 1])
        progress = FitProgress(
            self.step, self.config.iterations, float(window[-1]), last_psnr,
            time.perf_counter() - self.started,
        )  # fmt: skip
        return any([bool(cb(progress)) for cb in self.callbacks])

    def _decision(self) -> tuple[int, int] | None:
        """(step count of the image the rule chose, steps run when it fired), or None."""
        if self.stopper is None or self.stopper.decision is None:
            return None
        chosen, fired = self.stopper.decision
        return chosen + 1, fired

    @torch.no_grad()
    def result(self, reason: str, final_output: torch.Tensor | None, device) -> FitResult:
        """The averaged output where the task averages, the image at the chosen step when the
        stopping rule fired, otherwise the output for the un-jittered input (not the last
        jittered one, which the reference code returns)."""
        n, decision = self.step, self._decision()
        stopped_at = n
        if reason == "auto":
            # Only the stopper says "auto", and only once it has decided.
            assert self.stopper is not None and decision is not None
            image, stopped_at = self.stopper.best_image, decision[0]
        elif self.averaged:
            assert self.average is not None
            image = self.average
        else:
            assert final_output is not None, "needed when there is no average"
            image = self.problem.placement.crop(final_output)
        energy = self.problem.energy(self.problem.operator(image), self.problem.data).item()
        ref = self.problem.reference
        return FitResult(
            image=image[0].float().cpu(),
            steps=torch.arange(n, dtype=torch.int64),
            energies=self.energies[:n].double().cpu(),
            psnrs=None if self.psnrs is None else self.psnrs[:n].double().cpu(),
            stop_stats=None if self.stop_stats is None else self.stop_stats[:n].cpu(),
            energy=energy,
            psnr=None if ref is None else psnr(image, ref).item(),
            iterations=n,
            seconds=time.perf_counter() - self.started,
            seed=self.config.seed,
            device=str(device),
            stopped_at=stopped_at,
            stop_reason=reason,
            rollbacks=self.rollbacks,
            stop_decision=decision,
        )
