"""Manifests made to hurt: ids with path separators and Unicode tricks, absurd params, a
million rows, files that are not Parquet. Property-based tests (hypothesis) pin the id rule
and manifest validation down over inputs nobody would think of writing by hand."""

from __future__ import annotations

import json
import posixpath
import subprocess
import sys
import unicodedata
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.ids import is_safe_id, unsafe_mask
from pipeline.manifest import ManifestError, inspect_manifest, iter_jobs, job_problems
from pipeline.manifest import job_from_row as _row_job
from pipeline.outputs import image_uri
from pipeline.storage import Storage
from pipeline.worker import Fitter, WorkerConfig
from tests.support.builders import TINY_PARAMS, tiny_image, write_manifest, write_png

runner = CliRunner()
SAFE_ALPHABET = "abcXYZ019._-"

HOSTILE_IDS = {
    "slash": "a/b",
    "backslash": "a\\b",
    "dot-dot": "..",
    "dot": ".",
    "dots": "...",
    "traversal": "../etc/passwd",
    "absolute": "/abs",
    "fullwidth (NFKC 'abc')": "ａｂｃ",
    "decomposed e-acute (NFD)": "cafe\u0301",
    "composed e-acute (NFC)": "caf\u00e9",
    "right-to-left override": "\u202egnp.exe",
    "zero-width space": "a\u200bb",
    "zero-width joiner": "a\u200db",
    "byte order mark": "\ufeffbom",
    "roman numeral nine (NFKC 'IX')": "\u2168",
    "fi ligature": "\ufb01le",
    "dotted capital I": "A\u0130",
    "NUL": "a\x00b",
    "newline": "a\nb",
    "trailing newline": "abc\n",
    "tab": "a\tb",
    "leading space": " a",
    "empty": "",
    "129 characters": "x" * 129,
    "ANSI escape": "\x1b[31mred",
    "percent-encoded dots": "%2e%2e",
    "colon": "a:b",
    "URI": "s3://x",
    "glob": "a*b",
    "home": "~user",
}
SAFE_IDS = ["a", "A-b_c.d", "x" * 128, "-leading-dash", ".hidden", "a..b", "9"]


def _manifest(tmp_path, ids: list[str | None]) -> str:
    table = pa.table(
        {
            "id": pa.array(ids, pa.string()),
            "task": ["denoise"] * len(ids),
            "image": ["x.png"] * len(ids),
        }
    )
    path = str(tmp_path / f"m-{uuid.uuid4().hex[:8]}.parquet")
    pq.write_table(table, path)
    return path


@pytest.mark.parametrize("name", sorted(HOSTILE_IDS))
def test_hostile_ids_are_refused_and_shown_unambiguously(tmp_path, name):
    bad = HOSTILE_IDS[name]
    assert not is_safe_id(bad)
    with pytest.raises(ManifestError) as refused:
        inspect_manifest(Storage(), _manifest(tmp_path, ["ok-1", bad]))
    message = str(refused.value)
    assert "unsafe id" in message and "row 1 (" in message
    shown = message.split("row 1 (", 1)[1]
    # Invisible and control characters, and ids that NFKC would change (lookalikes), are
    # shown as escapes, never raw:
    lookalike = unicodedata.normalize("NFKC", bad) != bad
    for char in bad:
        invisible = unicodedata.category(char)[0] in "CZ" and char != " "
        if invisible or (lookalike and not char.isascii()):
            assert char not in shown, (name, shown)
    with pytest.raises(ValueError, match="unsafe job id"):
        image_uri("out", bad)  # and no code path can make it a file name


def test_plain_ids_are_accepted(tmp_path):
    info = inspect_manifest(Storage(), _manifest(tmp_path, SAFE_IDS))
    assert [job.id for job in iter_jobs(Storage(), info)] == SAFE_IDS


def test_an_id_in_rich_markup_does_not_break_the_cli(tmp_path):
    manifest = _manifest(tmp_path, ["[/]", "[bold red]x", "ok"])
    result = runner.invoke(app, ["run", manifest, "--out", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output  # not a MarkupError traceback
    assert isinstance(result.exception, SystemExit)
    assert "row 0 ('[/]')" in result.output and "[bold red]x" in result.output


@given(st.text(max_size=140))
@settings(max_examples=400, deadline=None)
def test_the_id_rule_agrees_with_itself_and_keeps_files_inside_out(value):
    vectorised_safe = not unsafe_mask(pa.array([value], pa.string()))[0].as_py()
    assert is_safe_id(value) == vectorised_safe
    if not is_safe_id(value):
        return
    assert value.isascii() and value.isprintable() and " " not in value
    assert unicodedata.normalize("NFKC", value) == value == unicodedata.normalize("NFC", value)
    uri = image_uri("/data/out", value)
    assert posixpath.normpath(uri) == uri and posixpath.basename(uri) == f"{value}.png"
    assert posixpath.dirname(posixpath.dirname(uri)) == "/data/out/images"


@given(st.text(alphabet=SAFE_ALPHABET, min_size=1, max_size=128).filter(lambda s: s.strip(".")))
def test_every_id_of_the_allowed_alphabet_is_accepted(value):
    assert is_safe_id(value)


ID_VALUES = st.one_of(
    st.sampled_from(["a", "b", "c", "job-1", "job.2"]),  # small pool: duplicates happen
    st.text(alphabet=SAFE_ALPHABET, min_size=1, max_size=12),
    st.text(max_size=6),  # anything: unsafe ones happen
    st.none(),
)


@given(st.lists(ID_VALUES, min_size=1, max_size=30))
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_manifest_validation_names_exactly_the_bad_rows(ids):
    storage = Storage()
    uri = f"memory://hypothesis/{uuid.uuid4().hex}.parquet"
    table = pa.table({"id": pa.array(ids, pa.string()), "task": ["denoise"] * len(ids)})
    storage.write_parquet(uri, table.append_column("image", pa.array(["x"] * len(ids))))
    counts = {value: ids.count(value) for value in ids if value is not None}
    missing = [r for r, v in enumerate(ids) if v is None]
    unsafe = [r for r, v in enumerate(ids) if v is not None and not is_safe_id(v)]
    repeated = [r for r, v in enumerate(ids) if v is not None and counts[v] > 1]
    try:
        info = inspect_manifest(storage, uri)
        jobs = [job.id for job in iter_jobs(storage, info)]
    except ManifestError as error:
        problems = {p.split(" at ", 1)[0].split(" (")[0]: p for p in error.problems}
        for kind, rows in (("missing id", missing), ("unsafe id", unsafe)):
            assert (kind in problems) == bool(rows), (kind, ids, error.problems)
            if rows:
                assert _named_rows(problems[kind]) == rows[:20]
        assert ("duplicate id" in problems) == bool(repeated), (ids, error.problems)
        if repeated:
            assert _named_rows(problems["duplicate id"]) == repeated[:20]
        return
    finally:
        storage.remove(uri)
    assert not (missing or unsafe or repeated), ids
    assert jobs == ids  # nothing lost or reordered


def _named_rows(problem: str) -> list[int]:
    import re

    return [int(n) for n in re.findall(r"row (\d+) \(", problem)]


JSONISH = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=8)
    | st.sampled_from(["lr", "depth", "channels", "input_depth", "stop", "ensemble"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)
PARAM_KEYS = st.sampled_from(
    ["lr", "depth", "channels", "input_depth", "skip_channels", "exp_weight", "reg_noise_std"]
)


@given(
    st.one_of(
        st.text(max_size=40),
        JSONISH.map(lambda v: json.dumps(v, allow_nan=True)),
        st.dictionaries(PARAM_KEYS, JSONISH, max_size=4).map(json.dumps),
    ),
    st.sampled_from(["denoise", "inpaint", "super_resolution", "preimage", "nope"]),
    st.one_of(st.none(), st.integers(-(2**31), 2**31 - 1)),
)
@settings(max_examples=300, deadline=None)
def test_job_problems_never_raises_whatever_the_params(params, task, number):
    job = _row_job(
        {"id": "p", "task": task, "image": "x", "params": params, "iterations": number, "scale": 2},
        0,
    )
    problems = job_problems(job)
    assert isinstance(problems, list) and all(isinstance(p, str) and p for p in problems)


ABSURD = {
    '{"lr": NaN}': "lr must be a finite number",
    '{"lr": -1}': "lr must be in",
    '{"lr": 1e999}': "lr must be a finite number",
    '{"exp_weight": Infinity}': "exp_weight must be a finite number",
    '{"channels": 100000}': "channels must be an integer in [1, 1024]",
    '{"depth": 0}': "depth must be an integer in [1, 8]",
    '{"reg_noise_std": -0.5}': "reg_noise_std must be in",
    '{"channels": [8, -1, 8]}': "channels must be an integer",
    '{"lr": "fast"}': "lr must be a finite number",
    '{"typo": 1}': "unknown params",
    "[1, 2]": "params must be a JSON object",
    "{not json": "params is not valid JSON",
    "[" * 100_000 + "]" * 100_000: "params is",  # too deep, or too long
    '{"lr": 1' + "0" * 5000 + "}": "params is not usable JSON",
}


@pytest.mark.parametrize("params", sorted(ABSURD))
def test_nan_negative_and_absurd_params_fail_the_job_clearly(tmp_path, params):
    image = write_png(tmp_path / "in.png", tiny_image(0))
    fitter = Fitter(WorkerConfig(out=str(tmp_path / "out"), device="cpu"))
    row = {"id": "p", "task": "denoise", "image": image, "iterations": 3, "params": params}
    outcome = fitter.run(_row_job(row, 0)).row
    assert outcome["status"] == "failed" and ABSURD[params] in outcome["error"], outcome
    assert len(outcome["error"]) < 2000  # the message does not echo a megabyte back


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"iterations": 2**31 - 1}, "iterations must be at most 1,000,000"),
        ({"iterations": 0}, "iterations must be at least 1"),
        ({"iterations": -5}, "iterations must be at least 1"),
        ({"seed": -1}, "seed must be non-negative"),
        ({"task": "super_resolution", "scale": 3}, "scale"),
        ({"task": "super_resolution", "scale": -2}, "scale"),
        ({"task": "super_resolution", "scale": 1 << 30}, "scale"),
        ({"params": "x" * 70_000}, "params is 70,000 characters long"),
    ],
)
def test_absurd_columns_fail_the_job_clearly(fields, message):
    row = {"id": "p", "task": "denoise", "image": "x", "params": TINY_PARAMS, **fields}
    problems = job_problems(_row_job(row, 0))
    assert any(message in problem for problem in problems), problems


MILLION = """
import json, sys, threading, time
from pipeline.manifest import inspect_manifest, iter_jobs, job_problems
from pipeline.storage import Storage
def rss_mb():
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * 4096 / 2**20
highest, done = [rss_mb()], threading.Event()
def sample():
    while not done.wait(0.005):
        highest.append(max(highest[-1], rss_mb()))
sampler = threading.Thread(target=sample)
before, started = rss_mb(), time.perf_counter()
sampler.start()
storage = Storage()
info = inspect_manifest(storage, sys.argv[1])
rows = problems = 0
for job in iter_jobs(storage, info):
    rows += 1
    problems += bool(job_problems(job))
done.set()
sampler.join()
print(json.dumps({"rows": rows, "problems": problems, "growth_mb": highest[-1] - before,
                  "seconds": time.perf_counter() - started}))
"""


@pytest.mark.slow
def test_a_million_row_manifest_validates_in_bounded_memory(tmp_path):
    n = 1_000_000
    ids = pa.array([f"scan-{i:07d}" for i in range(n)])
    columns = {
        "id": ids,
        "task": pa.array(["denoise"] * n),
        "image": pa.compute.binary_join_element_wise("s3://archive/", ids, ".tif", ""),
        "iterations": pa.array([2000] * n, pa.int32()),
        "params": pa.array([TINY_PARAMS] * n),
    }
    path = tmp_path / "million.parquet"
    pq.write_table(pa.table(columns), path)
    measured = subprocess.run(
        [sys.executable, "-c", MILLION, str(path)], capture_output=True, text=True, timeout=300
    )
    assert measured.returncode == 0, measured.stderr
    figures = json.loads(measured.stdout)
    print(f"\n1,000,000-row manifest: {figures}")
    assert figures["rows"] == n and figures["problems"] == 0
    # The rows themselves are ~100 MB in memory; the streaming checks hold a batch plus
    # 8 bytes of hash per id. (Reading the whole id column and hashing its strings, as
    # before, grew the peak by about 135 MB for the id checks alone.)
    assert figures["growth_mb"] < 100, figures

    table = pq.read_table(path)  # the same million, with one duplicate and one unsafe id
    changed = table.column("id").to_pylist()
    changed[654_321], changed[999_999] = "scan-0000007", "scan-\u202e9999999"
    pq.write_table(table.set_column(0, "id", pa.array(changed)), path)
    with pytest.raises(ManifestError) as refused:
        inspect_manifest(Storage(), str(path))
    message = str(refused.value)
    assert "row 999999 ('scan-\\u202e9999999')" in message
    assert "duplicate id at row 7 ('scan-0000007'), row 654321 ('scan-0000007')" in message


def _not_parquet(tmp_path) -> dict[str, str]:
    good = write_manifest(tmp_path / "good.parquet", [{"id": "a", "task": "denoise", "image": "x"}])
    data = Path(good).read_bytes()
    files = {
        "text": b"id,task,image\na,denoise,x\n",
        "png": b"\x89PNG\r\n\x1a\n" + b"\0" * 64,
        "empty": b"",
        "truncated": data[: len(data) // 2],
        "footer-garbled": data[:-12] + b"\xff" * 8 + data[-4:],
        "magic-only": b"PAR1" + b"\x00" * 32 + b"PAR1",
    }
    paths = {}
    for name, content in files.items():
        (tmp_path / f"{name}.parquet").write_bytes(content)
        paths[name] = str(tmp_path / f"{name}.parquet")
    (tmp_path / "folder.parquet").mkdir()
    paths["folder"] = str(tmp_path / "folder.parquet")
    return paths


def test_files_that_are_not_parquet_are_refused_before_any_work(tmp_path):
    for name, path in _not_parquet(tmp_path).items():
        out = tmp_path / f"out-{name}"
        ran = runner.invoke(app, ["run", path, "--out", str(out), "--no-progress"])
        text = " ".join(ran.output.split())
        assert ran.exit_code == 2, (name, text)
        assert "manifest rejected, nothing was run" in text, (name, text)
        # An empty folder is a manifest of no Parquet files (folders of parts are manifests).
        assert "not a Parquet file" in text or "a folder without Parquet files" in text, text
        assert not isinstance(ran.exception, Exception) or isinstance(ran.exception, SystemExit)
        assert not out.exists()
        checked = runner.invoke(app, ["validate", path])
        assert checked.exit_code == 1 and "manifest:" in checked.output, (name, checked.output)
