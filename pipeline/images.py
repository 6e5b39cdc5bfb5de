"""Image decoding and encoding: bytes in, upright float planes out, and back, keeping what an
archivist's file holds. The public import point; the work is split by format:

- TIFF: tifffile + imagecodecs (:mod:`pipeline.image_tiff`): 8/16-bit and float samples kept,
  multi-page refused, orientation, MINISWHITE, palettes, planar-separate, alpha.
- 16-bit PNG: imagecodecs' libpng (:mod:`pipeline.image_png`: 0.5 s to decode and 0.9 s to
  encode 4000x3000 RGB here, where pypng took ~9 s and ~3 s; figures and the choice against
  OpenCV there). Pillow reads its metadata chunks without decoding pixels; for every PNG,
  image_png also keeps its text, gAMA, cHRM and sRGB chunks and names the other ones.
- Everything else (8-bit PNG, JPEG, WebP, GIF, BMP, ...): Pillow.
- Orientation, EXIF / XMP patching, CMYK -> sRGB through the embedded ICC profile:
  :mod:`pipeline.image_meta`.

Pixels come out upright (EXIF / XMP / TIFF orientation applied; a note says so), as float32 in
[0, 1], channels first, alpha split off (the method restores colour, never transparency) and
handed back unchanged on write. :func:`encode_image` writes at the source's depth (8 -> 8,
16 -> 16, float TIFF -> float32 TIFF; float asked for as PNG -> 16-bit PNG) and carries the
ICC profile unchanged, DPI, EXIF (Orientation 1), XMP and IPTC where the format holds them,
and a PNG's own chunks (text, gAMA, cHRM, sRGB) to a PNG, a TIFF's descriptive tags
(DocumentName, ...) to a TIFF; what it cannot hold is returned in ``EncodedImage.dropped``,
never dropped silently. What no output can hold (an unknown PNG chunk, a GeoTIFF tag, a
scanner's infrared sample) is named in ``metadata.notes`` when it is read.

Decompression bombs: a few kilobytes can declare a gigapixel image. The declared size is read
from the header and compared with ``max_pixels`` before any pixel is decoded, for every format
(the user can raise the limit: ``--max-pixels``). This check replaces Pillow's process-wide
``Image.MAX_IMAGE_PIXELS`` (a warning, then an error at twice the value), which is switched off
here so that a raised limit works; every untrusted image in the pipeline goes through
:func:`decode_image` or :func:`image_size`, which apply ours.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from dataclasses import replace
from typing import Any, BinaryIO

import numpy as np
from PIL import Image, UnidentifiedImageError

from pipeline.image_meta import (
    conversion_note,
    convert_to_srgb,
    exif_orientation,
    orient,
    rotation_note,
    srgb_profile,
    upright_dpi,
    upright_exif,
    upright_size,
    upright_xmp,
    xmp_orientation,
)
from pipeline.image_png import (
    PNG_SIGNATURE,
    add_chunks,
    chunk_label,
    decode_png16,
    encode_png_samples,
    png_bit_depth,
    png_extras,
    png_size,
)
from pipeline.image_tiff import CARRIED_TAGS, decode_tiff, encode_tiff, is_tiff, tiff_size
from pipeline.image_types import (
    DEFAULT_MAX_PIXELS,
    DecodedImage,
    EncodedImage,
    ImageDecodeError,
    ImageMetadata,
    check_pixels,
    reason,
    to_planes,
    to_samples,
)

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "OUTPUT_FORMATS",
    "PNG_SIGNATURE",
    "DecodedImage",
    "EncodedImage",
    "ImageDecodeError",
    "ImageMetadata",
    "check_pixels",
    "decode_image",
    "encode_image",
    "encode_png",
    "image_size",
    "is_tiff",
    "output_format",
    "png_bit_depth",
    "resize_plane",
    "tiff_size_from_file",
]

Image.MAX_IMAGE_PIXELS = None  # ours instead (see the module docstring)
OUTPUT_FORMATS = ("png", "tiff", "same")
_EXTENSIONS = {"png": "png", "tiff": "tif"}
_SAMPLE_TYPES: dict[int, Any] = {8: np.uint8, 16: np.uint16, 32: np.float32}
_ICC_SPACES = {1: b"GRAY", 3: b"RGB "}  # ICC header bytes 16-20: the data colour space


# ---- reading ---------------------------------------------------------------------------------


def image_size(head: bytes, max_pixels: int | None = None) -> tuple[int, int]:
    """Displayed (width, height), orientation applied, from the first bytes of a file (the
    header only). Raises ImageDecodeError when they do not hold the whole header (a TIFF whose
    IFD is at its end, a big EXIF block): the caller then reads more (a TIFF:
    ``tiff_size_from_file``)."""
    if is_tiff(head):
        size = tiff_size(head)
        check_pixels(size, max_pixels)
        return size
    if png_bit_depth(head) is not None:
        check_pixels(png_size(head), max_pixels)  # before anything else is parsed
    try:
        with Image.open(io.BytesIO(head)) as image:  # parses the header only
            check_pixels(image.size, max_pixels)
            orientation, _ = _orientation(image.info)
            return upright_size(image.size, orientation)
    except UnidentifiedImageError:
        raise ImageDecodeError("not a readable image (unknown format or corrupt file)") from None
    except ImageDecodeError:
        raise
    except Exception as error:  # codecs raise many kinds (struct.error, EOFError, ...)
        raise ImageDecodeError(f"not a readable image ({reason(error)})") from None


def tiff_size_from_file(file: BinaryIO, max_pixels: int | None = None) -> tuple[int, int]:
    """A TIFF's displayed size from a file object that reads on demand (fsspec's: ranged
    reads): its IFDs, which libtiff writes after the pixels, are found wherever they lie,
    and no pixel is read. For a TIFF whose first bytes did not hold them (``is_tiff``)."""
    size = tiff_size(file)
    check_pixels(size, max_pixels)
    return size


def decode_image(data: bytes, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> DecodedImage:
    """Pixels (upright) and metadata of an image file; its declared size is checked against
    `max_pixels` first."""
    if is_tiff(data):
        return decode_tiff(data, max_pixels)
    sixteen = png_bit_depth(data) == 16
    if sixteen:
        check_pixels(png_size(data), max_pixels)
    try:
        with Image.open(io.BytesIO(data)) as image:  # parses the header only
            check_pixels(image.size, max_pixels)
            return _from_pillow(image, data, sixteen)
    except UnidentifiedImageError:
        raise ImageDecodeError("not a readable image (unknown format or corrupt file)") from None
    except ImageDecodeError:
        raise
    except MemoryError:
        raise ImageDecodeError("not decodable in this worker's memory") from None
    except Exception as error:  # codecs raise many kinds (struct.error, EOFError, ...)
        raise ImageDecodeError(f"not a readable image ({reason(error)})") from None


def _orientation(info: Mapping[Any, Any]) -> tuple[int, str]:
    """(orientation 1..8, where it was found) from Pillow's header info: EXIF's tag, else
    XMP's ``tiff:Orientation`` (as Pillow's own ``getexif`` does)."""
    found = exif_orientation(_exif(info))
    if found is not None:
        return found, "EXIF"
    found = xmp_orientation(_xmp(info))
    return (found, "XMP") if found is not None else (1, "")


def _exif(info: Mapping[Any, Any]) -> bytes | None:
    """Pillow's ``info['exif']`` in one form: "Exif\\0\\0" + the TIFF structure (WebP and
    some writers omit the prefix)."""
    exif = info.get("exif")
    if not isinstance(exif, (bytes, bytearray)) or not exif:
        return None
    exif = bytes(exif)
    return exif if exif.startswith(b"Exif\x00\x00") else b"Exif\x00\x00" + exif


def _xmp(info: Mapping[Any, Any]) -> bytes | None:
    xmp = info.get("xmp") or info.get("XML:com.adobe.xmp")
    if isinstance(xmp, str):
        xmp = xmp.encode()
    return bytes(xmp) if isinstance(xmp, (bytes, bytearray)) and xmp else None


def _metadata(info: Mapping[Any, Any]) -> ImageMetadata:
    icc = info.get("icc_profile")
    dpi = info.get("dpi")
    try:
        x, y = (float(d) for d in dpi) if dpi else (0.0, 0.0)
    except (TypeError, ValueError):
        x = y = 0.0
    photoshop = info.get("photoshop")
    iptc = photoshop.get(0x0404) if isinstance(photoshop, dict) else None  # JPEG APP13
    return ImageMetadata(
        icc_profile=bytes(icc) if icc else None,
        dpi=(x, y) if x > 0 and y > 0 and np.isfinite(x + y) else None,
        exif=_exif(info),
        xmp=_xmp(info),
        iptc=bytes(iptc) if isinstance(iptc, (bytes, bytearray)) and iptc else None,
    )


def _from_pillow(image: Image.Image, data: bytes, sixteen: bool) -> DecodedImage:
    """An opened (header-parsed) Pillow image of `data` -> DecodedImage; `sixteen`: a 16-bit
    PNG, whose pixels imagecodecs decodes (Pillow would keep 8 of its bits)."""
    fmt = (image.format or "unknown").lower()
    orientation, source = _orientation(image.info)  # before load: as image_size sees it
    notes: list[str] = []
    full: float | None
    converted = False
    if sixteen:
        samples = decode_png16(data)
        has_alpha, full, depth = samples.shape[2] in (2, 4), 65535.0, 16
    else:
        image.load()
        samples, has_alpha, full, depth, converted = _pillow_samples(image, fmt)
        if converted:
            notes.append(conversion_note(f"{image.mode} {fmt.upper()}"))
    metadata = _metadata(image.info)  # after load: chunks after the pixels count too
    if fmt == "png":
        chunks, lost = png_extras(data)
        metadata = replace(metadata, png_chunks=chunks)
        notes += lost
    if converted:
        metadata = replace(metadata, icc_profile=srgb_profile())
    if orientation != 1:
        samples = orient(samples, orientation)
        metadata = replace(metadata, dpi=upright_dpi(metadata.dpi, orientation))
        notes.append(rotation_note(orientation, source))
    late = exif_orientation(metadata.exif)
    if source != "EXIF" and late not in (None, 1):
        notes.append(f"ignored EXIF orientation {late} stored after the pixels (set to 1)")
    pixels, alpha = to_planes(samples, has_alpha, full)
    if full is None:  # float greyscale ("F")
        np.clip(pixels, 0.0, 1.0, out=pixels)
    metadata = replace(
        metadata,
        exif=upright_exif(metadata.exif),
        xmp=upright_xmp(metadata.xmp),
        notes=tuple(notes),
    )
    return DecodedImage(pixels, alpha, depth, fmt, metadata)


def _pillow_samples(
    image: Image.Image, fmt: str
) -> tuple[np.ndarray, bool, float | None, int, bool]:
    """(samples (H, W, S), has alpha, full scale, bit depth, converted to sRGB)."""
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit greyscale (PGM, JPEG 2000, ...)
        levels = np.asarray(image).clip(0, 65535).astype(np.uint16)
        return levels[:, :, None], False, 65535.0, 16, False
    if mode == "F":
        samples = np.asarray(image, dtype=np.float32)[:, :, None]
        if not np.isfinite(samples).all() or samples.min() < -1e-3 or samples.max() > 1 + 1e-3:
            raise ImageDecodeError("float samples outside [0, 1] are not supported")
        return samples, False, None, 32, False
    converted = mode in ("CMYK", "LAB")
    if converted:  # through the embedded profile, or refused (image_meta)
        image = convert_to_srgb(image, image.info.get("icc_profile"), f"{mode} {fmt.upper()}")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    grey = mode in ("1", "L", "LA", "La")
    target = ("LA" if grey else "RGBA") if has_alpha else ("L" if grey else "RGB")
    array = np.asarray(image.convert(target), dtype=np.uint8)
    return (array[:, :, None] if array.ndim == 2 else array), has_alpha, 255.0, 8, converted


# ---- writing ---------------------------------------------------------------------------------


def output_format(requested: str, source: DecodedImage) -> str:
    """The format a run's ``--output-format`` means for this source, "png" or "tiff": "same"
    is TIFF for a TIFF source and (lossless) PNG for everything else, JPEG and WebP too."""
    if requested == "same":
        return "tiff" if source.format == "tiff" else "png"
    if requested in ("png", "tiff"):
        return requested
    raise ValueError(f"unknown output format {requested!r}; expected one of {OUTPUT_FORMATS}")


def encode_image(
    pixels: np.ndarray, alpha: np.ndarray | None, source: DecodedImage, fmt: str
) -> EncodedImage:
    """(C, H, W) floats in [0, 1] (+ optional (H, W) alpha) -> a PNG or TIFF at the source's
    depth, with the source's ICC profile (unchanged), DPI, EXIF (Orientation 1), XMP, IPTC,
    PNG chunks and TIFF tags where the format holds them; ``dropped`` names what it could
    not hold."""
    if fmt not in _EXTENSIONS:
        raise ValueError(f"unknown image format {fmt!r}; expected 'png' or 'tiff'")
    dropped: list[str] = []
    metadata = replace(
        source.metadata,
        exif=upright_exif(source.metadata.exif),
        xmp=upright_xmp(source.metadata.xmp),
        notes=(),
    )
    space = metadata.icc_profile[16:20] if metadata.icc_profile else None
    if space is not None and space != _ICC_SPACES[pixels.shape[0]]:  # would make it invalid
        metadata = replace(metadata, icc_profile=None)
        found = space.decode("latin-1").strip()
        dropped.append(f"ICC profile (a {found} profile for a {pixels.shape[0]}-channel image)")
    if fmt == "png":
        depth = 8 if source.bit_depth == 8 else 16
        if source.bit_depth == 32:
            dropped.append("float samples (16-bit PNG output)")
        if metadata.iptc:
            dropped.append("IPTC (PNG output)")
        if metadata.tiff_tags:
            names = dict.fromkeys(CARRIED_TAGS[code] for code, _ in metadata.tiff_tags)
            dropped.append(f"TIFF tags {', '.join(names)} (PNG output)")
        samples = to_samples(pixels, alpha, _SAMPLE_TYPES[depth])
        data = add_chunks(encode_png_samples(samples), metadata)
    else:
        samples = to_samples(pixels, alpha, _SAMPLE_TYPES.get(source.bit_depth, np.uint16))
        data, lost = encode_tiff(samples, alpha is not None, metadata)
        dropped += lost
        if metadata.png_chunks:
            names = dict.fromkeys(chunk_label(kind, body) for kind, body in metadata.png_chunks)
            dropped.append(f"PNG chunks {', '.join(names)} (TIFF output)")
    return EncodedImage(data, _EXTENSIONS[fmt], tuple(dropped))


def encode_png(pixels: np.ndarray, alpha: np.ndarray | None = None, bit_depth: int = 8) -> bytes:
    """(C, H, W) floats in [0, 1] (+ optional (H, W) alpha) -> PNG bytes, 8 or 16 bits, no
    metadata."""
    if bit_depth not in (8, 16):
        raise ValueError(f"PNG bit depth must be 8 or 16, not {bit_depth}")
    return encode_png_samples(to_samples(pixels, alpha, _SAMPLE_TYPES[bit_depth]))


def resize_plane(plane: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize an alpha plane to (width, height) so it can follow a super-resolved image."""
    image = Image.fromarray(np.ascontiguousarray(plane, dtype=np.float32))
    resized = image.resize(size, Image.Resampling.BICUBIC)
    return np.asarray(resized, dtype=np.float32).clip(0.0, 1.0)
