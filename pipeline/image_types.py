"""The types every image module shares (re-exported by :mod:`pipeline.images`, the public
import point) and the conversions between stored samples and the float planes the method
fits: integer samples map to [0, 1] by their full scale, floats are taken as they are."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.errors import DippipeError

DEFAULT_MAX_PIXELS = 100_000_000  # a 10,000 x 10,000 scan; --max-pixels raises it


class ImageDecodeError(DippipeError, ValueError):
    """The bytes are not an image we can read (or one we refuse to read, with the reason)."""


@dataclass(frozen=True)
class ImageMetadata:
    """What an archivist's file holds besides its pixels, carried to the output."""

    icc_profile: bytes | None = None
    dpi: tuple[float, float] | None = None
    exif: bytes | None = None  # raw EXIF block, "Exif\0\0" + TIFF structure (Pillow's form)
    xmp: bytes | None = None
    iptc: bytes | None = None  # raw IPTC-IIM records
    # What decoding did, in words, for the job's row ("rotated upright (EXIF orientation 6)").
    notes: tuple[str, ...] = ()
    # Ancillary PNG chunks carried verbatim to a PNG output, (type, data): text, gAMA, cHRM,
    # sRGB (image_png.CARRIED_CHUNKS); a TIFF output names them as dropped.
    png_chunks: tuple[tuple[bytes, bytes], ...] = ()
    # Descriptive TIFF tags carried to a TIFF output, (code, text or SHORTs): DocumentName,
    # PageName, PageNumber, HostComputer (image_tiff.CARRIED_TAGS); a PNG output names them
    # as dropped.
    tiff_tags: tuple[tuple[int, str | tuple[int, ...]], ...] = ()


@dataclass(frozen=True)
class DecodedImage:
    """Pixels as float32 in [0, 1], channels first and upright, plus what is needed to write
    them back at the source's depth with its metadata."""

    pixels: np.ndarray  # (C, H, W), C = 1 or 3, orientation applied
    alpha: np.ndarray | None  # (H, W) in [0, 1], or None
    bit_depth: int  # 8, 16, or 32 (float samples)
    format: str = "png"  # "png", "tiff", "jpeg", ... (lower-case, from the file's content)
    metadata: ImageMetadata = ImageMetadata()

    @property
    def size(self) -> tuple[int, int]:
        """(width, height), as Pillow reports sizes."""
        return self.pixels.shape[2], self.pixels.shape[1]


@dataclass(frozen=True)
class EncodedImage:
    data: bytes
    extension: str  # "png" | "tif"
    # Metadata the chosen format could not hold, in words ("EXIF (TIFF output)"); these go
    # to the job's row: nothing is dropped silently.
    dropped: tuple[str, ...] = ()


def check_pixels(size: tuple[int, int], max_pixels: int | None) -> None:
    """Refuse a declared (width, height) above the limit, before anything is decoded."""
    width, height = size
    if max_pixels is not None and width * height > max_pixels:
        raise ImageDecodeError(
            f"declares {width}x{height} = {width * height:,} pixels, more than the limit of "
            f"{max_pixels:,} (a decompression bomb?); raise it with --max-pixels if it is real"
        )


def reason(error: BaseException) -> str:
    """Codec messages say enough for OSError / SyntaxError / ValueError; others also need
    the type."""
    if isinstance(error, (OSError, SyntaxError, ValueError)) and str(error):
        return str(error)
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


def to_planes(
    samples: np.ndarray, has_alpha: bool, full_scale: float | None
) -> tuple[np.ndarray, np.ndarray | None]:
    """(H, W, S) samples -> ((C, H, W) float32 colour, (H, W) float32 alpha or None).

    ``full_scale`` is the integer value that means 1.0 (255, 65535, 4095...); None for float
    samples, taken as they are. One plane at a time, so a 12 Mpx 16-bit image never has a
    float64 copy nor a whole-image float temporary besides the result.
    """
    colours = samples.shape[2] - (1 if has_alpha else 0)
    planes = np.empty((colours, *samples.shape[:2]), np.float32)
    scale = np.float32(1.0 / full_scale) if full_scale else None
    for c in range(colours):
        if scale is None:
            planes[c] = samples[:, :, c]
        else:
            np.multiply(samples[:, :, c], scale, out=planes[c], dtype=np.float32)
    alpha = None
    if has_alpha:
        alpha = np.empty(samples.shape[:2], np.float32)
        if scale is None:
            alpha[:] = samples[:, :, -1]
        else:
            np.multiply(samples[:, :, -1], scale, out=alpha, dtype=np.float32)
    return planes, alpha


def to_samples(pixels: np.ndarray, alpha: np.ndarray | None, dtype: type) -> np.ndarray:
    """(C, H, W) floats (+ optional (H, W) alpha) -> (H, W, S) samples of `dtype` (uint8,
    uint16: rounded from [0, 1] at full scale; float32: clipped to [0, 1])."""
    if pixels.ndim != 3 or pixels.shape[0] not in (1, 3):
        raise ValueError(f"expected (1|3, H, W) pixels, got shape {pixels.shape}")
    planes = [pixels[c] for c in range(pixels.shape[0])]
    if alpha is not None:
        if alpha.shape != pixels.shape[1:]:
            raise ValueError(f"alpha of shape {alpha.shape} for pixels of shape {pixels.shape}")
        planes.append(alpha)
    out = np.empty((*pixels.shape[1:], len(planes)), dtype)
    full = float(np.iinfo(dtype).max) if np.issubdtype(dtype, np.integer) else None
    for s, plane in enumerate(planes):
        work = np.clip(plane, 0.0, 1.0, dtype=np.float32)
        if full is not None:
            np.multiply(work, np.float32(full), out=work)
            np.rint(work, out=work)
        out[:, :, s] = work
    return out
