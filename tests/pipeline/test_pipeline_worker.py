"""The Fitter in-process (no Ray): outputs, traces, alpha, 16-bit, and every per-job failure."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.images import decode_image, encode_png
from pipeline.manifest import job_from_row
from pipeline.storage import Storage
from pipeline.worker import Fitter, WorkerConfig
from tests.support.builders import TINY_PARAMS, tiny_image, write_png


@pytest.fixture
def fitter(tmp_path) -> Fitter:
    return Fitter(WorkerConfig(out=str(tmp_path / "out"), device="cpu", sync_every=5))


def _job(image: str | None = None, **fields):
    row = {"id": "j", "task": "denoise", "image": image, "iterations": 10, "params": TINY_PARAMS}
    return job_from_row({**row, **fields}, 0)


def test_denoise_job_writes_png_row_and_trace(fitter, tmp_path):
    image = write_png(tmp_path / "in.png", tiny_image(0))
    outcome = fitter.run(_job(image, reference=image, seed=5), attempt=2)
    row = outcome.row
    assert row["status"] == "ok" and row["error"] is None, row
    assert (row["iterations"], row["attempts"], row["seed"], row["device"]) == (10, 2, 5, "cpu")
    assert row["psnr"] is not None and row["energy"] > 0 and row["seconds"] > 0
    assert outcome.trace["step"] == list(range(10))
    assert len(outcome.trace["psnr"]) == 10 and None not in outcome.trace["psnr"]
    written = decode_image(Storage().read_bytes(row["output"]))
    assert written.pixels.shape == (3, 24, 24) and written.bit_depth == 8


def test_alpha_and_16_bit_pass_through_and_sr_is_hr_size(fitter, tmp_path):
    alpha = np.tile(np.linspace(0, 1, 16, dtype=np.float32), (16, 1))
    image = write_png(tmp_path / "in.png", tiny_image(1, 16, 1), alpha, bits=16)
    row = fitter.run(_job(image, task="super_resolution", scale=2)).row
    assert row["status"] == "ok", row
    written = decode_image(Storage().read_bytes(row["output"]))
    assert written.bit_depth == 16 and written.pixels.shape == (1, 32, 32)
    assert written.alpha is not None and written.alpha.shape == (32, 32)
    row = fitter.run(_job(image, id="same-size")).row
    kept = decode_image(Storage().read_bytes(row["output"])).alpha
    assert np.abs(kept - alpha).max() < 1e-4  # alpha unchanged


def test_inpaint_and_flash_jobs_use_their_companion_files(fitter, tmp_path):
    image = write_png(tmp_path / "in.png", tiny_image(2))
    mask = write_png(tmp_path / "m.png", (tiny_image(3, 24, 1) > 0.5).astype(np.float32))
    assert fitter.run(_job(image, task="inpaint", mask=mask)).row["status"] == "ok"
    guide = write_png(tmp_path / "flash.png", tiny_image(4, 24, 1))  # grey guide, colour image
    flash = _job(image, task="flash_no_flash", guide=guide, params='{"channels": 8, "depth": 3}')
    assert fitter.run(flash).row["status"] == "ok"


def test_deblur_jobs_take_their_kernel_from_params(fitter, tmp_path):
    image = write_png(tmp_path / "in.png", tiny_image(5))
    params = '{"channels": 8, "depth": 3, "input_depth": 8, "motion_length": 5}'
    row = fitter.run(_job(image, task="deblur", params=params)).row
    assert row["status"] == "ok", row
    row = fitter.run(_job(image, id="no-kernel", task="deblur")).row
    assert row["status"] == "failed" and "deblur needs params.blur_sigma" in row["error"]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"image": "{tmp}/missing.png"}, "image not found: {tmp}/missing.png"),
        ({"image": "{tmp}/corrupt.png"}, "not a readable image"),
        ({"task": "inpaint", "mask": "{tmp}/small.png"}, "is 16x16 pixels, expected 24x24"),
        ({"task": "flash_no_flash", "guide": "{tmp}/small.png", "params": "{}"}, "guide {tmp}"),
        ({"reference": "{tmp}/small.png"}, "reference"),
        ({"task": "upscale"}, "unknown task 'upscale'"),
        ({"params": '{"lr": "fast"}'}, "lr"),
        ({"params": "not json"}, "params is not valid JSON"),
        ({"task": "super_resolution", "scale": 3}, "scale"),
    ],
)
def test_bad_jobs_become_failed_rows_with_clear_errors(fitter, tmp_path, fields, message):
    good = write_png(tmp_path / "good.png", tiny_image(0))
    write_png(tmp_path / "small.png", tiny_image(0, 16))
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    fields = {
        k: v.replace("{tmp}", str(tmp_path)) if k != "scale" else v for k, v in fields.items()
    }
    outcome = fitter.run(_job(**{"image": good, **fields}))
    row = outcome.row
    assert row["status"] == "failed" and row["attempts"] == 1
    assert message.replace("{tmp}", str(tmp_path)) in row["error"], row["error"]
    assert outcome.trace["step"] == [] and row.get("output") is None


def test_memory_uris_work_in_process():
    storage = Storage()
    storage.write_bytes("memory://w/in.png", encode_png(tiny_image(5)))
    fitter = Fitter(WorkerConfig(out="memory://w/out", device="cpu"))
    row = fitter.run(_job("memory://w/in.png")).row
    assert row["status"] == "ok" and row["output"].startswith("memory://w/out/images/")
    assert storage.exists(row["output"])


def test_a_fit_that_runs_out_of_memory_is_refitted_with_checkpointing(
    fitter, tmp_path, monkeypatch, caplog
):
    from tests.support.worker_faults import FAULT_OOM_JOB

    image = write_png(tmp_path / "in.png", tiny_image(0))
    monkeypatch.setenv(FAULT_OOM_JOB, "j")
    with caplog.at_level("WARNING", logger="dippipe"):
        row = fitter.run(_job(image)).row
    assert row["status"] == "ok" and row["iterations"] == 10, row
    assert "ran out of memory" in caplog.text and "activation checkpointing" in caplog.text


def test_preimage_jobs_use_the_feature_layer_and_weights_they_ask_for(fitter, tmp_path):
    import json

    import torch

    image = write_png(tmp_path / "in.png", tiny_image(5, 32))
    small = {"channels": 8, "depth": 3, "input_depth": 4}
    row = fitter.run(_job(image, task="preimage", params=json.dumps(small))).row
    assert row["status"] == "ok", row
    scripted = torch.jit.script(torch.nn.Conv2d(3, 4, 3))  # a user's own TorchScript Phi
    scripted.save(str(tmp_path / "phi.pt"))
    custom = {**small, "feature_weights": str(tmp_path / "phi.pt"), "feature_layer": 4}
    row = fitter.run(_job(image, id="own", task="preimage", params=json.dumps(custom))).row
    assert row["status"] == "ok", row
    assert set(fitter.feature_nets.loaded) == {(None, 12), (str(tmp_path / "phi.pt"), 4)}
    missing = {**small, "feature_weights": str(tmp_path / "nope.pt")}
    row = fitter.run(_job(image, id="gone", task="preimage", params=json.dumps(missing))).row
    assert row["status"] == "failed" and "not found" in row["error"]


def test_progress_beats_while_inputs_are_read_and_the_output_written(fitter, tmp_path):
    """The driver's stall check sees these beats even before the first fit step."""
    image = write_png(tmp_path / "in.png", tiny_image(0, 16))
    seen: list = []
    original = fitter.write_output

    def write_output(*args):
        seen.append(dict(fitter.progress))
        return original(*args)

    fitter.write_output = write_output  # type: ignore[method-assign]
    before = fitter.beats
    assert fitter.run(_job(image, iterations=5, reference=image)).ok
    assert seen and seen[0]["id"] == "j" and seen[0]["beat"] > before
    assert fitter.beats >= before + 4  # start, two reads, the steps, the write
    assert fitter.progress == {}  # cleared when the job ends


@pytest.mark.parametrize(
    ("device", "gpus", "nvidia_files", "fails"),
    [
        (None, [0], ["/dev/nvidia0"], True),  # a GPU node whose CUDA does not work
        ("cuda", [0], [], True),  # asked for CUDA: always checked
        ("cuda:0", [1], ["/dev/nvidia1"], True),
        ("cpu", [0], ["/dev/nvidia0"], False),  # --device cpu: on purpose
        (None, [0], [], False),  # logical GPUs on a CPU machine (ray start --num-gpus)
        (None, [], ["/dev/nvidia0"], False),  # a CPU worker
    ],
)
def test_a_worker_given_a_gpu_it_cannot_use_fails_loudly(
    device, gpus, nvidia_files, fails, monkeypatch
):
    import torch

    from pipeline.actor import device_error

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # CUDA unusable here
    problem = device_error(device, gpus, nvidia_files)
    assert (problem is not None) == fails
    if fails:
        assert f"given GPU(s) {gpus}" in problem and "--device cpu" in problem
