"""A fit's step never waits for the device: no host read, no host-made tensor per step.

On CUDA each of these is a stream synchronisation (``.item()``, ``bool(t)``, ``float(t)``,
boolean-mask indexing, ``torch.tensor(...)`` uploads), which stalls the GPU every step and
makes a CUDA graph of the step impossible. On a CPU nothing syncs, so the ops that would are
counted at the dispatcher instead; steps whose slot reads its trace back (sync points) are
left out. The CUDA version with ``torch.cuda.set_sync_debug_mode`` is in test_core_gpu.py.
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dip_core import FitConfig, build_problem
from dip_core.fit import FitItem, PackedRunner
from dip_core.stopping import StopRule

torch.set_num_threads(1)
SMALL = {"channels": 8, "depth": 3, "input_depth": 4}
STEPS = 24

# aten ops that read a value back to the host (or need its size) on CUDA.
HOST_READS = {"_local_scalar_dense", "nonzero", "masked_select", "equal", "is_nonzero",
              "lift_fresh", "_unique2", "unique_consecutive"}  # fmt: skip


class HostReads(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        # repeat_interleave must be told its output size, or it reads the repeats back.
        sized = name != "repeat_interleave" or kwargs.get("output_size") is not None
        if name in HOST_READS or not sized or _boolean_index(name, args):
            self.seen.append(name)
        return func(*args, **kwargs)


def _boolean_index(name: str, args) -> bool:
    """Indexing with a boolean mask: on CUDA it counts the mask's True values first."""
    if name not in ("index", "index_put", "index_put_") or len(args) < 2:
        return False
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1])


def _image(size=16, channels=3, seed=0):
    return torch.rand(channels, size, size, generator=torch.Generator().manual_seed(seed))


def _problems() -> dict:
    mask = (_image(seed=5)[:1] > 0.3).float()
    return {
        "denoise": build_problem("denoise", _image(), reference=_image(seed=1), params=SMALL),
        "inpaint": build_problem("inpaint", _image(), mask=mask, params=SMALL),
        "super_resolution": build_problem("super_resolution", _image(8), scale=2, params=SMALL),
        "jpeg": build_problem("jpeg", _image(), params=SMALL),
        "flash_no_flash": build_problem(
            "flash_no_flash", _image(), guide=_image(seed=2), params={"channels": 8, "depth": 3}
        ),
        "deblur": build_problem("deblur", _image(), params={**SMALL, "blur_sigma": 1.0}),
    }


@pytest.mark.parametrize("task", list(_problems()))
def test_no_step_reads_the_device_back(task):
    """Two packed fits with every per-step feature on: input jitter, averaging, the PSNR
    trace where there is a reference, and the stopping rule's statistic."""
    rule = StopRule(window=3, patience=5)
    config = FitConfig(STEPS, 0.01, 0.03, 0.9, sync_every=STEPS, stop=rule, stop_enforced=False)
    runner = PackedRunner(2, "cpu")
    for seed in (0, 1):
        taken, _ = runner.offer(FitItem(seed, _problems()[task], config))
        assert taken
    per_step = []
    for step in range(1, STEPS + 1):
        counter = HostReads()
        with counter:
            finished = runner.step()
        if step < STEPS:  # the last step is the sync point: it reads the trace back
            per_step.append(counter.seen)
    assert len(finished) == 2
    assert all(not seen for seen in per_step), [s for s in per_step if s][:1]


def test_the_counter_sees_a_host_read():
    """The check above could fail: a step with ``.item()`` in it is caught."""
    counter = HostReads()
    with counter:
        torch.ones(3).sum().item()
        torch.tensor([1.0, 2.0])
        torch.arange(4)[torch.arange(4) > 1]
        torch.zeros(2, 2).repeat_interleave(torch.tensor([1, 2]), dim=0)
    assert {"_local_scalar_dense", "lift_fresh", "index", "repeat_interleave"} <= set(counter.seen)
