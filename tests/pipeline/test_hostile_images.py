"""Images of every quality, and some made to hurt: each becomes an ok row or a failed row
with a clear reason, never a crash, a hung worker or an exhausted machine."""

from __future__ import annotations

import io
import resource
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.images import ImageDecodeError, decode_image, encode_png, image_size
from pipeline.manifest import job_from_row
from pipeline.outputs import read_results
from pipeline.storage import Storage
from pipeline.validate import check_job
from pipeline.worker import Fitter, WorkerConfig
from tests.support.builders import TINY_PARAMS, tiny_image, write_manifest, write_png
from tests.support.icc import cmyk_profile


@pytest.fixture
def fitter(tmp_path) -> Fitter:
    return Fitter(WorkerConfig(out=str(tmp_path / "out"), device="cpu", sync_every=5))


def _job(image: str, job_id: str = "j", **fields):
    row = {"id": job_id, "task": "denoise", "image": image, "iterations": 4, "params": TINY_PARAMS}
    return job_from_row({**row, **fields}, 0)


def _pillow_bytes(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def _png(width: int, height: int, depth: int, colour: int, idat: bytes) -> bytes:
    header = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", idat)
        + _chunk(b"IEND", b"")
    )


def _flip(data: bytes, start: int, count: int = 16) -> bytes:
    broken = bytearray(data)
    for i in range(start, start + count):
        broken[i] ^= 0xFF
    return bytes(broken)


def _broken_files() -> dict[str, bytes]:
    png8 = encode_png(np.random.default_rng(1).random((3, 64, 64)).astype(np.float32))
    png16 = encode_png(tiny_image(2, 40), bit_depth=16)
    rgb = Image.fromarray((tiny_image(3, 48).transpose(1, 2, 0) * 255).astype(np.uint8))
    jpeg, gif = _pillow_bytes(rgb, "JPEG"), _pillow_bytes(rgb, "GIF")
    return {
        "png-truncated": png8[: len(png8) // 2],
        "png-corrupt-data": _flip(png8, len(png8) // 2),
        "png16-truncated": png16[: len(png16) // 2],
        "png16-bad-crc": _flip(png16, 60),
        "jpeg-truncated": jpeg[:300],
        "gif-truncated": gif[: len(gif) // 3],
        "tiff-truncated": _pillow_bytes(rgb, "TIFF")[:200],
        "signature-only": b"\x89PNG\r\n\x1a\n",
        "empty": b"",
        "text": b"this is not an image\n",
    }


@pytest.mark.parametrize("name", sorted(_broken_files()))
def test_truncated_and_corrupt_images_fail_their_job_with_the_reason(fitter, tmp_path, name):
    path = tmp_path / f"{name}.bin"
    path.write_bytes(_broken_files()[name])
    row = fitter.run(_job(str(path))).row
    assert row["status"] == "failed" and row.get("output") is None
    assert row["error"].startswith(f"image {path}: not a readable"), row["error"]
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").rglob("*.png"))


def _bombs() -> dict[str, bytes]:
    """Small files declaring enormous images, in several formats."""
    zeros = zlib.compressobj(9)
    rows = b"".join(zeros.compress(b"\0" * (1 + 2 * 16000)) for _ in range(16000))
    png16 = _png(16000, 16000, 16, 0, rows + zeros.flush())  # 512 MB of pixels in ~0.5 MB
    jpeg = bytearray(_pillow_bytes(Image.new("RGB", (8, 8)), "JPEG"))
    sof = jpeg.index(b"\xff\xc0")
    jpeg[sof + 5 : sof + 9] = struct.pack(">HH", 60000, 60000)
    bmp = bytearray(_pillow_bytes(Image.new("RGB", (4, 4)), "BMP"))
    bmp[18:26] = struct.pack("<ii", 200000, 200000)
    gif = bytearray(_pillow_bytes(Image.new("L", (4, 4)), "GIF"))
    gif[6:10] = struct.pack("<HH", 65535, 65535)
    return {
        "png-100k-square": _png(100_000, 100_000, 8, 2, zlib.compress(b"\0" * 1000)),
        "png16-zlib-bomb": png16,
        "jpeg-60k-square": bytes(jpeg),
        "bmp-200k-square": bytes(bmp),
        "gif-65k-square": bytes(gif),
    }


def test_decompression_bombs_are_refused_before_decoding(tmp_path):
    bombs = _bombs()
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    for name, data in bombs.items():
        with pytest.raises(ImageDecodeError, match=r"declares .* pixels, more than the limit"):
            decode_image(data)
        with pytest.raises(ImageDecodeError, match="raise it with --max-pixels"):
            image_size(data[:65536], max_pixels=100_000_000)
        path = tmp_path / f"{name}.img"
        path.write_bytes(data)
        (problem,) = check_job(Storage(), _job(str(path)))
        assert "more than the limit of 100,000,000" in problem, (name, problem)
    elapsed = time.perf_counter() - started
    growth_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before) / 1024
    assert elapsed < 5 and growth_mb < 64, (elapsed, growth_mb)  # nothing was decoded


def test_the_pixel_limit_is_the_users_to_raise():
    data = encode_png(np.zeros((3, 300, 300), np.float32))
    with pytest.raises(ImageDecodeError, match="300x300 = 90,000 pixels"):
        decode_image(data, max_pixels=50_000)
    assert decode_image(data, max_pixels=90_000).size == (300, 300)
    assert decode_image(data, max_pixels=None).size == (300, 300)


def _modes(tmp_path: Path) -> dict[str, tuple[str, int, int, bool]]:
    """name -> (path, output channels, output bit depth, has alpha)."""
    rgb8 = (tiny_image(5, 20).transpose(1, 2, 0) * 255).astype(np.uint8)
    rgb = Image.fromarray(rgb8)
    grey16 = Image.fromarray((tiny_image(6, 20, 1)[0] * 65535).astype(np.uint16))
    palette = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    cmyk = rgb.convert("CMYK")
    cases = {
        "grey16.png": (encode_png(tiny_image(7, 20, 1), None, 16), 1, 16, False),
        "rgb16.png": (encode_png(tiny_image(8, 20), None, 16), 3, 16, False),
        "rgba16.png": (encode_png(tiny_image(9, 20), tiny_image(1, 20, 1)[0], 16), 3, 16, True),
        "grey16.tif": (_pillow_bytes(grey16, "TIFF"), 1, 16, False),
        "palette.png": (_pillow_bytes(palette, "PNG"), 3, 8, False),
        "palette-transparent.png": (_pillow_bytes(palette, "PNG", transparency=0), 3, 8, True),
        # CMYK is converted with its embedded profile (refused without one:
        # test_images_archival.py)
        "cmyk.jpg": (_pillow_bytes(cmyk, "JPEG", icc_profile=cmyk_profile()), 3, 8, False),
        "cmyk.tif": (_pillow_bytes(cmyk, "TIFF", icc_profile=cmyk_profile()), 3, 8, False),
        "bilevel.png": (_pillow_bytes(rgb.convert("1"), "PNG"), 1, 8, False),
        "grey-alpha.png": (_pillow_bytes(rgb.convert("LA"), "PNG"), 1, 8, True),
        "grey.jpg": (_pillow_bytes(rgb.convert("L"), "JPEG"), 1, 8, False),
        "rgb.webp": (_pillow_bytes(rgb, "WEBP"), 3, 8, False),
    }
    found = {}
    for name, (data, channels, depth, alpha) in cases.items():
        (tmp_path / name).write_bytes(data)
        found[name] = (str(tmp_path / name), channels, depth, alpha)
    return found


def test_16_bit_palette_cmyk_and_other_modes_restore(fitter, tmp_path):
    for name, (path, channels, depth, alpha) in _modes(tmp_path).items():
        row = fitter.run(_job(path, job_id=name.replace(".", "-"))).row
        assert row["status"] == "ok", (name, row["error"])
        written = decode_image(Storage().read_bytes(row["output"]))
        assert written.pixels.shape == (channels, 20, 20), name
        assert written.bit_depth == depth and (written.alpha is not None) == alpha, name


DEEP = '{"channels": 4, "depth": 5, "input_depth": 4, "skip_channels": 2}'  # needs 32 px


@pytest.mark.parametrize("size", [(1, 1), (2, 3), (5, 7), (1, 40), (31, 33)])
def test_images_smaller_than_the_networks_minimum_restore_at_their_size(fitter, tmp_path, size):
    width, height = size
    image = write_png(tmp_path / "small.png", np.random.default_rng(0).random((3, height, width)))
    row = fitter.run(_job(image, params=DEEP)).row
    assert row["status"] == "ok", row["error"]
    assert decode_image(Storage().read_bytes(row["output"])).size == size


def test_tiny_super_resolution_and_inpainting(fitter, tmp_path):
    image = write_png(tmp_path / "lr.png", tiny_image(1, 2))
    row = fitter.run(_job(image, task="super_resolution", scale=4, params=DEEP)).row
    assert row["status"] == "ok", row["error"]
    assert decode_image(Storage().read_bytes(row["output"])).size == (8, 8)
    image = write_png(tmp_path / "px.png", tiny_image(2, 3))
    mask = write_png(tmp_path / "px-mask.png", np.eye(3, dtype=np.float32)[None])
    row = fitter.run(_job(image, job_id="px", task="inpaint", mask=mask, params=DEEP)).row
    assert row["status"] == "ok", row["error"]


def test_a_mask_of_zeros_fails_clearly_and_a_mask_of_ones_works(fitter, tmp_path):
    image = write_png(tmp_path / "in.png", tiny_image(3))
    zeros = write_png(tmp_path / "zeros.png", np.zeros((1, 24, 24), np.float32))
    ones = write_png(tmp_path / "ones.png", np.ones((1, 24, 24), np.float32))
    row = fitter.run(_job(image, job_id="z", task="inpaint", mask=zeros)).row
    assert row["status"] == "failed" and row["error"] == "mask has no known pixel: nothing to fit"
    params = '{"channels": 8, "depth": 3}'  # the preset chosen for a full mask: no input_depth
    row = fitter.run(_job(image, job_id="o", task="inpaint", mask=ones, params=params)).row
    assert row["status"] == "ok", row["error"]


@pytest.mark.ray
@pytest.mark.slow
def test_bombs_limits_and_hostile_uris_through_the_cli(tmp_path, ray_local):
    """End to end: a bomb and an over-limit image fail with the reason; the limit is raised
    with --max-pixels; URIs carrying Rich markup, ANSI escapes and bidi overrides neither
    crash the command nor reach the terminal raw."""
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_bombs()["png-100k-square"])
    big = write_png(tmp_path / "big.png", np.zeros((3, 300, 300), np.float32))
    hostile = {
        "markup": str(tmp_path / "[/][bold red]x.png"),
        "ansi": str(tmp_path / "\x1b[2J\x1b]8;;http://evil\x07y.png"),
        "bidi": str(tmp_path / "\u202egnp.exe"),
    }
    rows = [
        {"id": "bomb", "task": "denoise", "image": str(bomb)},
        {"id": "big", "task": "denoise", "image": big},
        *({"id": k, "task": "denoise", "image": v} for k, v in hostile.items()),
    ]
    manifest, out = write_manifest(tmp_path / "m.parquet", rows), tmp_path / "out"
    args = ["run", manifest, "--out", str(out), "--gpus", "2", "--no-progress"]
    args += ["--fake-fit-seconds", "0", "--max-pixels", "50000"]
    runner = CliRunner()
    first = runner.invoke(app, args)
    assert first.exit_code == 1, first.output
    assert first.exception is None or isinstance(first.exception, SystemExit)
    for raw in ("\x1b", "\u202e", "\x07"):
        assert raw not in first.output
    assert "\\x1b[2J" in first.output and "\\u202e" in first.output
    assert "[/][bold red]x.png" in first.output  # shown as text, not taken as markup
    errors = {r["id"]: r["error"] for r in read_results(Storage(), str(out)).to_pylist()}
    assert "declares 100000x100000" in errors["bomb"]
    assert "300x300 = 90,000 pixels, more than the limit of 50,000" in errors["big"]
    assert errors["ansi"].startswith("image not found")

    second = runner.invoke(app, [*args[:-1], "200000", "--retry-failed"])
    assert second.exit_code == 1, second.output
    rows = {r["id"]: r for r in read_results(Storage(), str(out)).to_pylist()}
    assert len(rows) == 5 and rows["big"]["status"] == "ok"
    assert "more than the limit of 200,000" in rows["bomb"]["error"]

    checked = runner.invoke(app, ["validate", manifest, "--max-pixels", "50000"])
    assert checked.exit_code == 1 and "more than the limit of 50,000" in checked.output
    assert "\x1b" not in checked.output
