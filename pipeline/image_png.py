"""PNG pixels through imagecodecs (libpng), PNG metadata chunks added by hand.

Codec choice, measured on a 4000x3000 16-bit RGB scan with noise (72 MB of samples), one
thread, this project's shared 2-core machine, codec calls alone:

    imagecodecs 2026.3.6 png_encode, defaults (zlib 6, adaptive)  encode 2.3 s  decode 0.45 s
    imagecodecs png_encode(level=1, strategy=RLE, filter=SUB)     encode 0.7 s  decode 0.42 s
    OpenCV 5.1.0 imencode / imdecode, PNG compression 1 or 3      encode 2.4 s  decode 0.50 s
    pypng (the previous codec), 512x512 crop scaled to 12 Mpx     encode 3.0 s  decode 9.0 s

and through decode_image / encode_image (``python -m benchmarks.image_io``, float planes
included): encode 0.88 s, decode 0.51 s. The fast settings (those imagecodecs documents as
OpenCV's fast ones) cost under 1 % of file size on noisy 16-bit data and were smaller than
the defaults on a smooth scan (55.0 vs 56.0 MB): a scan's low bits are noise no filter
predicts. imagecodecs decodes as fast as OpenCV and encodes 3x faster with these settings,
and tifffile needs it anyway, so OpenCV (a 170 MB install, opencv-python-headless) is not
added. 8-bit and lower PNGs are decoded by Pillow (palettes, 1/2/4-bit grey, tRNS colour keys, all
long-tested there); 16-bit ones by imagecodecs, which Pillow cannot do (it truncates 16-bit
RGB to 8 bits). imagecodecs expands a tRNS colour key to an alpha channel.

Metadata: imagecodecs' encoder writes IHDR, IDAT and IEND only, so :func:`add_chunks` inserts
the metadata chunks right after IHDR (before IDAT, where the PNG spec wants iCCP, pHYs, gAMA,
cHRM and sRGB and where readers look for eXIf): iCCP (the ICC profile, zlib-compressed), pHYs
(DPI, in pixels per metre), eXIf (the TIFF-structured EXIF without Pillow's "Exif\\0\\0"
prefix), an iTXt ``XML:com.adobe.xmp`` (XMP, uncompressed UTF-8, as Adobe writes it), the
source's CARRIED_CHUNKS as they were (text chunks, gAMA, cHRM, sRGB) and a tEXt ``Software``
"dippipe" (the source's Software text is superseded, as in a TIFF). A chunk is length, type,
data, CRC-32 of type + data: a dozen lines here instead of a second PNG codec (pypng, slow)
only for its chunk API. PNG has no registered IPTC chunk: IPTC is reported as dropped.

Reading: Pillow reads IHDR, PLTE, tRNS, iCCP, pHYs, eXIf and the XMP text into pixels and
ImageMetadata fields; :func:`png_extras` walks the chunk list (lengths only, no pixel data
touched) for CARRIED_CHUNKS and names every other ancillary chunk in a note ("PNG chunks not
carried: bKGD, tIME"), as it does a pHYs pixel aspect ratio without a unit.
"""

from __future__ import annotations

import struct
import zlib

import imagecodecs
import numpy as np

from pipeline.image_types import ImageDecodeError, ImageMetadata, reason

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_IHDR_END = len(PNG_SIGNATURE) + 4 + 4 + 13 + 4  # signature, length, "IHDR", data, CRC
_METRES_PER_INCH = 0.0254
_Z_RLE, _FILTER_SUB = 3, 16  # zlib's Z_RLE strategy, libpng's PNG_FILTER_SUB flag
# Ancillary chunks carried verbatim to a PNG output (named as dropped by a TIFF output).
CARRIED_CHUNKS = frozenset({b"tEXt", b"zTXt", b"iTXt", b"gAMA", b"cHRM", b"sRGB"})
# Chunks read into the pixels or ImageMetadata's fields (by Pillow or imagecodecs).
_READ_CHUNKS = frozenset({b"IHDR", b"PLTE", b"IDAT", b"IEND", b"tRNS", b"iCCP", b"pHYs", b"eXIf"})
_XMP_KEYWORD, _SOFTWARE = b"XML:com.adobe.xmp", b"Software"  # read as xmp; superseded
_TEXT_CHUNKS = (b"tEXt", b"zTXt", b"iTXt")


def png_bit_depth(data: bytes) -> int | None:
    """Bit depth from a PNG's IHDR chunk (byte 24), or None when `data` is not a PNG."""
    if len(data) > 25 and data.startswith(PNG_SIGNATURE) and data[12:16] == b"IHDR":
        return data[24]
    return None


def png_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk (bytes 16 to 24)."""
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def decode_png16(data: bytes) -> np.ndarray:
    """Samples of a 16-bit PNG as (H, W, S) uint16, S = 1 grey, 2 grey + alpha, 3 RGB,
    4 RGBA (a tRNS colour key becomes an alpha channel)."""
    try:
        samples = imagecodecs.png_decode(data)
    except MemoryError:
        raise ImageDecodeError("not decodable in this worker's memory") from None
    except Exception as error:  # PngError (CRC, truncation, zlib), ValueError, ...
        raise ImageDecodeError(f"not a readable 16-bit PNG ({reason(error)})") from None
    if samples.dtype != np.uint16 or samples.ndim not in (2, 3):
        raise ImageDecodeError(f"not a readable 16-bit PNG (decoded as {samples.dtype})")
    return samples[:, :, None] if samples.ndim == 2 else samples


def encode_png_samples(samples: np.ndarray) -> bytes:
    """(H, W, S) uint8 or uint16 samples, S = 1 to 4 -> PNG bytes (no metadata)."""
    array = np.ascontiguousarray(samples[:, :, 0] if samples.shape[2] == 1 else samples)
    return bytes(imagecodecs.png_encode(array, level=1, strategy=_Z_RLE, filter=_FILTER_SUB))


def png_extras(data: bytes) -> tuple[tuple[tuple[bytes, bytes], ...], tuple[str, ...]]:
    """(the CARRIED_CHUNKS of a PNG file, as (type, data), notes naming what is not carried);
    stops quietly where the chunk list is damaged (the pixel decoder reports that)."""
    carried: list[tuple[bytes, bytes]] = []
    lost: list[str] = []
    notes: list[str] = []
    view, at = memoryview(data), len(PNG_SIGNATURE)
    while at + 8 <= len(data):
        (length,) = struct.unpack_from(">I", data, at)
        kind = bytes(view[at + 4 : at + 8])
        body = view[at + 8 : at + 8 + length]
        if not kind.isalpha() or len(body) < length or kind == b"IEND":
            break
        at += 12 + length
        if kind == b"pHYs" and length == 9 and body[8] == 0:  # unit 0: an aspect ratio only
            x, y = struct.unpack_from(">II", body)
            if x != y:
                notes.append(f"pixel aspect ratio {x}:{y} (pHYs without a unit) not carried")
        elif kind in CARRIED_CHUNKS:
            if chunk_keyword(kind, bytes(body[:80])) not in (_XMP_KEYWORD, _SOFTWARE):
                carried.append((kind, bytes(body)))
        elif kind not in _READ_CHUNKS:
            lost.append(kind.decode("ascii"))
    if lost:
        notes.append("PNG chunks not carried: " + ", ".join(dict.fromkeys(lost)))
    return tuple(carried), tuple(notes)


def chunk_keyword(kind: bytes, data: bytes) -> bytes | None:
    """A text chunk's keyword (up to its NUL); None for other chunks."""
    return data.split(b"\x00", 1)[0] if kind in _TEXT_CHUNKS else None


def chunk_label(kind: bytes, data: bytes) -> str:
    """How a carried chunk is named in notes: ``tEXt Copyright``, ``gAMA``."""
    keyword = chunk_keyword(kind, data)
    name = kind.decode("ascii")
    return name if keyword is None else f"{name} {keyword.decode('latin-1')}"


def add_chunks(png: bytes, metadata: ImageMetadata) -> bytes:
    """The PNG with its metadata chunks inserted after IHDR (see the module docstring)."""
    chunks = []
    if metadata.icc_profile:
        name = b"ICC Profile\x00\x00"  # keyword, NUL, compression method 0 (zlib)
        chunks.append(_chunk(b"iCCP", name + zlib.compress(metadata.icc_profile)))
    if metadata.dpi:
        x, y = (max(1, round(d / _METRES_PER_INCH)) for d in metadata.dpi)
        chunks.append(_chunk(b"pHYs", struct.pack(">IIB", x, y, 1)))  # unit 1: metre
    if metadata.exif:
        raw = metadata.exif.removeprefix(b"Exif\x00\x00")
        chunks.append(_chunk(b"eXIf", raw))
    if metadata.xmp:
        # keyword, NUL, compression flag 0, method 0, empty language tag and translated
        # keyword (each NUL-terminated), then the UTF-8 text
        header = b"XML:com.adobe.xmp\x00\x00\x00\x00\x00"
        chunks.append(_chunk(b"iTXt", header + metadata.xmp))
    chunks += [_chunk(kind, data) for kind, data in metadata.png_chunks]
    chunks.append(_chunk(b"tEXt", _SOFTWARE + b"\x00dippipe"))
    if png[12:16] != b"IHDR":
        raise ValueError("not a PNG with IHDR first")
    return png[:_IHDR_END] + b"".join(chunks) + png[_IHDR_END:]


def _chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)
