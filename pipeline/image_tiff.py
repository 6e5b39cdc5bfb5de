"""TIFF through tifffile (+ imagecodecs for LZW, deflate, JPEG-in-TIFF, ...), samples kept
at their depth: 8- and 16-bit integers, float32 as float.

Reading: one full-resolution page (reduced-resolution pages, NewSubfileType bit 0, masks and
SubIFDs do not count; several pages are refused, naming the count, rather than silently
restoring the first). The declared size is checked against the pixel limit before any strip
is decoded. MINISWHITE is inverted, palettes expanded (to 16 bits when the colour map uses
them), planar-separate samples interleaved, one extra sample kept as alpha (associated alpha
un-premultiplied), the Orientation tag applied. CMYK (8-bit) is converted to sRGB with its
embedded profile (image_meta); 16-bit CMYK, CIELab and other photometrics are refused with
the reason. Float samples must lie in [0, 1] (within FLOAT_TOLERANCE): the method fits
display-referred values, and clipping an HDR scan silently would destroy it.

tifffile reports some damage (tag values or the next IFD beyond the end of the data, missing
strip byte counts) in its log instead of raising, then goes on with what it could read. The
decoders here collect those records (this thread's only) and turn them into ImageDecodeError:
a truncated file is refused, and :func:`tiff_size` on the first bytes of a file whose IFD
lies at its end fails, so ``validate`` reads the whole file instead.

Writing: Adobe deflate (compression 8) with a horizontal predictor (floating-point predictor
for float32), zlib level 1, strips, one thread. At 4000x3000 16-bit RGB (72 MB of samples,
this machine, one thread):

    deflate + predictor, level 1     encode 0.60 s  decode 0.25-0.37 s  54.6-68.5 MB
    deflate + predictor, level 6     encode 0.81-0.93 s  decode 0.25-0.31 s  56.0-68.5 MB
    deflate, no predictor, level 1   encode 0.60 s  72 -> 70.8 MB (the predictor is what pays)
    LZW + predictor                  encode 0.72 s  decode 0.46-0.55 s  66.1-95.0 MB
    uncompressed                     encode 0.07 s  72.0 MB

(codec calls alone; ranges: a smooth scan with little noise .. one with heavy noise). Through
decode_image / encode_image (``python -m benchmarks.image_io``): 16-bit RGB encode 0.72 s,
decode 0.32 s; float32 RGB encode 1.26 s, decode 0.74 s. LZW makes noisy 16-bit data larger
than the raw samples and is slower to read; deflate + predictor is read by libtiff and the
tools built on it (GIMP, ImageMagick, GDAL) and by Photoshop, and level 1 costs nothing in
size on scan noise. One thread: Ray gives a worker one CPU, and a 12 Mpx image takes about a
second anyway.

Metadata written: XResolution / YResolution / ResolutionUnit (inch), the ICC profile (tag
34675), XMP (700), IPTC (33723, as LONGs like Photoshop, which tifffile and libtiff expect),
and from EXIF the descriptive IFD0 tags (ImageDescription, Make, Model, DateTime, Artist,
Copyright). tifffile cannot write an EXIF or GPS IFD (pointer tags 34665 / 34853 need
sub-IFDs it does not write), so those are reported as dropped, never dropped silently.
"""

from __future__ import annotations

import io
import logging
import struct
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

import numpy as np
import tifffile
from PIL import Image

from pipeline.image_meta import (
    DESCRIPTIVE_TAGS,
    conversion_note,
    convert_to_srgb,
    exif_as_tiff_tags,
    exif_from_tiff,
    orient,
    rotation_note,
    srgb_profile,
    upright_size,
)
from pipeline.image_types import (
    DecodedImage,
    ImageDecodeError,
    ImageMetadata,
    check_pixels,
    reason,
    to_planes,
)

TIFF_SIGNATURES = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic and BigTIFF
FLOAT_TOLERANCE = 1e-3  # float samples this far outside [0, 1] are clipped, further refused
DEFLATE_LEVEL = 1
PHOTOMETRIC = tifffile.PHOTOMETRIC
_NOT_A_PAGE = tifffile.FILETYPE.REDUCEDIMAGE | tifffile.FILETYPE.MASK
_COLOURS = {PHOTOMETRIC.MINISWHITE: 1, PHOTOMETRIC.MINISBLACK: 1, PHOTOMETRIC.RGB: 3,
            PHOTOMETRIC.PALETTE: 1, PHOTOMETRIC.SEPARATED: 4, PHOTOMETRIC.YCBCR: 3}  # fmt: skip
_JPEG = (6, 7, 34892)  # old-style JPEG, JPEG, lossy JPEG (DNG)
_EXIF_POINTERS = (34665, 34853)
_INCH, _CENTIMETRE = 2, 3


def is_tiff(data: bytes) -> bool:
    return data[:4] in TIFF_SIGNATURES


class _ThreadErrors(logging.Handler):
    """tifffile's ERROR records from this thread (the validator reads files on threads)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.thread = threading.get_ident()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread == self.thread:
            self.messages.append(record.getMessage())

    def check(self) -> None:
        if self.messages:
            raise ImageDecodeError(
                f"not a readable TIFF (corrupt or truncated: {self.messages[0]})"
            )


@contextmanager
def _tiff_file(data: bytes) -> Iterator[tuple[tifffile.TiffFile, _ThreadErrors]]:
    """An open TiffFile whose logged errors are collected; any other failure becomes an
    ImageDecodeError."""
    errors = _ThreadErrors()
    log = tifffile.logger()
    log.addHandler(errors)
    try:
        with tifffile.TiffFile(io.BytesIO(data)) as tif:
            yield tif, errors
    except ImageDecodeError:
        raise
    except MemoryError:
        raise ImageDecodeError("not decodable in this worker's memory") from None
    except Exception as error:  # TiffFileError, codec errors, struct.error, ValueError...
        detail = f"; {errors.messages[0]}" if errors.messages else ""
        raise ImageDecodeError(f"not a readable TIFF ({reason(error)}{detail})") from None
    finally:
        log.removeHandler(errors)


def _the_page(tif: tifffile.TiffFile, errors: _ThreadErrors) -> tifffile.TiffPage:
    """The one full-resolution page; several are refused with their count."""
    tif.pages.useframes = False  # whole pages (tags), not tifffile's lightweight frames
    pages = [
        page
        for page in tif.pages
        if isinstance(page, tifffile.TiffPage) and not page.subfiletype & _NOT_A_PAGE
    ]
    errors.check()  # an IFD chain cut short reads as fewer pages: never trust the count then
    if not pages:
        raise ImageDecodeError("not a readable TIFF (no full-resolution image in it)")
    if len(pages) > 1:
        raise ImageDecodeError(
            f"multi-page TIFF with {len(pages)} full-resolution pages; one image per file is "
            "restored: split the pages into separate files"
        )
    return pages[0]


def tiff_size(data: bytes) -> tuple[int, int]:
    """Displayed (width, height), orientation applied; raises ImageDecodeError when `data`
    (the first bytes of a file) does not hold the whole IFD chain."""
    with _tiff_file(data) as (tif, errors):
        page = _the_page(tif, errors)
        size = (page.imagewidth, page.imagelength)
        orientation = int(page.tags.valueof(274, 1) or 1)
        errors.check()
    return upright_size(size, orientation)


def decode_tiff(data: bytes, max_pixels: int | None) -> DecodedImage:
    """A TIFF's pixels (upright) and metadata; its declared size is checked first."""
    with _tiff_file(data) as (tif, errors):
        page = _the_page(tif, errors)
        check_pixels((page.imagewidth, page.imagelength), max_pixels)
        kind = _check_kind(page)
        orientation = int(page.tags.valueof(274, 1) or 1)
        metadata = _metadata(tif, page, data)
        if kind is None:  # uncompressed YCbCr, often chroma-subsampled: tifffile would
            # return it unconverted; Pillow (libtiff's RGBA interface) converts it to RGB
            # and applies the orientation itself
            samples, kind = _pillow_rgb(data), _Kind(3, False, False, False)
            if orientation != 1:
                note = rotation_note(orientation, "TIFF")
                metadata = replace(metadata, notes=(*metadata.notes, note))
            return _decoded(samples, page, kind, metadata, 1)
        samples = page.asarray(squeeze=False, maxworkers=1)  # (S sep, Z, H, W, S contig)
        errors.check()
        # (H, W, S) whichever way the samples were stored
        samples = np.moveaxis(samples[:, 0, :, :, 0], 0, -1) if kind.separate else samples[0, 0]
        return _decoded(samples, page, kind, metadata, orientation)


def _pillow_rgb(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"), dtype=np.uint8)


@dataclass(frozen=True)
class _Kind:
    colours: int  # colour samples per pixel as stored (4 for CMYK)
    alpha: bool  # one extra sample, kept as alpha
    associated: bool  # ... premultiplied into the colours
    separate: bool  # planar configuration 2


def _name(kind: type[tifffile.PHOTOMETRIC | tifffile.SAMPLEFORMAT], value: int) -> str:
    try:
        return kind(value).name
    except ValueError:
        return str(value)


def _check_kind(page: tifffile.TiffPage) -> _Kind | None:
    """What the page's samples are, refused (before decoding) when we cannot restore them."""
    photometric, bits, sampleformat = page.photometric, page.bitspersample, page.sampleformat
    what = _name(PHOTOMETRIC, photometric)
    if page.imagedepth > 1:
        raise ImageDecodeError(f"a volume TIFF ({page.imagedepth} slices) is not an image")
    if photometric == PHOTOMETRIC.YCBCR and page.compression not in _JPEG:
        return None  # chroma-subsampled YCbCr: Pillow (libtiff) converts it
    if photometric in (PHOTOMETRIC.CIELAB, PHOTOMETRIC.ICCLAB, PHOTOMETRIC.ITULAB):
        raise ImageDecodeError(
            f"{what} TIFF is not supported: convert it to RGB (with its profile) and resubmit"
        )
    if photometric not in _COLOURS:
        raise ImageDecodeError(
            f"TIFF photometric {what} is not supported (grey, RGB, palette or CMYK only)"
        )
    if photometric == PHOTOMETRIC.SEPARATED:
        if int(page.tags.valueof(332, 1) or 1) != 1:  # InkSet 2: not CMYK
            raise ImageDecodeError("multi-ink (non-CMYK) separated TIFF is not supported")
        if bits != 8:
            raise ImageDecodeError(
                f"{bits}-bit CMYK TIFF is not supported: convert it to RGB (with its profile) "
                "and resubmit"
            )
    if sampleformat == tifffile.SAMPLEFORMAT.IEEEFP:
        grey_or_rgb = (PHOTOMETRIC.MINISBLACK, PHOTOMETRIC.MINISWHITE, PHOTOMETRIC.RGB)
        if bits not in (16, 32, 64) or photometric not in grey_or_rgb:
            raise ImageDecodeError(f"{bits}-bit float {what} TIFF is not supported")
    elif sampleformat != tifffile.SAMPLEFORMAT.UINT or bits > 16:
        kind = _name(tifffile.SAMPLEFORMAT, sampleformat).lower()
        raise ImageDecodeError(
            f"{bits}-bit {kind} TIFF samples are not supported (unsigned integers up to 16 "
            "bits, or floats)"
        )
    colours = _COLOURS[PHOTOMETRIC(photometric)]
    extra = page.samplesperpixel - colours
    if extra < 0 or extra > 1 or (extra and photometric == PHOTOMETRIC.PALETTE):
        raise ImageDecodeError(
            f"TIFF with {page.samplesperpixel} samples per pixel for {what}: at most one "
            "extra sample (alpha) is supported"
        )
    associated = bool(extra) and page.extrasamples[:1] == (tifffile.EXTRASAMPLE.ASSOCALPHA,)
    separate = page.planarconfig == tifffile.PLANARCONFIG.SEPARATE
    return _Kind(colours, bool(extra), associated, separate)


def _decoded(
    samples: np.ndarray, page: tifffile.TiffPage, kind: _Kind, metadata: ImageMetadata,
    orientation: int,
) -> DecodedImage:  # fmt: skip
    """(H, W, S) samples as stored -> the upright DecodedImage."""
    notes = list(metadata.notes)
    photometric, bits = page.photometric, page.bitspersample
    full: float | None  # the stored value that means 1.0; None for floats
    if samples.dtype == np.bool_:
        samples, full, depth = samples.view(np.uint8), 1.0, 8
    elif samples.dtype.kind == "f":
        full, depth = None, 32
    else:
        full, depth = float(2**bits - 1), (8 if bits <= 8 else 16)
    if photometric == PHOTOMETRIC.MINISWHITE:  # white is zero: store as black is zero
        colour = samples[:, :, :1]
        inverted = (1.0 - colour) if full is None else (np.asarray(full, samples.dtype) - colour)
        samples = np.concatenate([inverted.astype(samples.dtype), samples[:, :, 1:]], axis=2)
    if photometric == PHOTOMETRIC.PALETTE:
        samples, full, depth = _expand_palette(samples[:, :, 0], page)
    if photometric == PHOTOMETRIC.SEPARATED:
        samples = _cmyk_to_rgb(samples, kind, metadata.icc_profile)
        notes.append(conversion_note("CMYK TIFF"))
        metadata = replace(metadata, icc_profile=srgb_profile())
    if orientation != 1:
        samples = orient(samples, orientation)
        notes.append(rotation_note(orientation, "TIFF"))
    if full is None:
        _check_float_range(samples)
    pixels, alpha = to_planes(samples, kind.alpha, full)
    if full is None:
        np.clip(pixels, 0.0, 1.0, out=pixels)
        if alpha is not None:
            np.clip(alpha, 0.0, 1.0, out=alpha)
    if kind.associated and alpha is not None:
        np.divide(pixels, alpha, out=pixels, where=alpha > 0)
        np.clip(pixels, 0.0, 1.0, out=pixels)
        notes.append("un-premultiplied its associated alpha (written as unassociated alpha)")
    return DecodedImage(pixels, alpha, depth, "tiff", replace(metadata, notes=tuple(notes)))


def _expand_palette(indices: np.ndarray, page: tifffile.TiffPage) -> tuple[np.ndarray, float, int]:
    """Palette indices -> (H, W, 3) RGB at the colour map's real depth (TIFF colour maps are
    16-bit; most hold 8-bit colours times 257)."""
    colormap = page.colormap
    if colormap is None or colormap.ndim != 2 or colormap.shape[0] != 3:
        raise ImageDecodeError("not a readable TIFF (palette image without a colour map)")
    table = np.ascontiguousarray(colormap.T.astype(np.uint16))  # (entries, 3)
    if int(indices.max(initial=0)) >= len(table):
        raise ImageDecodeError("not a readable TIFF (palette index beyond its colour map)")
    if not np.any(table % 257):
        return (table // 257).astype(np.uint8)[indices], 255.0, 8
    return table[indices], 65535.0, 16


def _cmyk_to_rgb(samples: np.ndarray, kind: _Kind, icc_profile: bytes | None) -> np.ndarray:
    """8-bit CMYK(+alpha) -> 8-bit RGB(+alpha) through the embedded profile (image_meta)."""
    height, width = samples.shape[:2]
    cmyk = np.ascontiguousarray(samples[:, :, :4])
    image = Image.frombytes("CMYK", (width, height), cmyk.tobytes())
    rgb = np.asarray(convert_to_srgb(image, icc_profile, "CMYK TIFF"), dtype=np.uint8)
    return np.concatenate([rgb, samples[:, :, 4:]], axis=2) if kind.alpha else rgb


def _check_float_range(samples: np.ndarray) -> None:
    if not np.isfinite(samples).all():
        raise ImageDecodeError("float TIFF with NaN or infinite samples")
    if samples.size == 0:
        return
    low, high = float(samples.min()), float(samples.max())
    if low < -FLOAT_TOLERANCE or high > 1.0 + FLOAT_TOLERANCE:
        raise ImageDecodeError(
            f"float TIFF samples range from {low:.6g} to {high:.6g}, outside [0, 1]: only "
            "display-referred floats are supported; scale it into [0, 1] and resubmit"
        )


def _metadata(tif: tifffile.TiffFile, page: tifffile.TiffPage, data: bytes) -> ImageMetadata:
    tags = page.tags
    xmp = tags.valueof(700)
    exif = None
    if any(code in tags for code in (*_EXIF_POINTERS, *DESCRIPTIVE_TAGS)):
        exif = exif_from_tiff(data)
    return ImageMetadata(
        icc_profile=_as_bytes(tags.valueof(34675), tif.byteorder),
        dpi=_dpi(page),
        exif=exif,
        xmp=_as_bytes(xmp, tif.byteorder),
        iptc=_as_bytes(tags.valueof(33723), tif.byteorder),
    )


def _as_bytes(value: object, byteorder: str) -> bytes | None:
    """A tag's value as bytes: BYTE/UNDEFINED tags come as bytes, IPTC as LONGs."""
    if value is None:
        return None
    if isinstance(value, (bytes, bytearray)):
        return bytes(value) or None
    if isinstance(value, str):
        return value.encode() or None
    if isinstance(value, int):
        value = (value,)
    if isinstance(value, (tuple, list, np.ndarray)):
        return struct.pack(f"{byteorder}{len(value)}I", *(int(v) for v in value)) or None
    return None


def _dpi(page: tifffile.TiffPage) -> tuple[float, float] | None:
    """Dots per inch from XResolution / YResolution / ResolutionUnit (inch by default,
    centimetres converted); None without them or with unit "none" (an aspect ratio)."""
    tags = page.tags
    unit = int(tags.valueof(296, _INCH) or _INCH)
    x, y = tags.valueof(282), tags.valueof(283)
    if x is None or unit not in (_INCH, _CENTIMETRE):
        return None
    y = x if y is None else y
    try:
        dpi = [float(v[0]) / float(v[1]) if isinstance(v, tuple) else float(v) for v in (x, y)]
    except (ZeroDivisionError, TypeError, ValueError, IndexError):
        return None
    if unit == _CENTIMETRE:
        dpi = [d * 2.54 for d in dpi]
    return (dpi[0], dpi[1]) if all(d > 0 and np.isfinite(d) for d in dpi) else None


def encode_tiff(
    samples: np.ndarray, has_alpha: bool, metadata: ImageMetadata
) -> tuple[bytes, tuple[str, ...]]:
    """(H, W, S) uint8 / uint16 / float32 samples -> (TIFF bytes, metadata dropped)."""
    colours = samples.shape[2] - (1 if has_alpha else 0)
    extratags, more_exif = exif_as_tiff_tags(metadata.exif)
    if metadata.xmp:
        extratags.append((700, 1, len(metadata.xmp), metadata.xmp, True))  # BYTE
    if metadata.iptc:
        padded = metadata.iptc + b"\x00" * (-len(metadata.iptc) % 4)
        longs = struct.unpack(f"<{len(padded) // 4}I", padded)
        extratags.append((33723, 4, len(longs), longs, True))  # LONG, as Photoshop writes
    buffer = io.BytesIO()
    tifffile.imwrite(
        buffer,
        samples if samples.shape[2] > 1 else samples[:, :, 0],
        byteorder="<",
        photometric="rgb" if colours == 3 else "minisblack",
        planarconfig="contig" if samples.shape[2] > 1 else None,
        extrasamples=("UNASSALPHA",) if has_alpha else None,
        compression="adobe_deflate",
        compressionargs={"level": DEFLATE_LEVEL},
        predictor=True,  # horizontal differencing; floating-point predictor for float32
        resolution=metadata.dpi,
        resolutionunit="INCH" if metadata.dpi else None,
        iccprofile=metadata.icc_profile,
        metadata=None,  # no tifffile JSON in ImageDescription
        software="dippipe",
        extratags=extratags,
        maxworkers=1,
    )
    dropped = ("EXIF camera and GPS tags (TIFF output)",) if more_exif else ()
    return buffer.getvalue(), dropped
