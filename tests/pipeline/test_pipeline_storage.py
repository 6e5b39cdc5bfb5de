"""Storage (local, memory://, S3 via moto), image codecs, and the output shards."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from pipeline.images import ImageDecodeError, decode_image, encode_png, image_size
from pipeline.outputs import (
    JobOutcome,
    ShardWriter,
    drop_failed_rows,
    image_uri,
    read_prior,
    read_results,
    read_traces,
    remove_orphan_traces,
)
from pipeline.storage import Storage, StorageOptions, join
from tests.support.builders import tiny_image


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("with_alpha", [False, True])
@pytest.mark.parametrize("bits", [8, 16])
def test_png_round_trip_keeps_channels_alpha_and_bit_depth(channels, with_alpha, bits):
    pixels = tiny_image(3, 20, channels)
    alpha = np.linspace(0, 1, 400, dtype=np.float32).reshape(20, 20) if with_alpha else None
    decoded = decode_image(encode_png(pixels, alpha, bits))
    tolerance = 0.5 / 255 if bits == 8 else 0.5 / 65535
    assert decoded.bit_depth == bits and decoded.pixels.shape == (channels, 20, 20)
    assert np.abs(decoded.pixels - pixels).max() <= tolerance + 1e-7
    assert (decoded.alpha is None) == (alpha is None)
    if alpha is not None:
        assert np.abs(decoded.alpha - alpha).max() <= tolerance + 1e-7


def test_16bit_rgb_png_is_really_16_bit():
    pixels = np.full((3, 4, 4), 1000 / 65535, np.float32)  # not representable in 8 bits
    data = encode_png(pixels, None, 16)
    assert data[24] == 16  # IHDR bit depth
    assert round(float(decode_image(data).pixels[0, 0, 0]) * 65535) == 1000


def test_other_formats_palette_and_corrupt_files():
    buffer = io.BytesIO()
    Image.new("P", (5, 4), 3).save(buffer, "PNG")
    assert decode_image(buffer.getvalue()).pixels.shape == (3, 4, 5)
    buffer = io.BytesIO()
    Image.new("RGB", (6, 7), (10, 20, 30)).save(buffer, "JPEG")
    assert image_size(buffer.getvalue()) == (6, 7)
    with pytest.raises(ImageDecodeError, match="not a readable image"):
        decode_image(b"\x89PNG\r\n\x1a\n garbage")
    truncated = encode_png(tiny_image(1, 64))[:-40]
    with pytest.raises(ImageDecodeError):
        decode_image(truncated)


def test_local_write_is_atomic_and_lists_hide_temp_files(tmp_path):
    storage = Storage()
    target = join(str(tmp_path), "a", "b.png")
    storage.write_bytes(target, b"one")
    storage.write_bytes(target, b"two")
    assert storage.read_bytes(target) == b"two"
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["b.png"]
    (tmp_path / "a" / ".b.png.123.tmp").write_bytes(b"half")
    assert storage.list_files(join(str(tmp_path), "a")) == [target]
    assert storage.read_head(target, 2) == b"tw"


def test_memory_filesystem():
    storage = Storage()
    storage.write_bytes("memory://t/x.bin", b"abc")
    assert storage.exists("memory://t/x.bin") and storage.read_bytes("memory://t/x.bin") == b"abc"
    assert storage.list_files("memory://t") == ["memory://t/x.bin"]


@pytest.mark.s3
def test_s3_read_write_list(s3_bucket):
    storage = Storage(StorageOptions.from_env())
    uri = f"{s3_bucket}/run/images/ab/x.png"
    storage.write_bytes(uri, encode_png(tiny_image(0)))
    assert decode_image(storage.read_bytes(uri)).size == (24, 24)
    assert image_size(storage.read_head(uri)) == (24, 24)
    assert storage.list_files(f"{s3_bucket}/run/images/ab") == [uri]
    table = pa.table({"a": [1, 2]})
    storage.write_parquet(f"{s3_bucket}/t.parquet", table)
    assert storage.read_parquet(f"{s3_bucket}/t.parquet").equals(table)


def test_storage_options_come_from_env_and_cli_and_hold_no_secrets(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://env:9000")
    monkeypatch.setenv("AWS_REGION", "eu-west-3")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t")
    options = StorageOptions.from_env(region="us-west-2", profile="team")
    assert options.endpoint_url == "http://env:9000" and options.region == "us-west-2"
    kwargs = options.fsspec_kwargs("s3")
    assert kwargs["client_kwargs"] == {
        "endpoint_url": "http://env:9000",
        "region_name": "us-west-2",
    }
    assert kwargs["profile"] == "team" and kwargs["anon"] is False
    assert "s3cr3t" not in repr(options.public())
    assert options.fsspec_kwargs("file") == {}


def _outcome(job_id: str, ok: bool, steps: int = 3) -> JobOutcome:
    row = {"id": job_id, "task": "denoise", "status": "ok" if ok else "failed", "attempts": 1}
    row["error"] = None if ok else "boom"
    trace = {"step": list(range(steps)), "energy": [0.1] * steps, "psnr": [None] * steps}
    return JobOutcome(row, trace if ok else {"step": [], "energy": [], "psnr": []})


def test_shards_resume_and_failed_row_replacement(tmp_path):
    storage, out = Storage(), str(tmp_path / "out")
    writer = ShardWriter(storage, out, flush_rows=2)
    for job_id, ok in [("a", True), ("b", False), ("c", True)]:
        writer.add(_outcome(job_id, ok))
    assert len(storage.list_files(join(out, "results"))) == 1  # a, b flushed; c buffered
    writer.flush()
    results = read_results(storage, out)
    assert sorted(results.column("id").to_pylist()) == ["a", "b", "c"]
    assert read_traces(storage, out).num_rows == 6
    prior = read_prior(storage, out)
    ids = pa.array(["a", "b", "c", "d"])
    assert prior.finished_mask(ids, retry_failed=False).to_pylist() == [True, True, True, False]
    assert prior.finished_mask(ids, retry_failed=True).to_pylist() == [True, False, True, False]
    assert drop_failed_rows(storage, out, ["b", "c"]) == 1
    assert sorted(read_results(storage, out).column("id").to_pylist()) == ["a", "c"]


def test_orphan_trace_shards_are_removed(tmp_path):
    storage, out = Storage(), str(tmp_path / "out")
    storage.write_bytes(join(out, "traces", "part-x-00000.parquet"), b"left by a crash")
    writer = ShardWriter(storage, out)
    writer.add(_outcome("a", True))
    writer.flush()
    assert remove_orphan_traces(storage, out) == 1
    assert len(storage.list_files(join(out, "traces"))) == 1


def test_image_uri_shards_by_id_hash():
    assert image_uri("s3://b/out", "img-1").startswith("s3://b/out/images/")
    assert image_uri("/o", "img-1").endswith("/img-1.png")
    assert len(image_uri("/o", "img-1").split("/")[-2]) == 2
