"""Metadata that changes what the pixels mean: orientation, colour space, EXIF.

Orientation: the decoders apply it (EXIF tag 274, or XMP ``tiff:Orientation`` when EXIF has
none, or the TIFF's own tag 274) so pixels are upright, as viewers show them; the EXIF and XMP
carried to the output then say 1, patched in place (two bytes / one digit), so viewers do not
rotate twice and nothing else in the blocks changes (maker notes keep their offsets).

Colour: an RGB or grey image keeps its ICC profile unchanged (the fit works on encoded values).
CMYK cannot be fitted as is; it is converted to sRGB with its embedded profile through
Pillow's ImageCms (relative colorimetric with black-point compensation: Photoshop's default
for such conversions), and the output then carries an sRGB profile. Without a profile there is
no right conversion, so the image is refused rather than converted naively.
"""

from __future__ import annotations

import io
import re
import struct
from functools import lru_cache
from typing import Any, TypeVar

import numpy as np
from PIL import Image, ImageCms

from pipeline.image_types import ImageDecodeError, reason

EXIF_HEADER = b"Exif\x00\x00"
ORIENTATION_TAG = 0x0112
EXIF_IFD, GPS_IFD, INTEROP_IFD = 0x8769, 0x8825, 0xA005
# IFD0 tags that describe the picture and are plain TIFF tags too, so a TIFF output carries
# them: ImageDescription, Make, Model, DateTime, Artist, Copyright.
DESCRIPTIVE_TAGS = (270, 271, 272, 306, 315, 33432)
# IFD0 tags about the file's own layout or superseded by what we write; never "dropped".
_STRUCTURAL_TAGS = {
    *range(256, 263), 273, 274, 277, 278, 279, 282, 283, 284, 296, 305, 513, 514, 531,
    EXIF_IFD, GPS_IFD, 34675, 700, 33723, 34377,
}  # fmt: skip
TiffTag = tuple[int, int | str, int, Any, bool]  # an entry of tifffile's ``extratags``
_XMP_ORIENTATION = re.compile(rb"(tiff:Orientation(?:=[\"']|>))([1-8])")


# ---- orientation ---------------------------------------------------------------------------


def exif_orientation(exif: bytes | None) -> int | None:
    """The Orientation (1..8) in IFD0 of a raw EXIF block; None when absent or unreadable."""
    found = _orientation_entry(exif)
    return found[1] if found else None


def xmp_orientation(xmp: bytes | None) -> int | None:
    """XMP's ``tiff:Orientation`` (attribute or element form); None when absent."""
    match = _XMP_ORIENTATION.search(xmp) if xmp else None
    return int(match.group(2)) if match else None


def upright_exif(exif: bytes | None) -> bytes | None:
    """The same block with Orientation 1: only the tag's value bytes change."""
    found = _orientation_entry(exif)
    if exif is None or found is None or found[1] == 1:
        return exif
    position, _, order = found
    patched = bytearray(exif)
    patched[position : position + 2] = struct.pack(f"{order}H", 1)
    return bytes(patched)


def upright_xmp(xmp: bytes | None) -> bytes | None:
    return _XMP_ORIENTATION.sub(rb"\g<1>1", xmp) if xmp else xmp


def _orientation_entry(exif: bytes | None) -> tuple[int, int, str] | None:
    """(absolute position of the value, value, struct byte order) of IFD0's Orientation
    entry, read straight from the TIFF structure: no decoding of anything else."""
    if not exif:
        return None
    base = len(EXIF_HEADER) if exif.startswith(EXIF_HEADER) else 0
    head = exif[base : base + 8]
    if head[:4] not in (b"II*\x00", b"MM\x00*"):
        return None
    order = "<" if head[:2] == b"II" else ">"
    (ifd,) = struct.unpack(f"{order}I", head[4:8])
    start = base + ifd
    if start + 2 > len(exif):
        return None
    (count,) = struct.unpack(f"{order}H", exif[start : start + 2])
    for entry in range(start + 2, min(start + 2 + 12 * count, len(exif) - 11), 12):
        tag, kind = struct.unpack(f"{order}HH", exif[entry : entry + 4])
        if tag == ORIENTATION_TAG and kind in (3, 4):  # SHORT (LONG from some writers)
            value_at = entry + 8 if kind == 3 or order == "<" else entry + 10
            (value,) = struct.unpack(f"{order}H", exif[value_at : value_at + 2])
            return (value_at, value, order) if 1 <= value <= 8 else None
    return None


def orient(array: np.ndarray, orientation: int) -> np.ndarray:
    """(H, W, ...) as stored -> upright (a view), for EXIF/TIFF orientation 1..8 (the same
    transforms as Pillow's ImageOps.exif_transpose)."""
    if orientation == 2:
        return array[:, ::-1]
    if orientation == 3:
        return array[::-1, ::-1]
    if orientation == 4:
        return array[::-1]
    if orientation == 5:
        return array.swapaxes(0, 1)
    if orientation == 6:
        return np.rot90(array, -1)
    if orientation == 7:
        return np.rot90(array, -1)[::-1]
    if orientation == 8:
        return np.rot90(array, 1)
    return array


Axis = TypeVar("Axis", int, float)


def upright_size(size: tuple[Axis, Axis], orientation: int) -> tuple[Axis, Axis]:
    """The displayed (x, y) of a stored pair (a size, a resolution): swapped with the axes."""
    return (size[1], size[0]) if orientation in (5, 6, 7, 8) else size


def upright_dpi(dpi: tuple[float, float] | None, orientation: int) -> tuple[float, float] | None:
    return None if dpi is None else upright_size(dpi, orientation)


def rotation_note(orientation: int, source: str) -> str:
    return f"rotated upright ({source} orientation {orientation})"


# ---- colour --------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def srgb_profile() -> bytes:
    """The sRGB profile written with a converted image (Pillow's built-in, from lcms)."""
    return bytes(ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes())


def convert_to_srgb(image: Image.Image, icc_profile: bytes | None, what: str) -> Image.Image:
    """A CMYK (or other non-RGB) Pillow image -> RGB through its embedded profile; refused
    without one. ``what`` names the source in messages ("CMYK JPEG")."""
    if not icc_profile:
        raise ImageDecodeError(
            f"{what} without an embedded ICC profile: its colours cannot be converted to RGB "
            "reliably; convert it to RGB (or embed its profile) and resubmit"
        )
    try:
        source = ImageCms.ImageCmsProfile(io.BytesIO(icc_profile))
        converted = ImageCms.profileToProfile(
            image,
            source,
            ImageCms.ImageCmsProfile(io.BytesIO(srgb_profile())),
            renderingIntent=ImageCms.Intent.RELATIVE_COLORIMETRIC,
            outputMode="RGB",
            flags=ImageCms.Flags.BLACKPOINTCOMPENSATION,
        )
    except (ImageCms.PyCMSError, OSError, ValueError, TypeError) as error:
        raise ImageDecodeError(
            f"{what}: its embedded ICC profile cannot convert it to RGB ({reason(error)})"
        ) from None
    assert converted is not None  # not in place
    return converted


def conversion_note(what: str) -> str:
    return f"converted {what} to RGB with its embedded ICC profile (output carries sRGB)"


# ---- EXIF in TIFF files --------------------------------------------------------------------


def exif_from_tiff(data: bytes) -> bytes | None:
    """An EXIF block for a TIFF file's metadata: its descriptive IFD0 tags plus its EXIF and
    GPS IFDs, read by Pillow from the TIFF structure (no pixels). None when it has none."""
    try:
        found = Image.Exif()
        found.load(data)
        block = Image.Exif()
        for tag in DESCRIPTIVE_TAGS:
            value = found.get(tag)
            if isinstance(value, str) and value and not _writer_description(tag, value):
                block[tag] = value
        for pointer in (EXIF_IFD, GPS_IFD):
            if pointer in found:
                ifd = dict(found.get_ifd(pointer))
                if pointer == EXIF_IFD and INTEROP_IFD in ifd:
                    ifd[INTEROP_IFD] = dict(found.get_ifd(INTEROP_IFD))
                if ifd:
                    block[pointer] = ifd
        return bytes(block.tobytes()) if len(block) else None
    except Exception:  # EXIF is a bonus: a malformed one must not fail a readable image
        return None


def _writer_description(tag: int, value: str) -> bool:
    """An ImageDescription that a writer filled with its own data (tifffile's JSON shape,
    ImageJ's settings, OME-XML), not a description of the picture."""
    return tag == 270 and value.lstrip().startswith(('{"shape"', "ImageJ=", "<?xml"))


def exif_as_tiff_tags(exif: bytes | None) -> tuple[list[TiffTag], bool]:
    """(tifffile ``extratags`` for the descriptive IFD0 tags of an EXIF block, whether the
    block holds more than those: EXIF/GPS IFDs or other tags a TIFF output cannot carry)."""
    if not exif:
        return [], False
    try:
        parsed = Image.Exif()
        parsed.load(exif)
        tags = dict(parsed)
        more = any(
            tag not in DESCRIPTIVE_TAGS and tag not in _STRUCTURAL_TAGS for tag in tags
        ) or any(len(parsed.get_ifd(pointer)) for pointer in (EXIF_IFD, GPS_IFD) if pointer in tags)
    except Exception:
        return [], True
    extratags: list[TiffTag] = []
    for tag in DESCRIPTIVE_TAGS:
        value = tags.get(tag)
        if isinstance(value, str) and value.strip("\x00"):
            text = value.strip("\x00")
            # tifffile takes 7-bit ASCII as str; other text goes as its UTF-8 bytes
            extratags.append((tag, "s", 0, text if text.isascii() else text.encode(), True))
    return extratags, more
