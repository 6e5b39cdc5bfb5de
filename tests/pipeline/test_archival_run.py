"""`dippipe run` of an archival master: a 4000x3000 16-bit RGB TIFF with a colour profile and
a resolution, fitted in tiles on the CPU with a tiny network, written back as a 16-bit TIFF
that keeps the profile and the resolution, with the worker's peak memory bounded."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import ImageCms
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.outputs import read_results
from pipeline.storage import Storage
from tests.support.builders import TINY_PARAMS, write_manifest

WIDTH, HEIGHT = 4000, 3000
# The worker's whole process (torch, Ray's worker runtime, the 12 Mpx image as 16-bit input,
# float planes and the blended result) stays under this; the whole image fitted at once
# would need 13 GiB with this tiny network by dip_core's estimate (fit_bytes; 185 GiB with
# the denoising preset's network).
PEAK_RSS_LIMIT = 3 * 2**30


def _master(path: Path, profile: bytes) -> np.ndarray:
    """A smooth 16-bit scan with noise; written as a deflate TIFF at 600 dpi with a profile."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float32)
    planes = [0.5 + 0.4 * np.sin(x / 300 + k) * np.cos(y / 250 - k) for k in range(3)]
    clean = np.stack(planes, axis=-1)
    noisy = clean + rng.normal(0, 0.05, clean.shape).astype(np.float32)
    pixels = np.rint(noisy.clip(0, 1) * 65535).astype(np.uint16)
    tifffile.imwrite(
        path, pixels, photometric="rgb", compression="zlib", resolution=(600, 600),
        resolutionunit="INCH", iccprofile=profile,
    )  # fmt: skip
    return pixels


@pytest.mark.slow
def test_a_4000x3000_16_bit_tiff_is_tiled_and_comes_back_16_bit_with_its_profile(
    tmp_path: Path, ray_local
):
    profile = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    source = tmp_path / "scan.tif"
    _master(source, profile)
    row = {"id": "scan", "task": "denoise", "image": str(source), "iterations": 2,
           "params": TINY_PARAMS}  # fmt: skip
    manifest = write_manifest(tmp_path / "manifest.parquet", [row])
    out = tmp_path / "out"
    args = ["run", manifest, "--out", str(out), "--gpus", "1", "--no-progress"]
    result = CliRunner().invoke(app, [*args, "--tile-above", "1000000"])
    assert result.exit_code == 0, result.output

    [done] = read_results(Storage(), str(out)).to_pylist()
    assert done["status"] == "ok", done["error"]
    assert done["output"].endswith("scan.tif")
    assert done["tiles"] > 1
    print(f"worker peak RSS {done['peak_rss'] / 2**30:.2f} GiB over {done['tiles']} tiles")
    assert done["peak_rss"] < PEAK_RSS_LIMIT
    with tifffile.TiffFile(done["output"]) as written:
        page = written.pages.first
        assert page.shape == (HEIGHT, WIDTH, 3)
        assert page.dtype == np.uint16
        assert page.tags["InterColorProfile"].value == profile
        assert page.tags["XResolution"].value == (600, 1)
        restored = page.asarray()
    # Sixteen bits used, not eight padded: most values are not multiples of 257.
    assert np.mean(restored % 257 != 0) > 0.9
