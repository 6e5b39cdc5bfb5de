"""A job's spec fingerprint: what decides its result, hashed, so that a rerun can tell that a
finished id now means something else (another image, task, seed or params).

It covers the row's values as the manifest writes them (task, every input URI, scale,
iterations, seed, params) and those run-wide params of --stop / --ensemble that the job's own
params do not override (a job that sets its own ``stop`` is not changed by --stop).
Rewriting the params JSON with other spacing counts as a change: it is the spec as written,
compared without parsing a million JSON texts. Not covered: the output format, the device
and memory settings (how a result is stored or computed, not what was asked); --format has
its own rerun warning (runner.py).

Computed on Arrow tables, a batch at a time: about 1 s per million rows here (the hashing),
so a resume checks every finished id without a per-row Python object.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from dip_core import INPUT_ROLES

FINGERPRINT_CHARS = 16  # hex digits kept: 64 bits, collisions out of reach for any manifest
SPEC_COLUMNS = ("task", *(role.name for role in INPUT_ROLES), "scale", "iterations", "seed",
                "params")  # fmt: skip
_NULL, _SEPARATOR = "\x00", "\x1f"  # neither can occur in a URI, a task or JSON text


def spec_fingerprints(table: pa.Table, param_defaults: Mapping[str, Any] | None) -> pa.Array:
    """The fingerprint of every row of ``table`` (conformed manifest rows: manifest.py
    iter_batches) as it runs with the run-wide ``param_defaults``; strings, one per row."""
    columns = [_text(table, name) for name in SPEC_COLUMNS]
    defaults = _defaults_in_effect(table, dict(param_defaults or {}))
    rows = pc.binary_join_element_wise(*columns, defaults, _SEPARATOR)
    sha256 = hashlib.sha256
    digests = [sha256(row.encode()).hexdigest()[:FINGERPRINT_CHARS] for row in rows.to_pylist()]
    return pa.array(digests, pa.string())


def _defaults_in_effect(table: pa.Table, defaults: dict[str, Any]) -> pa.Array:
    """Per row, the run-wide defaults its own params leave in effect, as sorted JSON. Worked
    out once per distinct params text (a manifest has few), not once per row."""

    def text(own: dict) -> str:
        kept = {key: value for key, value in defaults.items() if key not in own}
        return json.dumps(kept, sort_keys=True, separators=(",", ":"))

    if not defaults or "params" not in table.column_names:
        return pa.array([text({})] * table.num_rows, pa.string())
    params = pc.cast(table.column("params"), pa.string()).combine_chunks()
    distinct = pc.unique(params)
    texts = pa.array([text(_own_params(value)) for value in distinct.to_pylist()], pa.string())
    return pc.take(texts, pc.index_in(params, value_set=distinct))


def _own_params(text: str | None) -> dict:
    """The job's params object; {} when it has none or they are unusable (the job fails)."""
    try:
        value = json.loads(text) if text and text.strip() else {}
    except (ValueError, RecursionError):
        return {}
    return value if isinstance(value, dict) else {}


def _text(table: pa.Table, name: str) -> pa.Array:
    if name not in table.column_names:
        return pa.array([_NULL] * table.num_rows, pa.string())
    column = pc.cast(table.column(name), pa.string())
    return pc.fill_null(column, _NULL).combine_chunks()


@dataclass(frozen=True)
class ChangedSpecs:
    """Manifest rows whose id finished (ok) under another spec: their positions in the
    manifest and their ids, in manifest order."""

    rows: list[int]
    ids: list[str]


def changed_specs(
    batches: Iterable[pa.Table], finished: pa.Table, param_defaults: Mapping[str, Any] | None
) -> ChangedSpecs:
    """Compare every manifest row (``batches``: conformed, in order) whose id is in
    ``finished`` (columns id, spec: the ok rows earlier runs wrote; rows of runs older than
    the spec column have none and are never called changed) with the spec recorded then."""
    known = finished.filter(pc.is_valid(finished.column("spec")))
    ids, specs = known.column("id").combine_chunks(), known.column("spec").combine_chunks()
    rows: list[int] = []
    changed_ids: list[str] = []
    offset = 0
    for batch in batches:
        if len(ids):
            where = pc.index_in(batch.column("id"), value_set=ids)
            candidates = pc.indices_nonzero(pc.is_valid(where))
            if len(candidates):
                subset = batch.take(candidates)
                before = specs.take(pc.take(where, candidates))
                differ = pc.not_equal(spec_fingerprints(subset, param_defaults), before)
                for index in pc.indices_nonzero(differ).to_pylist():
                    rows.append(offset + candidates[index].as_py())
                    changed_ids.append(subset.column("id")[index].as_py())
        offset += batch.num_rows
    return ChangedSpecs(rows, changed_ids)
