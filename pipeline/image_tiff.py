"""TIFF through tifffile (+ imagecodecs for LZW, deflate, JPEG-in-TIFF, ...), samples kept
at their depth: 8- and 16-bit integers, float32 as float.

Reading: one full-resolution page (reduced-resolution pages, NewSubfileType bit 0, masks and
SubIFDs do not count; several pages are refused, naming the count, rather than silently
restoring the first). The declared size is checked against the pixel limit before any strip
is decoded, and strips or tiles beyond the end of the file are refused as truncation.
MINISWHITE is inverted, palettes expanded (see :func:`_expand_palette`), planar-separate
samples interleaved, the Orientation tag applied. Only an extra sample labelled alpha
(ExtraSamples 1 or 2) is alpha: associated (premultiplied) alpha is un-premultiplied, with a
note, and written back as unassociated; an unlabelled extra sample (a scanner's infrared
channel) or a second alpha is not carried, with a note. CMYK (8-bit) is converted to sRGB
with its embedded profile (image_meta); 16-bit CMYK, CIELab and other photometrics are
refused with the reason. Float samples must lie in [0, 1] (within FLOAT_TOLERANCE): the
method fits display-referred values, and clipping an HDR scan silently would destroy it.

Tags: those that lay out the pixels (_PIXEL_TAGS), those read into ImageMetadata (resolution,
ICC, XMP, IPTC, EXIF's descriptive tags and IFDs) or superseded by what we write (Software,
a writer's own ImageDescription), and CARRIED_TAGS (DocumentName, PageName, PageNumber,
HostComputer: kept for a TIFF output). Every other tag is named in a note ("TIFF tags not
carried: GeoKeyDirectoryTag, ImageResources"); GeoTIFF tags are among them on purpose: they map
stored pixels to the ground, which a super-resolved or turned image no longer matches.
Resolution follows tifffile: ResolutionUnit inch (the TIFF default), centimetre, millimetre
or micrometre gives DPI; unit none gives no DPI (a non-square pixel aspect is noted).

tifffile reports some damage (tag values or the next IFD beyond the end of the data, missing
strip byte counts) in its log instead of raising, then goes on with what it could read. The
decoders here collect those records (this thread's only): an unreadable tag that does not
lay out the pixels (a broken private tag) is skipped with a note ("ignored unreadable TIFF
tag 65000"); anything else is an ImageDecodeError, so a damaged IFD chain is refused, and
:func:`tiff_size` on the first bytes of a file whose IFD lies at its end fails, so
``validate`` and the look-ahead then give it a file object that reads ranges on demand.

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

Metadata written: XResolution / YResolution / ResolutionUnit (inch; without DPI, tifffile's
default 1/1 with unit none, the baseline tags' "no absolute resolution", which readers take
as no DPI), the ICC profile (tag 34675), XMP (700), IPTC (33723, as LONGs like Photoshop,
which tifffile and libtiff expect), Software "dippipe", CARRIED_TAGS, and from EXIF the
descriptive IFD0 tags (ImageDescription, Make, Model, DateTime, Artist, Copyright). tifffile
cannot write an EXIF or GPS IFD (pointer tags 34665 / 34853 need sub-IFDs it does not
write), so those are reported as dropped, never dropped silently.
"""

from __future__ import annotations

import io
import logging
import re
import struct
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import BinaryIO

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
    upright_dpi,
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
_ALPHA = (tifffile.EXTRASAMPLE.ASSOCALPHA, tifffile.EXTRASAMPLE.UNASSALPHA)
_RESUNIT = tifffile.RESUNIT
_LENGTH_UNITS = (_RESUNIT.INCH, _RESUNIT.CENTIMETER, _RESUNIT.MILLIMETER, _RESUNIT.MICROMETER)
# Tags that lay out the pixels (read, then written anew by tifffile), sample statistics
# (Min/MaxSampleValue: the old samples') included: unreadable, they make the file unreadable.
_PIXEL_TAGS = frozenset({
    254, 255, 256, 257, 258, 259, 262, 266, 273, 274, 277, 278, 279, 280, 281, 284, 317, 320,
    322, 323, 324, 325, 330, 332, 338, 339, 340, 341, 347, *range(512, 522), 529, 530, 531,
    532, 32997, 32998,
})  # fmt: skip
# Tags read into ImageMetadata (resolution, ICC, XMP, IPTC, EXIF) or superseded by what we
# write (Software: "dippipe"); DESCRIPTIVE_TAGS travel inside the EXIF block.
_READ_TAGS = frozenset({282, 283, 296, 305, 700, 33723, 34675, *_EXIF_POINTERS, *DESCRIPTIVE_TAGS})
# Descriptive tags carried as they are to a TIFF output (named as dropped by a PNG output).
CARRIED_TAGS = {269: "DocumentName", 285: "PageName", 297: "PageNumber", 316: "HostComputer"}
_TAG_ERROR = re.compile(r"TiffTag (\d+) @")  # tifffile's "<tifffile.TiffTag 65000 @190> ..."


def is_tiff(data: bytes) -> bool:
    return data[:4] in TIFF_SIGNATURES


class _ThreadErrors(logging.Handler):
    """tifffile's ERROR records from this thread (the validator reads files on threads):
    ``skipped`` lists the codes of unreadable tags that do not lay out the pixels (tifffile
    leaves them out), ``messages`` everything else."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.thread = threading.get_ident()
        self.messages: list[str] = []
        self.skipped: list[int] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread != self.thread:
            return
        message = record.getMessage()
        tag = _TAG_ERROR.search(message)
        if tag and int(tag.group(1)) not in _PIXEL_TAGS:
            self.skipped.append(int(tag.group(1)))
        else:
            self.messages.append(message)

    def notes(self) -> list[str]:
        return [
            f"ignored unreadable TIFF tag {code}" + (f" ({name})" if name else "")
            for code in dict.fromkeys(self.skipped)
            for name in [_tag_name(code, "")]
        ]

    def check(self) -> None:
        if self.messages:
            raise ImageDecodeError(
                f"not a readable TIFF (corrupt or truncated: {self.messages[0]})"
            )


@contextmanager
def _tiff_file(data: bytes | BinaryIO) -> Iterator[tuple[tifffile.TiffFile, _ThreadErrors]]:
    """An open TiffFile (on bytes, or a file object read on demand) whose logged errors are
    collected; any other failure becomes an ImageDecodeError."""
    errors = _ThreadErrors()
    log = tifffile.logger()
    log.addHandler(errors)
    try:
        with tifffile.TiffFile(io.BytesIO(data) if isinstance(data, bytes) else data) as tif:
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


def _tag_name(code: int, default: str) -> str:
    return tifffile.TIFF.TAGS.get(code, default)


def _the_page(tif: tifffile.TiffFile, errors: _ThreadErrors, data: bytes) -> tifffile.TiffPage:
    """The one full-resolution page; several are refused with their count."""
    tif.pages.useframes = False  # whole pages (tags), not tifffile's lightweight frames
    pages = [
        page
        for page in tif.pages
        if isinstance(page, tifffile.TiffPage) and not page.subfiletype & _NOT_A_PAGE
    ]
    errors.check()  # an IFD chain cut short reads as fewer pages: never trust the count then
    if not pages:
        raise ImageDecodeError(f"not a readable TIFF ({_why_no_page(tif, data)})")
    if len(pages) > 1:
        raise ImageDecodeError(
            f"multi-page TIFF with {len(pages)} full-resolution pages; one image per file is "
            "restored: split the pages into separate files"
        )
    return pages[0]


def _why_no_page(tif: tifffile.TiffFile, data: bytes) -> str:
    """Why a TIFF has no full-resolution page: cut before its first IFD (a TIFF written with
    its IFD after the pixels, cut short), none at all, or only reduced images and masks."""
    if len(tif.pages):
        return "only reduced-resolution images or masks in it, no full-resolution image"
    if not data:  # read from a file object: its bytes are not at hand
        return "no image in it"
    big = data[2:4] in (b"+\x00", b"\x00+")
    at, size = (8, "Q") if big else (4, "I")
    order = "<" if data[:2] == b"II" else ">"
    if len(data) < at + struct.calcsize(size):
        return f"truncated: the file ends at byte {len(data):,}, inside its header"
    (first,) = struct.unpack_from(order + size, data, at)
    if first >= len(data):
        return (
            f"truncated or corrupt: its first IFD is at byte {first:,}, beyond the end of "
            f"the file at byte {len(data):,}"
        )
    return "no image in it"


def _check_complete(page: tifffile.TiffPage, data: bytes) -> None:
    """Refuse a page whose strips or tiles run past the end of the file (a cut download)."""
    end = max(
        (o + n for o, n in zip(page.dataoffsets, page.databytecounts, strict=False) if n),
        default=0,
    )
    if end > len(data):
        raise ImageDecodeError(
            f"not a readable TIFF (truncated: its image data runs to byte {end:,}, the file "
            f"ends at byte {len(data):,})"
        )


def tiff_size(data: bytes | BinaryIO) -> tuple[int, int]:
    """Displayed (width, height), orientation applied; raises ImageDecodeError when `data`
    (the first bytes of a file) does not hold the whole IFD chain. Given a file object
    instead (e.g. fsspec's, which reads ranges on demand), it reads the IFDs wherever they
    lie, and nothing of the pixels."""
    with _tiff_file(data) as (tif, errors):
        page = _the_page(tif, errors, data if isinstance(data, bytes) else b"")
        size = (page.imagewidth, page.imagelength)
        orientation = int(page.tags.valueof(274, 1) or 1)
        errors.check()
    return upright_size(size, orientation)


def decode_tiff(data: bytes, max_pixels: int | None) -> DecodedImage:
    """A TIFF's pixels (upright) and metadata; its declared size is checked first."""
    with _tiff_file(data) as (tif, errors):
        page = _the_page(tif, errors, data)
        check_pixels((page.imagewidth, page.imagelength), max_pixels)
        kind = _check_kind(page)
        _check_complete(page, data)
        orientation = int(page.tags.valueof(274, 1) or 1)
        metadata = _metadata(tif, page, data)
        metadata = replace(metadata, notes=(*metadata.notes, *errors.notes()))
        if kind is None:  # uncompressed YCbCr, often chroma-subsampled: tifffile would
            # return it unconverted; Pillow (libtiff's RGBA interface) converts it to RGB
            # and applies the orientation itself
            samples, kind = _pillow_rgb(data), _Kind(3, None, False, False, ())
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
    alpha: int | None  # the sample kept as alpha (the first labelled alpha), or None
    associated: bool  # ... premultiplied into the colours
    separate: bool  # planar configuration 2
    dropped: tuple[tuple[int, str], ...] = ()  # other extra samples (0-based, what they are)


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
    if extra < 0 or (extra and photometric == PHOTOMETRIC.PALETTE):
        raise ImageDecodeError(
            f"TIFF with {page.samplesperpixel} samples per pixel for {what} is not supported"
        )
    labels = [*page.extrasamples[:extra]] + [0] * (extra - len(page.extrasamples))  # 0: none
    alphas = [colours + i for i, label in enumerate(labels) if label in _ALPHA]
    alpha = alphas[0] if alphas else None
    associated = alpha is not None and labels[alpha - colours] == _ALPHA[0]
    dropped = tuple(
        (colours + i, "a second alpha" if label in _ALPHA else "unspecified, e.g. infrared")
        for i, label in enumerate(labels)
        if colours + i != alpha
    )
    separate = page.planarconfig == tifffile.PLANARCONFIG.SEPARATE
    return _Kind(colours, alpha, associated, separate, dropped)


def _decoded(
    samples: np.ndarray, page: tifffile.TiffPage, kind: _Kind, metadata: ImageMetadata,
    orientation: int,
) -> DecodedImage:  # fmt: skip
    """(H, W, S) samples as stored -> the upright DecodedImage."""
    notes = list(metadata.notes)
    photometric, bits = page.photometric, page.bitspersample
    if kind.dropped:
        notes += [f"extra sample {at + 1} ({what}) not carried" for at, what in kind.dropped]
        keep = [*range(kind.colours), *([] if kind.alpha is None else [kind.alpha])]
        samples = samples[:, :, keep]
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
        metadata = replace(metadata, dpi=upright_dpi(metadata.dpi, orientation))
        notes.append(rotation_note(orientation, "TIFF"))
    if full is None:
        _check_float_range(samples)
    pixels, alpha = to_planes(samples, kind.alpha is not None, full)
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
    """Palette indices -> (H, W, 3) RGB at the colour map's real depth. TIFF colour maps are
    16-bit, and most hold 8-bit colours: times 256 (Pillow, libtiff's own reading: >> 8),
    times 257 (tifffile, full-scale 65535), or as they are (old writers; libtiff's rule: no
    entry above 255); such maps decode as 8-bit. Any other map keeps its 16 bits."""
    colormap = page.colormap
    if colormap is None or colormap.ndim != 2 or colormap.shape[0] != 3:
        raise ImageDecodeError("not a readable TIFF (palette image without a colour map)")
    table = np.ascontiguousarray(colormap.T.astype(np.uint16))  # (entries, 3)
    if int(indices.max(initial=0)) >= len(table):
        raise ImageDecodeError("not a readable TIFF (palette index beyond its colour map)")
    if not np.any(table & 0xFF):
        eight = table >> 8
    elif not np.any(table % 257):
        eight = table // 257
    elif int(table.max(initial=0)) <= 255:
        eight = table
    else:
        return table[indices], 65535.0, 16
    return eight.astype(np.uint8)[indices], 255.0, 8


def _cmyk_to_rgb(samples: np.ndarray, kind: _Kind, icc_profile: bytes | None) -> np.ndarray:
    """8-bit CMYK(+alpha) -> 8-bit RGB(+alpha) through the embedded profile (image_meta)."""
    height, width = samples.shape[:2]
    cmyk = np.ascontiguousarray(samples[:, :, :4])
    image = Image.frombytes("CMYK", (width, height), cmyk.tobytes())
    rgb = np.asarray(convert_to_srgb(image, icc_profile, "CMYK TIFF"), dtype=np.uint8)
    return np.concatenate([rgb, samples[:, :, 4:]], axis=2) if kind.alpha is not None else rgb


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
    dpi, notes = _dpi(page)
    carried: dict[int, str | tuple[int, ...]] = {}
    lost: list[str] = []
    for tag in tags.values():
        value = _carried_value(tag) if tag.code in CARRIED_TAGS else None
        if value is not None:
            carried.setdefault(tag.code, value)
        elif tag.code not in _PIXEL_TAGS and tag.code not in _READ_TAGS:
            lost.append(_tag_name(tag.code, str(tag.code)))
    if lost:
        notes.append("TIFF tags not carried: " + ", ".join(dict.fromkeys(lost)))
    return ImageMetadata(
        icc_profile=_as_bytes(tags.valueof(34675), tif.byteorder),
        dpi=dpi,
        exif=exif,
        xmp=_as_bytes(xmp, tif.byteorder),
        iptc=_as_bytes(tags.valueof(33723), tif.byteorder),
        notes=tuple(notes),
        tiff_tags=tuple(carried.items()),
    )


def _carried_value(tag: tifffile.TiffTag) -> str | tuple[int, ...] | None:
    """A CARRIED_TAGS tag's value as we write it back: text, or SHORTs (PageNumber)."""
    value = tag.value
    if isinstance(value, str):
        return value.strip("\x00") or None
    if (
        isinstance(value, tuple)
        and value
        and all(isinstance(v, int) and 0 <= v < 65536 for v in value)
    ):
        return tuple(int(v) for v in value)
    return None


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


def _dpi(page: tifffile.TiffPage) -> tuple[tuple[float, float] | None, list[str]]:
    """(dots per inch, notes) as tifffile reads XResolution / YResolution / ResolutionUnit
    (inch when the unit tag is absent, as TIFF defines; other lengths converted). Unit none
    means no DPI: only a pixel aspect ratio, noted when it is not square."""
    if 282 not in page.tags:
        return None, []
    unit = page.resolutionunit
    if unit == _RESUNIT.NONE:
        x, y = page.get_resolution()
        if 283 not in page.tags or x == y:
            return None, []
        return None, [f"pixel aspect ratio {x:g}:{y:g} (resolution without a unit) not carried"]
    if unit not in _LENGTH_UNITS:
        return None, [f"resolution in unknown unit {unit!r} not carried"]
    x, y = (float(v) for v in page.get_resolution(_RESUNIT.INCH))
    y = x if 283 not in page.tags else y
    if all(d > 0 and np.isfinite(d) for d in (x, y)):
        return (x, y), []
    return None, [f"invalid resolution {x:g} x {y:g} dpi not carried"]


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
    for code, value in metadata.tiff_tags:
        if isinstance(value, str):  # tifffile takes 7-bit ASCII as str, other text as bytes
            extratags.append((code, "s", 0, value if value.isascii() else value.encode(), True))
        else:
            extratags.append((code, "H", len(value), value, True))
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
        resolution=metadata.dpi,  # None: tifffile writes 1/1, unit none (no DPI)
        resolutionunit="INCH" if metadata.dpi else "NONE",
        iccprofile=metadata.icc_profile,
        metadata=None,  # no tifffile JSON in ImageDescription
        software="dippipe",
        extratags=extratags,
        maxworkers=1,
    )
    dropped = ("EXIF camera and GPS tags (TIFF output)",) if more_exif else ()
    return buffer.getvalue(), dropped
