"""Spec fingerprints (pipeline/spec.py): what counts as a change of a job, and the rows a
resume names as changed."""

from __future__ import annotations

import hashlib

import pyarrow as pa
import pytest

from pipeline.manifest import MANIFEST_SCHEMA
from pipeline.spec import changed_specs, spec_fingerprints

BASE = {"id": "a", "task": "denoise", "image": "s3://b/a.png", "scale": None,
        "iterations": 100, "seed": None, "params": '{"depth": 3}'}  # fmt: skip


def _table(*rows: dict) -> pa.Table:
    """Conformed manifest rows, as manifest.iter_batches yields them."""
    columns = {f.name: [row.get(f.name) for row in rows] for f in MANIFEST_SCHEMA}
    return pa.table(columns, schema=pa.schema([f.with_nullable(True) for f in MANIFEST_SCHEMA]))


def _one(row: dict, defaults: dict | None = None) -> str:
    return spec_fingerprints(_table(row), defaults).to_pylist()[0]


def test_the_same_spec_gives_the_same_fingerprint_and_it_is_a_sha256_prefix():
    first, second = _one(BASE), _one(dict(BASE))
    assert first == second and len(first) == 16
    # Independent: the documented canonical text, hashed here with hashlib.
    fields = ["denoise", "s3://b/a.png", "\0", "\0", "\0", "\0", "100", "\0", '{"depth": 3}', "{}"]
    assert first == hashlib.sha256("\x1f".join(fields).encode()).hexdigest()[:16]


@pytest.mark.parametrize(
    "change",
    [{"task": "inpaint"}, {"image": "s3://b/other.png"}, {"mask": "s3://b/m.png"},
     {"scale": 2}, {"iterations": 101}, {"seed": 7}, {"params": '{"depth": 4}'}],
)  # fmt: skip
def test_every_column_that_decides_the_result_changes_the_fingerprint(change):
    assert _one({**BASE, **change}) != _one(BASE)


def test_the_run_wide_defaults_are_part_of_the_spec():
    assert _one(BASE, {"stop": "fixed"}) != _one(BASE, {"stop": "auto"})
    assert _one(BASE, {"stop": "auto", "ensemble": 2}) == _one(
        BASE, {"ensemble": 2, "stop": "auto"}
    )


def test_a_default_the_job_overrides_is_not_part_of_its_spec():
    own = {**BASE, "params": '{"stop": "auto", "depth": 3}'}
    assert _one(own, {"stop": "fixed"}) == _one(own, {"stop": "auto"}) == _one(own)
    assert _one(own, {"ensemble": 2}) != _one(own)  # one it does not set still counts
    rows = spec_fingerprints(_table(BASE, own, {**BASE, "params": None}), {"stop": "fixed"})
    assert rows.to_pylist() == [_one(BASE, {"stop": "fixed"}), _one(own),
                                _one({**BASE, "params": None}, {"stop": "fixed"})]  # fmt: skip


def test_a_null_is_not_the_same_as_an_empty_value():
    assert _one({**BASE, "params": None}) != _one({**BASE, "params": ""})


def test_changed_specs_names_only_finished_ids_whose_spec_differs():
    rows = [dict(BASE, id=f"j{i}", image=f"s3://b/{i}.png") for i in range(6)]
    before = spec_fingerprints(_table(*rows), None).to_pylist()
    finished = pa.table({
        "id": ["j0", "j1", "j2", "j4", "gone"],
        "spec": [before[0], before[1], None, before[4], "0123456789abcdef"],  # j2: older run
    })  # fmt: skip
    rows[1]["iterations"] = 5  # changed, finished
    rows[2]["iterations"] = 5  # changed, but its row has no spec: not called changed
    rows[3]["iterations"] = 5  # changed, never finished: simply pending
    batches = [_table(*rows[:4]), _table(*rows[4:])]
    changed = changed_specs(batches, finished, None)
    assert (changed.rows, changed.ids) == ([1], ["j1"])
    rows[5]["seed"] = 1
    rows[4]["seed"] = 1  # in the second batch: its manifest position is 4
    changed = changed_specs([_table(*rows[:4]), _table(*rows[4:])], finished, None)
    assert (changed.rows, changed.ids) == ([1, 4], ["j1", "j4"])
