"""Decode and encode speed of the pipeline's image path (pipeline.images) on an archival-size
image: by default 4000x3000 (12 Mpx) 16-bit RGB, a smooth scan with noise, with an ICC
profile and a resolution, as PNG and TIFF (and float32 TIFF). Measured in-process, the best of
``--repeat`` runs, one line per (format, op): seconds and MB/s of raw samples (width x height
x channels x bytes per sample; 72 MB at the default size) and the file's size. The old path
(pypng for 16-bit PNG) is timed on a crop, when pypng is importable, and scaled per pixel.

    OMP_NUM_THREADS=1 python -m benchmarks.image_io            # about half a minute
    python -m benchmarks.image_io --width 1000 --height 750 --repeat 2
"""

from __future__ import annotations

import argparse
import io
import time
from collections.abc import Callable
from typing import Any

import imagecodecs
import numpy as np
import tifffile
from PIL import ImageCms

from pipeline.images import DecodedImage, decode_image, encode_image


def scan(width: int, height: int, noise: float, seed: int = 0) -> np.ndarray:
    """(H, W, 3) uint16: smooth colour fields plus Gaussian noise, like a scanned print."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    planes = [0.5 + 0.4 * np.sin(x / 300 + k) * np.cos(y / 250 - k) for k in range(3)]
    image = np.stack(planes, axis=-1)
    image += rng.normal(0, noise, image.shape).astype(np.float32)
    return np.rint(image.clip(0, 1) * 65535).astype(np.uint16)


def best(function: Callable[[], Any], repeat: int) -> tuple[float, Any]:
    seconds, result = float("inf"), None
    for _ in range(repeat):
        started = time.perf_counter()
        result = function()
        seconds = min(seconds, time.perf_counter() - started)
    return seconds, result


def line(fmt: str, op: str, seconds: float, raw_bytes: int, note: str) -> None:
    rate = raw_bytes / seconds / 1e6
    print(f"{fmt:<14} {op:<7} {seconds:7.3f} s  {rate:8.1f} MB/s  {note}", flush=True)


def source_tiff(samples: np.ndarray, float32: bool) -> bytes:
    profile = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    data = samples.astype(np.float32) / 65535 if float32 else samples
    buffer = io.BytesIO()
    tifffile.imwrite(
        buffer, data, photometric="rgb", compression="zlib", resolution=(600, 600),
        resolutionunit="INCH", iccprofile=profile, metadata=None,
    )  # fmt: skip
    return buffer.getvalue()


def measure(source: DecodedImage, fmt: str, label: str, raw_bytes: int, repeat: int) -> bytes:
    seconds, encoded = best(lambda: encode_image(source.pixels, None, source, fmt), repeat)
    size = f"file {len(encoded.data) / 1e6:.1f} MB"
    line(label, "encode", seconds, raw_bytes, size)
    seconds, decoded = best(lambda: decode_image(encoded.data, max_pixels=None), repeat)
    assert decoded.bit_depth == source.bit_depth or fmt == "png"
    line(label, "decode", seconds, raw_bytes, size)
    return bytes(encoded.data)


def pypng_baseline(png_data: bytes, width: int, height: int, crop: int) -> None:
    """The previous 16-bit PNG codec, on a crop (it is too slow for the whole image)."""
    try:
        import png  # pypng
    except ImportError:
        print("pypng not installed: no baseline for the previous codec")
        return
    samples = decode_image(png_data, max_pixels=None)
    piece = np.rint(samples.pixels[:, :crop, :crop].transpose(1, 2, 0) * 65535).astype(np.uint16)
    rows = piece.reshape(crop, crop * 3)
    writer = png.Writer(crop, crop, greyscale=False, bitdepth=16, compression=6)

    def encode() -> bytes:
        buffer = io.BytesIO()
        writer.write(buffer, rows.tolist())
        return buffer.getvalue()

    # Decoded from a PNG with libpng's default adaptive filters, as most writers make them
    # (pypng's own files use no filter, which it unfilters much faster).
    data = bytes(imagecodecs.png_encode(np.ascontiguousarray(piece)))

    def decode() -> np.ndarray:
        _, _, flat, _ = png.Reader(bytes=data).asDirect()
        return np.vstack([np.asarray(row, dtype=np.uint16) for row in flat])

    seconds_encode, _ = best(encode, 1)
    seconds_decode, _ = best(decode, 1)
    scale = width * height / (crop * crop)
    raw = width * height * 3 * 2
    for op, seconds in (("encode", seconds_encode), ("decode", seconds_decode)):
        line("png (pypng)", op, seconds * scale, raw,
             f"scaled from {crop}x{crop}: {seconds:.2f} s measured")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=4000)
    parser.add_argument("--height", type=int, default=3000)
    parser.add_argument("--noise", type=float, default=0.02, help="noise sigma, 0..1 scale")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--pypng-crop", type=int, default=512, help="0: skip the baseline")
    args = parser.parse_args()
    samples = scan(args.width, args.height, args.noise)
    raw = samples.nbytes
    print(f"{args.width}x{args.height} 16-bit RGB, {raw / 1e6:.1f} MB of samples; "
          f"best of {args.repeat}")  # fmt: skip
    source = decode_image(source_tiff(samples, float32=False), max_pixels=None)
    assert source.bit_depth == 16 and source.metadata.icc_profile
    png_data = measure(source, "png", "png 16-bit", raw, args.repeat)
    measure(source, "tiff", "tiff 16-bit", raw, args.repeat)
    floats = decode_image(source_tiff(samples, float32=True), max_pixels=None)
    measure(floats, "tiff", "tiff float32", raw * 2, args.repeat)
    if args.pypng_crop:
        pypng_baseline(png_data, args.width, args.height, args.pypng_crop)


if __name__ == "__main__":
    main()
