"""The Fitter in-process with archival inputs: a phone JPEG turned sideways by its EXIF with a
mask drawn on the upright picture, the output format (--format), notes on the row, and a
large image fitted in tiles."""

from __future__ import annotations

import io
import logging
import os
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image, ImageCms

from dip_core import PackedRunner
from pipeline import worker
from pipeline.images import decode_image
from pipeline.manifest import job_from_row
from pipeline.packing import PackedFitService, PackingConfig
from pipeline.storage import Storage
from pipeline.worker import Fitter, WorkerConfig
from tests.support.builders import TINY_PARAMS, tiny_image, write_png

ORIENTATION = 0x0112


def _fitter(tmp_path: Path, **config) -> Fitter:
    return Fitter(WorkerConfig(out=str(tmp_path / "out"), device="cpu", sync_every=5, **config))


def _job(image: str, **fields):
    row = {"id": "j", "task": "denoise", "image": image, "iterations": 6, "params": TINY_PARAMS}
    return job_from_row({**row, **fields}, 0)


def _sideways_jpeg(path: Path, upright: np.ndarray) -> None:
    """What a phone stores for an upright (H, W, 3) picture taken holding it turned: the
    pixels rotated a quarter turn anticlockwise, and EXIF Orientation 6 (rotate 90 CW)."""
    stored = np.rot90(upright, k=1)  # anticlockwise; Orientation 6 turns it back clockwise
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    Image.fromarray(np.ascontiguousarray(stored)).save(path, "JPEG", quality=95, exif=exif)


def test_a_sideways_phone_jpeg_is_restored_upright_with_an_upright_mask(tmp_path):
    upright = np.rint(tiny_image(0, 32).transpose(1, 2, 0)[:, :24] * 255).astype(np.uint8)
    source = tmp_path / "phone.jpg"
    _sideways_jpeg(source, upright)  # stored 24 px high, 32 wide; displayed 32 x 24
    mask = np.ones((32, 24), np.float32)
    mask[10:14, 8:12] = 0  # drawn on the upright picture
    mask_uri = write_png(tmp_path / "mask.png", mask[None])
    outcome = _fitter(tmp_path).run(_job(str(source), task="inpaint", mask=mask_uri))
    row = outcome.row
    assert row["status"] == "ok", row["error"]
    assert "orientation 6" in row["notes"]
    written = Image.open(io.BytesIO(Storage().read_bytes(row["output"])))
    assert written.format == "PNG" and written.size == (24, 32)  # upright: 24 wide, 32 high
    assert written.getexif().get(ORIENTATION, 1) == 1  # no viewer turns it a second time


def test_format_same_keeps_tiff_and_png_follows_the_flag(tmp_path):
    profile = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    pixels = np.rint(tiny_image(1, 24).transpose(1, 2, 0) * 65535).astype(np.uint16)
    source = tmp_path / "scan.tif"
    tifffile.imwrite(source, pixels, photometric="rgb", iccprofile=profile)
    same = _fitter(tmp_path / "same").run(_job(str(source))).row
    assert same["status"] == "ok", same["error"]
    assert same["output"].endswith("/j.tif")
    with tifffile.TiffFile(same["output"]) as tif:
        assert tif.pages.first.dtype == np.uint16
        assert tif.pages.first.tags["InterColorProfile"].value == profile
    png = _fitter(tmp_path / "png", output_format="png").run(_job(str(source))).row
    assert png["output"].endswith("/j.png")
    written = Image.open(io.BytesIO(Storage().read_bytes(png["output"])))
    assert written.info.get("icc_profile") == profile
    assert decode_image(Storage().read_bytes(png["output"])).bit_depth == 16
    tiff = _fitter(tmp_path / "tiff", output_format="tiff")
    photo = write_png(tmp_path / "photo.png", tiny_image(2, 24))
    assert tiff.run(_job(photo)).row["output"].endswith("/j.tif")


def test_a_large_image_is_fitted_in_tiles_and_its_row_says_how_many(tmp_path):
    image = write_png(tmp_path / "in.png", tiny_image(3, 96))
    fitter = _fitter(tmp_path, tile_size=48, tile_above=64 * 64)
    steps: list[int] = []
    fitter.step_listeners.append(lambda job_id, step: steps.append(step))
    outcome = fitter.run(_job(image, reference=image))
    row = outcome.row
    assert row["status"] == "ok", row["error"]
    assert row["tiles"] > 1
    # Live progress counts the job's steps over all its tiles: it never goes back.
    assert steps == sorted(steps) and steps[-1] == row["iterations"] == 6 * row["tiles"]
    assert decode_image(Storage().read_bytes(row["output"])).pixels.shape == (3, 96, 96)
    assert outcome.trace["step"] and row["psnr"] is not None
    whole = _fitter(tmp_path / "whole", tile_size=0).run(_job(image)).row
    assert whole["tiles"] == 1


@pytest.mark.parametrize(
    ("flags", "message"),
    [(["--format", "jpeg"], "--format must be one of"), (["--tile", "16"], "--tile must be 0")],
)
def test_the_cli_refuses_unknown_formats_and_tiny_tiles_before_anything_runs(
    tmp_path, flags, message
):
    from typer.testing import CliRunner

    from pipeline.cli import app

    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["run", "m.parquet", "--out", str(out), *flags])
    assert result.exit_code == 2 and message in result.output
    assert not out.exists()


def test_super_resolution_keeps_the_print_size(tmp_path):
    """x2 more pixels at twice the resolution: the print is as large as the original's."""
    source = tmp_path / "small.png"
    pixels = np.rint(tiny_image(4, 16).transpose(1, 2, 0) * 255).astype(np.uint8)
    Image.fromarray(pixels).save(source, dpi=(300, 300))
    row = _fitter(tmp_path).run(_job(str(source), task="super_resolution", scale=2)).row
    assert row["status"] == "ok", row["error"]
    written = Image.open(io.BytesIO(Storage().read_bytes(row["output"])))
    assert written.size == (32, 32)
    assert written.info["dpi"] == pytest.approx((600, 600), abs=0.05)  # pHYs is per metre


def test_the_fit_memory_limit_follows_a_container_limit(tmp_path, monkeypatch):
    limit = tmp_path / "memory.max"
    limit.write_text("8589934592\n")  # a pod limited to 8 GiB
    unlimited_v1 = tmp_path / "memory.limit_in_bytes"  # cgroup v1 writes a huge number
    unlimited_v1.write_text("9223372036854771712\n")
    monkeypatch.setattr(worker, "CGROUP_MEMORY_LIMITS", (str(limit), str(unlimited_v1)))
    cpu = torch.device("cpu")
    physical = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    expected = min(physical, 8 * 2**30) // 4
    assert worker.fit_memory_limit(cpu, 1) == expected
    assert worker.fit_memory_limit(cpu, 2) == expected // 2
    limit.write_text("max\n")  # no limit: the machine's memory
    assert worker.fit_memory_limit(cpu, 1) == physical // 4


def test_a_failed_tile_stops_the_jobs_other_tiles(tmp_path, monkeypatch):
    """Tile 3 of a job fails as it joins the pack (e.g. out of memory allocating its slot)
    while tiles 1 and 2 fit: the job fails, and the worker's packing service neither goes on
    fitting the running tiles to their end nor starts the queued ones."""
    offers = {"count": 0}
    offer = PackedRunner.offer

    def failing_third_offer(self, item):
        offers["count"] += 1
        if offers["count"] == 3:
            raise RuntimeError("injected failure joining the pack")
        return offer(self, item)

    monkeypatch.setattr(PackedRunner, "offer", failing_third_offer)
    service = PackedFitService(PackingConfig(lanes=2, device="cpu"))
    config = WorkerConfig(out=str(tmp_path / "out"), device="cpu", sync_every=5, tile_size=32,
                          tile_above=1)  # fmt: skip
    image = write_png(tmp_path / "in.png", tiny_image(5, 128))  # 5 x 5 = 25 tiles of 32 px
    row = Fitter(config, service=service).run(_job(image, iterations=200)).row
    assert row["status"] == "failed" and "injected failure joining the pack" in row["error"]
    steps_at_failure = service.steps
    deadline = time.monotonic() + 60
    while (service.runner.busy or service.waiting) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not service.runner.busy and not service.waiting
    # The tile still running stops at its next progress report (5 steps), not after its 200.
    assert service.steps - steps_at_failure <= 2 * 5


def test_a_rerun_with_another_format_says_the_finished_jobs_keep_theirs(
    tmp_path, caplog, monkeypatch
):
    from pipeline.progress import RunSummary
    from pipeline.runner import RunConfig, _warn_if_format_changed

    # The CLI, run in-process by other tests, stops "dippipe" logs at its own handler.
    monkeypatch.setattr(logging.getLogger("dippipe"), "propagate", True)

    out = tmp_path / "out"
    out.mkdir()
    (out / "run.json").write_text('{"config": {"output_format": "same"}}')
    config = RunConfig(manifest="m.parquet", worker=WorkerConfig(str(out), output_format="png"))
    with caplog.at_level("WARNING", logger="dippipe"):
        _warn_if_format_changed(Storage(), config, RunSummary(skipped_ok=3))
    assert "--format same; its 3 finished job(s) keep them" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="dippipe"):
        _warn_if_format_changed(Storage(), config, RunSummary(skipped_ok=0))  # nothing kept
        same = RunConfig(manifest="m.parquet", worker=WorkerConfig(str(out)))
        _warn_if_format_changed(Storage(), same, RunSummary(skipped_ok=3))
    assert not caplog.text
