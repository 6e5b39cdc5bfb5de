"""ICC profiles for tests, built here: Pillow's ImageCms can make sRGB / LAB / XYZ profiles but
no CMYK one, and no CMYK profile ships with any dependency. This one is a minimal, valid ICC
v2 output-class profile: a lut8 A2B0 table (CMYK -> Lab, 2 grid points per ink, multilinear
in between) that lcms accepts; its colours are plausible, not a real press."""

from __future__ import annotations

import itertools
import struct

import numpy as np
from PIL import ImageCms


def _s15(value: float) -> bytes:
    return struct.pack(">i", round(value * 65536))


def _tag_desc(text: str) -> bytes:
    ascii_text = text.encode("ascii") + b"\x00"
    return (
        b"desc\x00\x00\x00\x00"
        + struct.pack(">I", len(ascii_text))
        + ascii_text
        + struct.pack(">II", 0, 0)  # Unicode language code, count
        + struct.pack(">HB", 0, 0)  # ScriptCode code, count
        + b"\x00" * 67
    )


def _lab(c: int, m: int, y: int, k: int) -> tuple[float, float, float]:
    """A toy press: inks darken and tint; black darkens everything."""
    paper = 1.0 - k * 0.92
    lightness = 100.0 * paper * (1.0 - 0.30 * c - 0.45 * m - 0.08 * y + 0.1 * c * m * y)
    a = paper * (-38.0 * c + 72.0 * m - 6.0 * y)
    b = paper * (-45.0 * c - 12.0 * m + 88.0 * y)
    return max(lightness, 0.0), a, b


def cmyk_profile(description: str = "dippipe test CMYK") -> bytes:
    """An ICC v2 CMYK profile (device class 'prtr', PCS Lab) with a lut8 A2B0."""
    clut = bytearray()
    for c, m, y, k in itertools.product((0, 1), repeat=4):  # first input varies slowest
        lightness, a, b = _lab(c, m, y, k)
        clut += bytes(
            int(np.clip(round(v), 0, 255))
            for v in (lightness * 255 / 100, a + 128, b + 128)  # lut8 Lab encoding
        )
    identity = bytes(range(256))
    matrix = b"".join(_s15(1.0 if i == j else 0.0) for i in range(3) for j in range(3))
    a2b0 = b"mft1\x00\x00\x00\x00" + bytes([4, 3, 2, 0]) + matrix
    a2b0 += identity * 4 + bytes(clut) + identity * 3
    wtpt = b"XYZ \x00\x00\x00\x00" + _s15(0.9642) + _s15(1.0) + _s15(0.8249)
    cprt = b"text\x00\x00\x00\x00" + b"No copyright, test data\x00"
    tags = [(b"desc", _tag_desc(description)), (b"wtpt", wtpt), (b"cprt", cprt), (b"A2B0", a2b0)]

    offset = 128 + 4 + 12 * len(tags)
    table, body = bytearray(struct.pack(">I", len(tags))), bytearray()
    for signature, data in tags:
        padded = data + b"\x00" * (-len(data) % 4)
        table += signature + struct.pack(">II", offset + len(body), len(data))
        body += padded
    size = 128 + len(table) + len(body)
    header = (
        struct.pack(">I", size)
        + b"lcms"
        + struct.pack(">I", 0x02100000)  # version 2.1
        + b"prtrCMYKLab "
        + struct.pack(">6H", 2026, 1, 1, 0, 0, 0)
        + b"acsp"
        + b"\x00" * 4  # platform
        + b"\x00" * 4  # flags
        + b"\x00" * 8  # manufacturer, model
        + b"\x00" * 8  # attributes
        + struct.pack(">I", 0)  # rendering intent: perceptual
        + _s15(0.9642)
        + _s15(1.0)
        + _s15(0.8249)  # PCS illuminant D50
        + b"test"  # creator
        + b"\x00" * 16  # profile ID
        + b"\x00" * 28  # reserved
    )
    assert len(header) == 128
    return header + bytes(table) + bytes(body)


def srgb_profile() -> bytes:
    return bytes(ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes())


def undated(profile: bytes | None) -> bytes | None:
    """A profile without its header's creation date and time (bytes 24 to 35, ICC.1 7.2.1):
    lcms stamps the current second into every profile it builds, so two builds of the sRGB
    profile differ only there."""
    return None if profile is None else profile[:24] + profile[36:]
