"""Gallery images as data URIs, so report.html is one file that works wherever it is copied.

An image that already fits the thumbnail size is embedded as a lossless PNG of its exact pixels
(what a restoration is judged on). A larger one is shrunk (Lanczos) and embedded as a JPEG: it
is a preview, and PNG previews of photos would make a 48-job report tens of megabytes. Images
are fetched on a few threads because on S3 each one is a round trip.
"""

from __future__ import annotations

import base64
import io
import logging
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from PIL import Image

from pipeline.images import ImageDecodeError, decode_image
from pipeline.storage import Storage, protocol_of

log = logging.getLogger("dippipe")
FETCH_THREADS = 8
JPEG_QUALITY = 90


@dataclass(frozen=True)
class Thumb:
    data_uri: str
    width: int  # of the embedded image
    height: int
    original: tuple[int, int]  # (width, height) of the file


def thumbnail(data: bytes, max_edge: int) -> Thumb:
    """Decode any image the pipeline reads (16-bit included) and embed it, shrunk if needed."""
    decoded = decode_image(data)
    pixels = np.rint(decoded.pixels.clip(0.0, 1.0) * 255.0).astype(np.uint8)
    image = Image.fromarray(pixels[0] if pixels.shape[0] == 1 else pixels.transpose(1, 2, 0))
    original = image.size
    buffer = io.BytesIO()
    if max(original) <= max_edge:
        image.save(buffer, "PNG", optimize=True)
        mime = "image/png"
    else:
        image.thumbnail((max_edge, max_edge), Image.Resampling.LANCZOS)
        image.save(buffer, "JPEG", quality=JPEG_QUALITY)
        mime = "image/jpeg"
    encoded = base64.b64encode(buffer.getvalue()).decode("ascii")
    return Thumb(f"data:{mime};base64,{encoded}", image.width, image.height, original)


def _load(storage: Storage, uri: str, max_edge: int) -> Thumb | str:
    """A thumbnail, or why there is none (shown in its place)."""
    try:
        return thumbnail(storage.read_bytes(uri), max_edge)
    except FileNotFoundError:
        return "file not found"
    except (OSError, ImageDecodeError, ValueError) as error:
        log.warning("report: cannot show %s (%s)", uri, error)
        return f"unreadable ({type(error).__name__})"


def load_thumbnails(storage: Storage, uris: Iterable[str], max_edge: int) -> dict[str, Thumb | str]:
    """uri -> Thumb (or the reason it is missing), each distinct URI fetched once."""
    unique = list(dict.fromkeys(uris))
    # Create each protocol's file system before the threads start: Storage caches them in a
    # plain dict, and s3fs sessions are costly to create twice.
    for uri in {protocol_of(uri): uri for uri in unique}.values():
        storage.resolve(uri)
    with ThreadPoolExecutor(max_workers=FETCH_THREADS) as pool:
        loaded = pool.map(lambda uri: _load(storage, uri, max_edge), unique)
        return dict(zip(unique, loaded, strict=True))
