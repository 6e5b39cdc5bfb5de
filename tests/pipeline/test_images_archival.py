"""Archivists' files through decode_image / encode_image: depth, orientation, colour profiles,
resolution, EXIF / XMP / IPTC, multi-page and float TIFF, decompression bombs, extra samples,
palettes, PNG chunks and TIFF tags (carried or named), damaged TIFFs. Every file is
made here (tifffile, Pillow, imagecodecs, or by hand) and every expected value comes from
numpy arrays built here or from tifffile / Pillow reading back what was written."""

from __future__ import annotations

import io
import re
import resource
import struct
import time
import zlib

import imagecodecs
import numpy as np
import pytest
import tifffile
from PIL import Image, ImageCms, ImageOps, PngImagePlugin

from pipeline.images import (
    DecodedImage,
    ImageDecodeError,
    ImageMetadata,
    decode_image,
    encode_image,
    encode_png,
    image_size,
    output_format,
)
from pipeline.manifest import job_from_row
from pipeline.storage import Storage
from pipeline.validate import check_job
from tests.support.filesystems import count_ranged_reads
from tests.support.icc import cmyk_profile, srgb_profile, undated

ADOBE_LIKE = bytes(imagecodecs.cms_profile("adobergb"))  # another RGB profile, another maker
XMP = (
    b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-'
    b'rdf-syntax-ns#"><rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" '
    b'tiff:Orientation="6" xmlns:dc="http://purl.org/dc/elements/1.1/"><dc:creator>'
    b"M. Archivist</dc:creator></rdf:Description></rdf:RDF></x:xmpmeta>"
)
# IPTC-IIM: record 1 envelope (coded character set: UTF-8), record 2 caption and byline
IPTC = (
    b"\x1c\x01\x5a\x00\x03\x1b%G"
    + b"\x1c\x02\x78\x00\x0fHarbour at dusk"
    + b"\x1c\x02\x50\x00\x0bM. Archivist"
    + b"\x1c\x02\x74\x00\x0b(c) Archive"
)


def _rgb16(height: int = 36, width: int = 52, seed: int = 0) -> np.ndarray:
    """(H, W, 3) uint16 using all 16 bits (values not multiples of 257)."""
    return np.random.default_rng(seed).integers(0, 65536, (height, width, 3), dtype=np.uint16)


def _tiff(data: np.ndarray, **options) -> bytes:
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, data, metadata=None, **options)
    return buffer.getvalue()


def _read_tiff(data: bytes) -> tuple[np.ndarray, dict]:
    with tifffile.TiffFile(io.BytesIO(data)) as tif:
        assert len(tif.pages) == 1
        page = tif.pages[0]
        return page.asarray(), {tag.code: tag.value for tag in page.tags}


def _pillow(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def _as_uint16(decoded: DecodedImage) -> np.ndarray:
    return np.rint(decoded.pixels.transpose(1, 2, 0) * 65535).astype(np.uint16)


def _as_uint8(decoded: DecodedImage) -> np.ndarray:
    return np.rint(decoded.pixels.transpose(1, 2, 0) * 255).astype(np.uint8)


# ---- 16-bit TIFF: values, profile, resolution, XMP, IPTC -----------------------------------


@pytest.mark.parametrize("profile", [srgb_profile(), ADOBE_LIKE], ids=["srgb", "adobe-like"])
@pytest.mark.parametrize("compression", ["lzw", "adobe_deflate", None])
def test_16_bit_rgb_tiff_round_trip_keeps_every_value_the_profile_and_the_dpi(profile, compression):
    samples = _rgb16()
    source = _tiff(
        samples, photometric="rgb", compression=compression, predictor=bool(compression),
        resolution=(600, 600), resolutionunit="INCH", iccprofile=profile,
        extratags=[(700, 1, len(XMP), XMP, True), (315, "s", 0, "M. Archivist", True)],
    )  # fmt: skip
    decoded = decode_image(source)
    assert (decoded.format, decoded.bit_depth, decoded.size) == ("tiff", 16, (52, 36))
    assert np.array_equal(_as_uint16(decoded), samples)
    assert decoded.metadata.icc_profile == profile
    assert decoded.metadata.dpi == (600.0, 600.0)

    encoded = encode_image(decoded.pixels, None, decoded, output_format("same", decoded))
    assert encoded.extension == "tif" and encoded.dropped == ()
    written, tags = _read_tiff(encoded.data)
    assert written.dtype == np.uint16 and np.array_equal(written, samples)
    assert tags[34675] == profile
    assert tags[282] == (600, 1) and tags[283] == (600, 1) and tags[296] == 2  # inch
    assert tags[700] == XMP.replace(b'tiff:Orientation="6"', b'tiff:Orientation="1"')
    assert tags[315] == "M. Archivist"
    assert tags[259] == 8 and tags[317] == 2  # Adobe deflate, horizontal predictor

    png = encode_image(decoded.pixels, None, decoded, "png")
    with Image.open(io.BytesIO(png.data)) as image:
        assert image.info["icc_profile"] == profile
        assert image.info["dpi"] == pytest.approx((600, 600), abs=0.01)
    assert np.array_equal(imagecodecs.png_decode(png.data), samples)  # all 16 bits


def test_planar_separate_16_bit_rgba_keeps_its_alpha():
    samples = _rgb16(20, 30, seed=1)
    alpha = np.random.default_rng(2).integers(0, 65536, (20, 30), dtype=np.uint16)
    rgba = np.dstack([samples, alpha])
    source = _tiff(
        np.moveaxis(rgba, -1, 0), photometric="rgb", planarconfig="separate",
        extrasamples=["unassalpha"], compression="zlib",
    )  # fmt: skip
    decoded = decode_image(source)
    assert decoded.bit_depth == 16 and decoded.alpha is not None
    assert np.array_equal(_as_uint16(decoded), samples)
    assert np.array_equal(np.rint(decoded.alpha * 65535).astype(np.uint16), alpha)
    for fmt in ("tiff", "png"):
        encoded = encode_image(decoded.pixels, decoded.alpha, decoded, fmt)
        if fmt == "tiff":
            written, tags = _read_tiff(encoded.data)
            assert tags[338] == (2,)  # ExtraSamples: unassociated alpha
        else:
            written = imagecodecs.png_decode(encoded.data)
        assert written.dtype == np.uint16 and np.array_equal(written, rgba), fmt


def test_miniswhite_palette_and_jpeg_in_tiff():
    grey = np.random.default_rng(3).integers(0, 256, (16, 24), dtype=np.uint8)
    decoded = decode_image(_tiff(grey, photometric="miniswhite"))
    assert decoded.bit_depth == 8 and np.array_equal(_as_uint8(decoded)[:, :, 0], 255 - grey)

    bilevel = np.random.default_rng(4).random((16, 24)) > 0.5
    decoded = decode_image(_tiff(bilevel, photometric="miniswhite"))
    assert np.array_equal(decoded.pixels[0], (~bilevel).astype(np.float32))

    indices = np.random.default_rng(5).integers(0, 256, (16, 24), dtype=np.uint8)
    colormap = np.random.default_rng(6).integers(0, 256, (3, 256), dtype=np.uint16) * 257
    decoded = decode_image(_tiff(indices, photometric="palette", colormap=colormap))
    assert decoded.bit_depth == 8 and decoded.pixels.shape == (3, 16, 24)
    assert np.array_equal(_as_uint8(decoded), (colormap[:, indices] // 257).transpose(1, 2, 0))
    deep = colormap + np.uint16(1)  # colours that need 16 bits
    decoded = decode_image(_tiff(indices, photometric="palette", colormap=deep))
    assert decoded.bit_depth == 16
    assert np.array_equal(_as_uint16(decoded), deep[:, indices].transpose(1, 2, 0))

    rgb = (np.random.default_rng(7).random((32, 48, 3)) * 255).astype(np.uint8)
    jpeg_in_tiff = _pillow(Image.fromarray(rgb), "TIFF", compression="jpeg")
    decoded = decode_image(jpeg_in_tiff)
    assert decoded.bit_depth == 8 and np.array_equal(_as_uint8(decoded), tifffile.imread(
        io.BytesIO(jpeg_in_tiff)))  # fmt: skip
    lzw = _pillow(Image.fromarray(rgb), "TIFF", compression="tiff_lzw")
    assert np.array_equal(_as_uint8(decode_image(lzw)), rgb)


# ---- orientation -----------------------------------------------------------------------------


def _exif(orientation: int) -> Image.Exif:
    exif = Image.Exif()
    exif[274] = orientation
    exif[271] = "PhoneMaker"
    exif[315] = "M. Archivist"
    exif.get_ifd(0x8769)[0x829A] = (1, 250)  # ExposureTime
    return exif


def test_a_phone_jpeg_with_orientation_6_decodes_upright_and_is_written_with_orientation_1():
    stored = (np.random.default_rng(8).random((40, 64, 3)) * 255).astype(np.uint8)
    data = _pillow(Image.fromarray(stored), "JPEG", quality=95, exif=_exif(6), xmp=XMP)
    with Image.open(io.BytesIO(data)) as image:
        as_stored = np.asarray(image.convert("RGB"))  # Pillow's decode, not rotated
        exposure = image.getexif().get_ifd(0x8769)[0x829A]
    decoded = decode_image(data)
    assert decoded.format == "jpeg" and decoded.size == (40, 64)
    assert np.array_equal(_as_uint8(decoded), np.rot90(as_stored, -1))  # 90 degrees clockwise
    assert "rotated upright (EXIF orientation 6)" in decoded.metadata.notes
    assert image_size(data) == (40, 64) and image_size(data[:2000]) == (40, 64)

    encoded = encode_image(decoded.pixels, None, decoded, output_format("same", decoded))
    assert encoded.extension == "png"
    with Image.open(io.BytesIO(encoded.data)) as written:
        exif = written.getexif()
        assert exif[274] == 1 and exif[271] == "PhoneMaker"
        assert exif.get_ifd(0x8769)[0x829A] == exposure
        assert b'tiff:Orientation="1"' in written.info["xmp"]
        assert written.size == (40, 64)

    as_tiff = encode_image(decoded.pixels, None, decoded, "tiff")
    written, tags = _read_tiff(as_tiff.data)
    assert written.shape == (64, 40, 3) and 274 not in tags  # upright: no orientation tag
    assert tags[271] == "PhoneMaker" and tags[315] == "M. Archivist"
    assert as_tiff.dropped == ("EXIF camera and GPS tags (TIFF output)",)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_matches_pillows_exif_transpose(orientation):
    stored = np.arange(5 * 7 * 3, dtype=np.uint8).reshape(5, 7, 3) * 2
    data = _pillow(Image.fromarray(stored), "PNG", exif=_exif(orientation))
    with Image.open(io.BytesIO(data)) as image:
        expected = np.asarray(ImageOps.exif_transpose(image))
    decoded = decode_image(data)
    assert np.array_equal(_as_uint8(decoded), expected)
    assert image_size(data) == decoded.size == (expected.shape[1], expected.shape[0])


def test_tiff_orientation_tag_is_applied():
    samples = _rgb16(12, 20, seed=9)
    data = _tiff(samples, photometric="rgb", extratags=[(274, "H", 1, 8, True)])
    decoded = decode_image(data)
    assert np.array_equal(_as_uint16(decoded), np.rot90(samples, 1))  # 90 degrees anticlockwise
    assert decoded.metadata.notes == ("rotated upright (TIFF orientation 8)",)
    assert image_size(data) == (12, 20)


@pytest.mark.parametrize(("orientation", "upright"), [(3, (300, 600)), (6, (600, 300))])
def test_a_turned_image_keeps_its_resolution_per_displayed_axis(orientation, upright):
    """300 dpi across and 600 down as stored: a quarter turn swaps them (a half turn does
    not), as Pillow reads the file and as the axes go."""
    samples = _rgb16(10, 20, seed=3)
    tiff = _tiff(samples, photometric="rgb", resolution=(300, 600), resolutionunit="INCH",
                 extratags=[(274, "H", 1, orientation, True)])  # fmt: skip
    png = _pillow(Image.fromarray(_rgb16(10, 20, seed=3)[:, :, 0] >> 8), "PNG", dpi=(300, 600),
                  exif=_exif(orientation))  # fmt: skip
    for data in (tiff, png):
        assert decode_image(data).metadata.dpi == pytest.approx(upright, abs=0.05)


# ---- colour: CMYK ----------------------------------------------------------------------------


def _cmyk_image() -> Image.Image:
    rng = np.random.default_rng(10)
    return Image.frombytes("CMYK", (24, 16), rng.integers(0, 256, 16 * 24 * 4, np.uint8).tobytes())


def _expected_srgb(data: bytes) -> np.ndarray:
    """What lcms makes of the file's CMYK through its profile (Pillow reads the file)."""
    with Image.open(io.BytesIO(data)) as image:
        profile = ImageCms.ImageCmsProfile(io.BytesIO(image.info["icc_profile"]))
        srgb = ImageCms.ImageCmsProfile(io.BytesIO(srgb_profile()))  # the one embedded after
        converted = ImageCms.profileToProfile(
            image, profile, srgb, renderingIntent=ImageCms.Intent.RELATIVE_COLORIMETRIC,
            outputMode="RGB", flags=ImageCms.Flags.BLACKPOINTCOMPENSATION,
        )  # fmt: skip
    return np.asarray(converted)


@pytest.mark.parametrize("fmt", ["JPEG", "TIFF"])
def test_cmyk_is_converted_with_its_embedded_profile_and_refused_without_one(fmt):
    data = _pillow(_cmyk_image(), fmt, icc_profile=cmyk_profile())
    decoded = decode_image(data)
    assert decoded.pixels.shape == (3, 16, 24) and decoded.bit_depth == 8
    assert np.array_equal(_as_uint8(decoded), _expected_srgb(data))
    assert any(
        "converted CMYK" in note and "ICC profile" in note for note in decoded.metadata.notes
    )
    assert undated(decoded.metadata.icc_profile) == undated(srgb_profile())
    written = encode_image(decoded.pixels, None, decoded, "png")
    with Image.open(io.BytesIO(written.data)) as image:
        assert image.info["icc_profile"] == decoded.metadata.icc_profile

    with pytest.raises(ImageDecodeError, match=r"CMYK .*without an embedded ICC profile"):
        decode_image(_pillow(_cmyk_image(), fmt))


def test_16_bit_cmyk_and_lab_tiffs_are_refused_clearly():
    cmyk16 = np.zeros((8, 8, 4), np.uint16)
    with pytest.raises(ImageDecodeError, match="16-bit CMYK TIFF is not supported"):
        decode_image(_tiff(cmyk16, photometric="separated", iccprofile=cmyk_profile()))
    with pytest.raises(ImageDecodeError, match="CIELAB TIFF is not supported"):
        decode_image(_tiff(np.zeros((8, 8, 3), np.uint8), photometric="cielab"))


# ---- pages, floats, bombs ----------------------------------------------------------------------


def test_a_multi_page_tiff_is_refused_naming_its_page_count():
    buffer = io.BytesIO()
    with tifffile.TiffWriter(buffer) as tif:
        for seed in range(3):
            tif.write(_rgb16(8, 8, seed), photometric="rgb", metadata=None)
    with pytest.raises(ImageDecodeError, match="multi-page TIFF with 3 full-resolution pages"):
        decode_image(buffer.getvalue())
    with pytest.raises(ImageDecodeError, match="3 full-resolution pages"):
        image_size(buffer.getvalue())


def test_reduced_resolution_pages_and_subifds_are_not_pages():
    full, small = _rgb16(16, 16, 1), _rgb16(8, 8, 2)
    buffer = io.BytesIO()
    with tifffile.TiffWriter(buffer) as tif:
        tif.write(full, photometric="rgb", subifds=1, metadata=None)
        tif.write(small, photometric="rgb", subfiletype=1, metadata=None)  # the SubIFD
        tif.write(small, photometric="rgb", subfiletype=1, metadata=None)  # a thumbnail page
    decoded = decode_image(buffer.getvalue())
    assert np.array_equal(_as_uint16(decoded), full)


def test_a_float_tiff_comes_back_float32_and_out_of_range_floats_are_refused():
    values = np.random.default_rng(11).random((20, 30, 3)).astype(np.float32)
    data = _tiff(values, photometric="rgb", compression="zlib")
    decoded = decode_image(data)
    assert decoded.bit_depth == 32 and np.array_equal(decoded.pixels.transpose(1, 2, 0), values)
    encoded = encode_image(decoded.pixels, None, decoded, output_format("same", decoded))
    written, tags = _read_tiff(encoded.data)
    assert written.dtype == np.float32 and np.array_equal(written, values)
    assert tags[339] == (3, 3, 3)  # SampleFormat: IEEE float

    as_png = encode_image(decoded.pixels, None, decoded, "png")
    assert as_png.dropped == ("float samples (16-bit PNG output)",)
    assert imagecodecs.png_decode(as_png.data).dtype == np.uint16

    hdr = values * 4.5  # a scene-referred scan
    found = f"range from {hdr.min():.6g} to {hdr.max():.6g}, outside [0, 1]"
    with pytest.raises(ImageDecodeError, match=re.escape(found)):
        decode_image(_tiff(hdr, photometric="rgb"))


def _tiff_by_hand(
    width: int, height: int, strip: bytes, ifd_at_end: bool, exif_iso: int | None = None
) -> bytes:
    """A little-endian 8-bit grey TIFF, deflate, one strip, its IFD before or after the
    strip; with `exif_iso`, an EXIF IFD (ISOSpeedRatings) after everything."""
    entries = [(256, 4, width), (257, 4, height), (258, 3, 8), (259, 3, 8), (262, 3, 1),
               (273, 4, 0), (277, 3, 1), (278, 4, height), (279, 4, len(strip))]  # fmt: skip
    if exif_iso is not None:
        entries.append((34665, 4, 0))
    ifd_size = 2 + 12 * len(entries) + 4
    strip_at = 8 if ifd_at_end else 8 + ifd_size
    ifd_at = 8 + len(strip) if ifd_at_end else 8
    exif_at = 8 + len(strip) + ifd_size
    ifd = struct.pack("<H", len(entries))
    for tag, kind, value in entries:
        value = {273: strip_at, 34665: exif_at}.get(tag, value)
        packed = struct.pack("<I", value) if kind == 4 else struct.pack("<HH", value, 0)
        ifd += struct.pack("<HHI", tag, kind, 1) + packed
    ifd += struct.pack("<I", 0)
    data = b"II*\x00" + struct.pack("<I", ifd_at) + (strip + ifd if ifd_at_end else ifd + strip)
    if exif_iso is not None:  # one entry: ISOSpeedRatings, SHORT, inline
        data += struct.pack("<HHHI", 1, 0x8827, 3, 1) + struct.pack("<HHI", exif_iso, 0, 0)
    return data


def test_declared_sizes_are_checked_before_decoding_tiff_and_16_bit_png():
    zeros = zlib.compressobj(9)
    rows = b"".join(zeros.compress(b"\0" * 60000) for _ in range(200)) + zeros.flush()
    bomb = _tiff_by_hand(60000, 60000, rows, ifd_at_end=False)  # 3.6 Gpx in ~12 kB
    png16 = encode_png(np.zeros((1, 300, 300), np.float32), None, 16)
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    with pytest.raises(ImageDecodeError, match="declares 60000x60000 = 3,600,000,000 pixels"):
        decode_image(bomb)
    with pytest.raises(ImageDecodeError, match="more than the limit of 100,000,000"):
        image_size(bomb, max_pixels=100_000_000)
    with pytest.raises(ImageDecodeError, match="300x300 = 90,000 pixels, more than the limit"):
        decode_image(png16, max_pixels=50_000)
    assert decode_image(png16, max_pixels=90_000).bit_depth == 16
    growth_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before) / 1024
    assert time.perf_counter() - started < 5 and growth_mb < 64  # nothing big was decoded


def test_a_tiff_with_its_ifd_at_the_end_is_sized_by_validate_reading_it_by_ranges(
    tmp_path, monkeypatch
):
    width, height = 400, 300  # 120 kB of samples: the IFD lies beyond the 64 KiB head
    grey = np.random.default_rng(12).integers(0, 256, (height, width), dtype=np.uint8)
    data = _tiff_by_hand(width, height, zlib.compress(grey.tobytes(), 0), ifd_at_end=True)
    assert len(data) > 1 << 16
    assert np.array_equal(_as_uint8(decode_image(data))[:, :, 0], grey)
    with pytest.raises(ImageDecodeError, match="not a readable TIFF"):
        image_size(data[: 1 << 16])  # the head alone does not hold the IFD
    assert image_size(data) == (width, height)

    image, mask = tmp_path / "scan.tif", tmp_path / "mask.png"
    image.write_bytes(data)
    mask.write_bytes(encode_png(np.ones((1, 10, 10), np.float32)))
    row = {"id": "a", "task": "denoise", "image": str(image)}
    sizes = count_ranged_reads(monkeypatch)
    assert check_job(Storage(), job_from_row(row, 0)) == []
    assert 0 < sum(sizes) < len(data) // 2  # the IFD, read by ranges, not the whole file
    row = {"id": "b", "task": "inpaint", "image": str(image), "mask": str(mask)}
    (problem,) = check_job(Storage(), job_from_row(row, 1))
    assert problem.endswith("is 10x10 pixels, expected 400x300"), problem


# ---- 16-bit PNG metadata, IPTC, format choice, damage ----------------------------------------


def test_a_tiffs_exif_ifd_reaches_a_png_and_is_reported_dropped_by_a_tiff():
    grey = np.arange(48, dtype=np.uint8).reshape(6, 8)
    data = _tiff_by_hand(8, 6, zlib.compress(grey.tobytes()), ifd_at_end=False, exif_iso=400)
    with tifffile.TiffFile(io.BytesIO(data)) as tif:  # a well-formed EXIF IFD, says tifffile
        assert tif.pages[0].tags["ExifTag"].value == {"ISOSpeedRatings": 400}
    decoded = decode_image(data)
    as_png = encode_image(decoded.pixels, None, decoded, "png")
    with Image.open(io.BytesIO(as_png.data)) as image:
        assert image.getexif().get_ifd(0x8769) == {0x8827: 400}
    assert as_png.dropped == ()
    as_tiff = encode_image(decoded.pixels, None, decoded, "tiff")
    assert as_tiff.dropped == ("EXIF camera and GPS tags (TIFF output)",)


def test_16_bit_png_keeps_icc_dpi_exif_and_xmp_both_ways():
    samples = _rgb16(24, 32, seed=13)
    source = decode_image(_tiff(
        samples, photometric="rgb", resolution=(300, 300), resolutionunit="INCH",
        iccprofile=ADOBE_LIKE, extratags=[(700, 1, len(XMP), XMP, True)],
    ))  # fmt: skip
    exif = _exif(1).tobytes()
    metadata = ImageMetadata(ADOBE_LIKE, (300.0, 300.0), exif, XMP)
    source = DecodedImage(source.pixels, None, 16, "tiff", metadata)
    png = encode_image(source.pixels, None, source, "png").data
    with Image.open(io.BytesIO(png)) as image:
        image.verify()  # chunk CRCs
    with Image.open(io.BytesIO(png)) as image:  # metadata chunks come before IDAT
        assert image.info["icc_profile"] == ADOBE_LIKE
        assert image.info["dpi"] == pytest.approx((300, 300), abs=0.01)
        assert image.getexif()[271] == "PhoneMaker"
        assert image.info["xmp"] == XMP.replace(b'Orientation="6"', b'Orientation="1"')
    assert png[24] == 16 and np.array_equal(imagecodecs.png_decode(png), samples)

    decoded = decode_image(png)
    assert decoded.bit_depth == 16 and np.array_equal(_as_uint16(decoded), samples)
    assert decoded.metadata.icc_profile == ADOBE_LIKE
    assert decoded.metadata.dpi == pytest.approx((300, 300), abs=0.01)
    assert decoded.metadata.exif == exif
    again = encode_image(decoded.pixels, None, decoded, "png").data
    assert again == png  # nothing drifts on a second round


def _jpeg_with_iptc(image: Image.Image, iptc: bytes) -> bytes:
    """A JPEG with a Photoshop APP13 segment holding IPTC-IIM (resource 0x0404)."""
    data = _pillow(image, "JPEG")
    resource_block = b"8BIM" + struct.pack(">H", 0x0404) + b"\x00\x00"  # empty Pascal name
    resource_block += struct.pack(">I", len(iptc)) + iptc + b"\x00" * (len(iptc) % 2)
    payload = b"Photoshop 3.0\x00" + resource_block
    app13 = b"\xff\xed" + struct.pack(">H", len(payload) + 2) + payload
    return data[:2] + app13 + data[2:]


def test_iptc_is_carried_into_tiff_and_reported_as_dropped_by_png():
    data = _jpeg_with_iptc(Image.new("RGB", (12, 8), (200, 100, 50)), IPTC)
    decoded = decode_image(data)
    assert decoded.metadata.iptc == IPTC
    as_tiff = encode_image(decoded.pixels, None, decoded, "tiff")
    with tifffile.TiffFile(io.BytesIO(as_tiff.data)) as tif:
        stored = tif.pages[0].tags[33723].value
    stored = stored if isinstance(stored, bytes) else struct.pack(f"<{len(stored)}I", *stored)
    assert stored.rstrip(b"\x00") == IPTC.rstrip(b"\x00") and as_tiff.dropped == ()
    assert decode_image(as_tiff.data).metadata.iptc.rstrip(b"\x00") == IPTC.rstrip(b"\x00")
    as_png = encode_image(decoded.pixels, None, decoded, "png")
    assert as_png.dropped == ("IPTC (PNG output)",)


def test_output_format_same_is_tiff_for_tiff_and_png_for_everything_else():
    tiff = decode_image(_tiff(_rgb16(4, 4), photometric="rgb"))
    jpeg = decode_image(_pillow(Image.new("RGB", (4, 4)), "JPEG"))
    webp = decode_image(_pillow(Image.new("RGB", (4, 4)), "WEBP", lossless=True))
    assert [output_format("same", d) for d in (tiff, jpeg, webp)] == ["tiff", "png", "png"]
    assert output_format("tiff", jpeg) == "tiff" and output_format("png", tiff) == "png"
    assert encode_image(jpeg.pixels, None, jpeg, "tiff").extension == "tif"
    written, _ = _read_tiff(encode_image(jpeg.pixels, None, jpeg, "tiff").data)
    assert written.dtype == np.uint8  # 8-bit in, 8-bit out
    with pytest.raises(ValueError, match="unknown output format"):
        output_format("jpeg", jpeg)


def test_damaged_tiffs_fail_with_a_clear_reason():
    data = _tiff(_rgb16(64, 64), photometric="rgb", compression="zlib")
    for broken in (data[: len(data) // 2], data[:100], data[:8] + b"\xff" * 64):
        with pytest.raises(ImageDecodeError, match="not a readable TIFF"):
            decode_image(broken)


def test_uncompressed_ycbcr_tiff_is_converted_and_turned_upright():
    stored = np.zeros((8, 12, 3), np.uint8)
    stored[:, :, 1] = np.arange(12, dtype=np.uint8) * 20
    stored[0, 0] = (250, 0, 0)
    data = _pillow(Image.fromarray(stored).convert("YCbCr"), "TIFF", tiffinfo={274: 6})
    with tifffile.TiffFile(io.BytesIO(data)) as tif:
        assert tif.pages[0].photometric == 6 and tif.pages[0].compression == 1
    decoded = decode_image(data)
    assert decoded.size == image_size(data) == (8, 12)
    upright = np.rot90(stored, -1).astype(int)
    assert np.abs(_as_uint8(decoded).astype(int) - upright).max() <= 4  # YCbCr rounding
    assert decoded.metadata.notes == ("rotated upright (TIFF orientation 6)",)


def test_writer_metadata_is_not_taken_for_exif_and_a_mismatched_profile_is_reported():
    data = _tiff(_rgb16(4, 4)[:, :, 0], photometric="minisblack", iccprofile=srgb_profile())
    with_json = io.BytesIO()
    tifffile.imwrite(with_json, _rgb16(4, 4), photometric="rgb")  # '{"shape": ...}'
    assert decode_image(with_json.getvalue()).metadata.exif is None
    grey = decode_image(data)  # a grey image that carries an RGB profile: invalid if copied
    encoded = encode_image(grey.pixels, None, grey, "png")
    assert encoded.dropped == ("ICC profile (a RGB profile for a 1-channel image)",)
    with Image.open(io.BytesIO(encoded.data)) as image:
        assert "icc_profile" not in image.info


# ---- resolution units, extra samples, palettes ------------------------------------------------


def _pillow_dpi(data: bytes) -> tuple[float, float] | None:
    with Image.open(io.BytesIO(data)) as image:
        return image.info.get("dpi")


def test_resolution_unit_none_means_no_dpi_and_other_units_are_converted_to_inch():
    samples = _rgb16(6, 8, seed=20)
    plain = io.BytesIO()
    tifffile.imwrite(plain, samples)  # tifffile's default: 1/1 with ResolutionUnit none
    with tifffile.TiffFile(io.BytesIO(plain.getvalue())) as tif:
        assert tif.pages[0].resolutionunit == tifffile.RESUNIT.NONE
    decoded = decode_image(plain.getvalue())
    assert decoded.metadata.dpi is None and decoded.metadata.notes == ()
    with Image.open(io.BytesIO(encode_image(decoded.pixels, None, decoded, "png").data)) as png:
        assert "dpi" not in png.info and "aspect" not in png.info  # no pHYs at all

    per_cm = _tiff(samples, resolution=(100, 50), resolutionunit="CENTIMETER")
    assert decode_image(per_cm).metadata.dpi == pytest.approx(_pillow_dpi(per_cm))
    no_unit_tag = _pillow(Image.new("RGB", (8, 6)), "TIFF", tiffinfo={282: 300, 283: 300})
    assert 296 not in _read_tiff(no_unit_tag)[1]  # TIFF's default unit: inch
    assert decode_image(no_unit_tag).metadata.dpi == _pillow_dpi(no_unit_tag) == (300, 300)
    aspect = decode_image(_tiff(samples, resolution=(1, 2), resolutionunit="NONE"))
    assert aspect.metadata.dpi is None
    assert aspect.metadata.notes == (
        "pixel aspect ratio 1:2 (resolution without a unit) not carried",
    )


def test_a_png_without_dpi_becomes_a_tiff_without_dpi():
    png = decode_image(encode_png(np.random.default_rng(21).random((3, 6, 8)).astype(np.float32)))
    assert png.metadata.dpi is None
    as_tiff = encode_image(png.pixels, None, png, "tiff").data
    _, tags = _read_tiff(as_tiff)
    assert tags[296] == tifffile.RESUNIT.NONE  # the baseline tags, saying "no unit"
    assert _pillow_dpi(as_tiff) is None and decode_image(as_tiff).metadata.dpi is None


def test_only_samples_labelled_alpha_are_alpha_an_infrared_channel_is_noted_not_carried():
    rgb, extra = _rgb16(10, 12, seed=22), _rgb16(10, 12, seed=23)
    infrared = _tiff(
        np.dstack([rgb, extra[:, :, 0]]), photometric="rgb", extrasamples=["unspecified"]
    )
    decoded = decode_image(infrared)
    assert decoded.alpha is None and np.array_equal(_as_uint16(decoded), rgb)
    assert decoded.metadata.notes == ("extra sample 4 (unspecified, e.g. infrared) not carried",)
    written, tags = _read_tiff(encode_image(decoded.pixels, None, decoded, "tiff").data)
    assert np.array_equal(written, rgb) and 338 not in tags  # no ExtraSamples: no alpha

    rgba_ir = np.dstack([rgb, extra[:, :, :2]])  # alpha, then infrared
    decoded = decode_image(_tiff(
        rgba_ir, photometric="rgb", extrasamples=["unassalpha", "unspecified"]
    ))  # fmt: skip
    assert np.array_equal(_as_uint16(decoded), rgb)
    assert np.array_equal(np.rint(decoded.alpha * 65535).astype(np.uint16), extra[:, :, 0])
    assert decoded.metadata.notes == ("extra sample 5 (unspecified, e.g. infrared) not carried",)


def test_associated_alpha_is_un_premultiplied_and_written_as_unassociated():
    rng = np.random.default_rng(24)
    colour = rng.random((8, 10, 3)).astype(np.float32)
    alpha = rng.uniform(0.2, 1.0, (8, 10)).astype(np.float32)
    premultiplied = np.dstack([colour * alpha[:, :, None], alpha])
    decoded = decode_image(_tiff(premultiplied, photometric="rgb", extrasamples=["assocalpha"]))
    assert np.allclose(decoded.pixels.transpose(1, 2, 0), colour, atol=1e-6)
    assert "un-premultiplied its associated alpha (written as unassociated alpha)" in (
        decoded.metadata.notes
    )
    _, tags = _read_tiff(encode_image(decoded.pixels, decoded.alpha, decoded, "tiff").data)
    assert tags[338] == (tifffile.EXTRASAMPLE.UNASSALPHA,)


def test_palette_tiffs_written_by_pillow_and_by_old_writers_decode_as_8_bit():
    indices = np.random.default_rng(25).integers(0, 256, (12, 16), dtype=np.uint8)
    colours = np.random.default_rng(26).integers(0, 256, (256, 3), dtype=np.uint8)
    image = Image.fromarray(indices, "P")
    image.putpalette(colours.tobytes())
    data = _pillow(image, "TIFF")  # Pillow writes its colour map as v * 256
    with tifffile.TiffFile(io.BytesIO(data)) as tif:
        assert np.array_equal(tif.pages[0].colormap, colours.T.astype(np.uint16) * 256)
    decoded = decode_image(data)
    assert decoded.bit_depth == 8
    assert np.array_equal(_as_uint8(decoded), np.asarray(image.convert("RGB")))

    old = colours.T.astype(np.uint16)  # entries 0..255 as they are (libtiff reads 8-bit)
    decoded = decode_image(_tiff(indices, photometric="palette", colormap=old))
    assert decoded.bit_depth == 8 and np.array_equal(_as_uint8(decoded), colours[indices])


# ---- metadata a format cannot carry is named --------------------------------------------------


def _png_with_chunks(image: Image.Image) -> bytes:
    info = PngImagePlugin.PngInfo()
    info.add_text("Copyright", "(c) Archive")
    info.add_text("Description", "Harbour at dusk, " * 20, zip=True)  # zTXt
    info.add_itxt("Title", "Hafen in der Dämmerung", lang="de", tkey="Titel")
    info.add_text("Software", "ScanTool 2")
    info.add(b"gAMA", struct.pack(">I", 45455))
    info.add(b"sRGB", b"\x00")
    info.add(b"bKGD", b"\x00\x01" if image.mode == "I;16" else b"\x00\x01\x00\x02\x00\x03")
    info.add(b"tEXt", b"Comment\x00after the pixels", after_idat=True)
    return _pillow(image, "PNG", pnginfo=info)


@pytest.mark.parametrize("depth", [8, 16])
def test_png_text_gamma_and_srgb_chunks_reach_a_png_and_are_named_by_a_tiff(depth):
    rng = np.random.default_rng(27)
    if depth == 8:
        image = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
    else:
        image = Image.fromarray(rng.integers(0, 65536, (6, 8), dtype=np.uint16)).convert("I;16")
    data = _png_with_chunks(image)
    with Image.open(io.BytesIO(data)) as source:
        source.load()
        text, gamma, srgb = dict(source.text), source.info["gamma"], source.info["srgb"]
    assert data[24] == depth and text["Comment"] == "after the pixels"
    decoded = decode_image(data)
    assert decoded.bit_depth == depth
    assert decoded.metadata.notes == ("PNG chunks not carried: bKGD",)

    png = encode_image(decoded.pixels, None, decoded, "png")
    assert png.dropped == ()
    with Image.open(io.BytesIO(png.data)) as written:
        written.load()
        assert dict(written.text) == {**text, "Software": "dippipe"}
        assert written.text["Title"].lang == "de" and written.text["Title"].tkey == "Titel"
        assert (written.info["gamma"], written.info["srgb"]) == (gamma, srgb)
    assert decode_image(png.data).metadata.png_chunks == decoded.metadata.png_chunks

    tiff = encode_image(decoded.pixels, None, decoded, "tiff")
    assert tiff.dropped == (
        "PNG chunks tEXt Copyright, zTXt Description, iTXt Title, gAMA, sRGB, tEXt Comment "
        "(TIFF output)",
    )


def test_descriptive_tiff_tags_reach_a_tiff_and_geotiff_and_private_tags_are_named():
    samples = _rgb16(6, 8, seed=28)
    geo = [
        (33550, 12, 3, (0.5, 0.5, 0.0), True),  # ModelPixelScaleTag
        (33922, 12, 6, (0, 0, 0, 350000.0, 5800000.0, 0), True),  # ModelTiepointTag
        (34735, 3, 8, (1, 1, 0, 1, 1024, 0, 1, 1), True),  # GeoKeyDirectoryTag
        (65000, 1, 4, b"\x01\x02\x03\x04", True),  # a private tag
    ]
    data = _tiff(samples, photometric="rgb", extratags=[
        (269, "s", 0, "Harbour album, box 12", True), (285, "s", 0, "plate 7", True),
        (297, "H", 2, (6, 40), True), *geo,
    ])  # fmt: skip
    decoded = decode_image(data)
    names = ", ".join(tifffile.TIFF.TAGS.get(code, str(code)) for code, *_ in geo)
    assert decoded.metadata.notes == (f"TIFF tags not carried: {names}",)

    tiff = encode_image(decoded.pixels, None, decoded, "tiff")
    assert tiff.dropped == ()
    _, tags = _read_tiff(tiff.data)
    assert (tags[269], tags[285], tags[297]) == ("Harbour album, box 12", "plate 7", (6, 40))
    assert tags[305] == "dippipe" and not {33550, 33922, 34735, 65000} & set(tags)
    png = encode_image(decoded.pixels, None, decoded, "png")
    assert png.dropped == ("TIFF tags DocumentName, PageName, PageNumber (PNG output)",)


# ---- damage: a broken private tag, a file cut short -------------------------------------------


def _with_tag_value_beyond_the_end(data: bytes, code: int) -> bytes:
    """The TIFF with tag `code`'s value offset pointing past the end of the file."""
    with tifffile.TiffFile(io.BytesIO(data)) as tif:
        entry = tif.pages[0].tags[code].offset  # the 12-byte IFD entry
    broken = bytearray(data)
    struct.pack_into("<I", broken, entry + 8, len(data) + 1000)
    return bytes(broken)


def test_one_unreadable_private_tag_is_noted_and_the_image_still_read():
    samples = _rgb16(6, 8, seed=29)
    data = _tiff(samples, photometric="rgb", extratags=[(65000, 1, 100, bytes(100), True)])
    broken = _with_tag_value_beyond_the_end(data, 65000)
    with tifffile.TiffFile(io.BytesIO(broken)) as tif:
        expected = tif.pages[0].asarray()  # tifffile reads the pixels, logging the tag
    decoded = decode_image(broken)
    assert np.array_equal(_as_uint16(decoded), expected) and np.array_equal(expected, samples)
    assert decoded.metadata.notes == ("ignored unreadable TIFF tag 65000",)
    assert image_size(broken) == (8, 6)

    layout = _with_tag_value_beyond_the_end(data, 258)  # BitsPerSample (3 SHORTs)
    with pytest.raises(ImageDecodeError, match=r"not a readable TIFF.*TiffTag 258"):
        decode_image(layout)


def test_a_tiff_cut_short_is_reported_as_truncated():
    rgb = (np.random.default_rng(30).random((64, 64, 3)) * 255).astype(np.uint8)
    ifd_last = _pillow(Image.fromarray(rgb), "TIFF", compression="tiff_adobe_deflate")
    ifd_first = _tiff(_rgb16(64, 64), photometric="rgb", compression="zlib")
    for data in (ifd_last, ifd_first):
        with pytest.raises(ImageDecodeError, match=r"not a readable TIFF \(truncated"):
            decode_image(data[: len(data) // 2])
    with pytest.raises(ImageDecodeError, match="its first IFD is at byte"):
        image_size(ifd_last[: len(ifd_last) // 2])
