"""Small inputs for tests: a synthetic image, a PNG on disk, a manifest from dicts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.images import encode_png

TINY_PARAMS = '{"channels": 8, "depth": 3, "input_depth": 8}'  # a small network: quick fits


def tiny_image(seed: int, size: int = 24, channels: int = 3) -> np.ndarray:
    """A smooth synthetic image (C, H, W) in [0, 1]: gradients plus a square."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / max(size - 1, 1)
    planes = [(a * x + b * y + c) % 1.0 for a, b, c in rng.random((channels, 3))]
    image = np.stack(planes).astype(np.float32)
    image[:, size // 4 : size // 2, size // 4 : size // 2] = 0.9
    return image


def write_png(
    path: Path | str, pixels: np.ndarray, alpha: np.ndarray | None = None, bits: int = 8
) -> str:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_bytes(encode_png(pixels, alpha, bits))
    return str(path)


def write_manifest(path: Path | str, rows: list[dict]) -> str:
    """A manifest from dicts: absent optional columns stay absent, as users write them."""
    columns = list(dict.fromkeys(key for row in rows for key in row))  # first-seen order
    pq.write_table(pa.table({c: [row.get(c) for row in rows] for c in columns}), str(path))
    return str(path)
