"""The Fitter in-process with archival inputs: a phone JPEG turned sideways by its EXIF with a
mask drawn on the upright picture, the output format (--format), notes on the row, and a
large image fitted in tiles."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image, ImageCms

from pipeline.images import decode_image
from pipeline.manifest import job_from_row
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


@pytest.mark.parametrize("name", ["png", "tiff", "bogus"])
def test_the_cli_accepts_only_known_formats(tmp_path, name):
    from typer.testing import CliRunner

    from pipeline.cli import app

    result = CliRunner().invoke(app, ["run", "m.parquet", "--out", str(tmp_path), "--format", name])
    if name == "bogus":
        assert result.exit_code == 2 and "--format must be one of" in result.output
    else:
        assert "--format must be one of" not in result.output
