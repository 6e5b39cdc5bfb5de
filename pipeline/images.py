"""Image decoding and PNG encoding: bytes in, numpy out, and back.

Pillow handles every 8-bit format and 16-bit greyscale, but it silently reduces 16-bit RGB(A)
PNGs to 8 bits and cannot write them at all, so 16-bit PNGs go through pypng (a small
pure-Python codec) both ways. Alpha is split off on read and handed back unchanged on write:
the method restores colour, never transparency.

Decompression bombs: a few kilobytes can declare a gigapixel image. The declared size is read
from the header and compared with ``max_pixels`` before any pixel is decoded (the user can
raise the limit: ``--max-pixels``). This check replaces Pillow's process-wide
``Image.MAX_IMAGE_PIXELS`` (a warning, then an error at twice the value), which is switched off
here so that a raised limit works; every untrusted image in the pipeline goes through
:func:`decode_image` or :func:`image_size`, which apply ours.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import png
from PIL import Image, UnidentifiedImageError

from pipeline.errors import DippipeError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
DEFAULT_MAX_PIXELS = 100_000_000  # a 10,000 x 10,000 scan; --max-pixels raises it
Image.MAX_IMAGE_PIXELS = None  # ours instead (see the module docstring)


class ImageDecodeError(DippipeError, ValueError):
    """The bytes are not an image we can read."""


@dataclass(frozen=True)
class DecodedImage:
    """Pixels as float32 in [0, 1], channels first, plus what is needed to write them back."""

    pixels: np.ndarray  # (C, H, W), C = 1 or 3
    alpha: np.ndarray | None  # (H, W) in [0, 1], or None
    bit_depth: int  # 8 or 16

    @property
    def size(self) -> tuple[int, int]:
        """(width, height), as Pillow reports sizes."""
        return self.pixels.shape[2], self.pixels.shape[1]


def png_bit_depth(data: bytes) -> int | None:
    """Bit depth from a PNG's IHDR chunk (byte 24), or None when `data` is not a PNG."""
    if len(data) > 25 and data.startswith(PNG_SIGNATURE) and data[12:16] == b"IHDR":
        return data[24]
    return None


def check_pixels(size: tuple[int, int], max_pixels: int | None) -> None:
    """Refuse a declared (width, height) above the limit, before anything is decoded."""
    width, height = size
    if max_pixels is not None and width * height > max_pixels:
        raise ImageDecodeError(
            f"declares {width}x{height} = {width * height:,} pixels, more than the limit of "
            f"{max_pixels:,} (a decompression bomb?); raise it with --max-pixels if it is real"
        )


def image_size(head: bytes, max_pixels: int | None = None) -> tuple[int, int]:
    """(width, height) from the first bytes of a file; reads the header only."""
    try:
        with Image.open(io.BytesIO(head)) as image:
            size = image.size
    except UnidentifiedImageError:
        raise ImageDecodeError("not a readable image (unknown format or corrupt file)") from None
    except Exception as error:  # codecs raise many kinds (struct.error, EOFError, ...)
        raise ImageDecodeError(f"not a readable image ({_reason(error)})") from None
    check_pixels(size, max_pixels)
    return size


def decode_image(data: bytes, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> DecodedImage:
    """Pixels of an image file; its declared size is checked against `max_pixels` first."""
    if png_bit_depth(data) == 16:
        check_pixels(_png_size(data), max_pixels)
        return _decode_png16(data)
    try:
        with Image.open(io.BytesIO(data)) as image:  # parses the header only
            check_pixels(image.size, max_pixels)
            image.load()
            return _from_pillow(image)
    except UnidentifiedImageError:
        raise ImageDecodeError("not a readable image (unknown format or corrupt file)") from None
    except ImageDecodeError:
        raise
    except MemoryError:
        raise ImageDecodeError("not decodable in this worker's memory") from None
    except Exception as error:  # codecs raise many kinds (struct.error, EOFError, ...)
        raise ImageDecodeError(f"not a readable image ({_reason(error)})") from None


def _reason(error: Exception) -> str:
    """Pillow's messages say enough for OSError / SyntaxError; others also need the type."""
    if isinstance(error, (OSError, SyntaxError, ValueError)) and str(error):
        return str(error)
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


def _png_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk (bytes 16 to 24)."""
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def _from_pillow(image: Image.Image) -> DecodedImage:
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit greyscale (TIFF, some PNGs)
        levels = np.asarray(image, dtype=np.float64).clip(0, 65535) / 65535.0
        return DecodedImage(levels[None].astype(np.float32), None, 16)
    has_alpha = image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info
    grey = image.mode in ("1", "L", "LA", "I;16", "F")
    target = ("LA" if grey else "RGBA") if has_alpha else ("L" if grey else "RGB")
    array = np.asarray(image.convert(target), dtype=np.float32) / 255.0
    return _split(array, has_alpha, 8)


def _decode_png16(data: bytes) -> DecodedImage:
    try:
        width, height, rows, info = png.Reader(bytes=data).asDirect()
        flat = np.vstack([np.asarray(row, dtype=np.uint16) for row in rows])
    except MemoryError:
        raise ImageDecodeError("not decodable in this worker's memory") from None
    except Exception as error:  # png.Error, zlib.error, ValueError, ...
        raise ImageDecodeError(f"not a readable 16-bit PNG ({_reason(error)})") from None
    planes = info["planes"]
    array = flat.reshape(height, width, planes).astype(np.float32) / 65535.0
    return _split(array, info["alpha"], 16)


def _split(array: np.ndarray, has_alpha: bool, bit_depth: int) -> DecodedImage:
    """(H, W[, C]) -> channels-first colour plus a separate alpha plane."""
    if array.ndim == 2:
        array = array[:, :, None]
    alpha = array[:, :, -1].copy() if has_alpha else None
    colour = array[:, :, :-1] if has_alpha else array
    return DecodedImage(np.ascontiguousarray(colour.transpose(2, 0, 1)), alpha, bit_depth)


def resize_plane(plane: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize an alpha plane to (width, height) so it can follow a super-resolved image."""
    image = Image.fromarray(np.ascontiguousarray(plane, dtype=np.float32))
    resized = image.resize(size, Image.Resampling.BICUBIC)
    return np.asarray(resized, dtype=np.float32).clip(0.0, 1.0)


def encode_png(pixels: np.ndarray, alpha: np.ndarray | None = None, bit_depth: int = 8) -> bytes:
    """(C, H, W) floats in [0, 1] (+ optional (H, W) alpha) -> PNG bytes, 8 or 16 bits."""
    if pixels.ndim != 3 or pixels.shape[0] not in (1, 3):
        raise ValueError(f"expected (1|3, H, W) pixels, got shape {pixels.shape}")
    planes = [pixels[c] for c in range(pixels.shape[0])]
    if alpha is not None:
        planes.append(alpha)
    stacked = np.stack(planes, axis=-1).clip(0.0, 1.0)
    if bit_depth == 16:
        return _encode_png16(stacked, has_alpha=alpha is not None)
    array = np.rint(stacked * 255.0).astype(np.uint8)
    buffer = io.BytesIO()  # Pillow infers L / LA / RGB / RGBA from the array's shape
    Image.fromarray(array[:, :, 0] if array.shape[-1] == 1 else array).save(buffer, "PNG")
    return buffer.getvalue()


def _encode_png16(stacked: np.ndarray, has_alpha: bool) -> bytes:
    height, width, planes = stacked.shape
    rows = np.rint(stacked * 65535.0).astype(np.uint16).reshape(height, width * planes)
    writer = png.Writer(
        width, height, greyscale=planes <= 2, alpha=has_alpha, bitdepth=16, compression=6
    )
    buffer = io.BytesIO()
    writer.write(buffer, rows.tolist())
    return buffer.getvalue()
