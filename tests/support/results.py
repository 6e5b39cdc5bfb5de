"""What a run left under OUT, checked: every job exactly once, nothing partial or hidden."""

from __future__ import annotations

from pathlib import Path

from pipeline.outputs import read_results
from pipeline.storage import Storage


def results(out: str, storage: Storage | None = None) -> list[dict]:
    storage = storage or Storage()
    if "://" not in out and not (Path(out) / "results").exists():
        return []
    return read_results(storage, out).to_pylist()


def assert_exactly_once(out: str, ids: list[str], storage: Storage | None = None) -> dict:
    rows = results(out, storage)
    found = [row["id"] for row in rows]
    assert sorted(found) == sorted(ids), f"missing {set(ids) - set(found)}, rows {sorted(found)}"
    return {row["id"]: row for row in rows}


def assert_no_partial_files(out: Path) -> None:
    """Nothing hidden (temporary files, a lock) and every PNG / Parquet file readable."""
    import pyarrow.parquet as pq

    from pipeline.images import decode_image

    hidden = [p for p in out.rglob(".*") if p.is_file()]
    assert not hidden, f"left behind: {hidden}"
    for path in out.rglob("*.png"):
        decode_image(path.read_bytes())
    for path in out.rglob("*.parquet"):
        pq.read_table(path)
