"""`dippipe report`: a real run's report shows every job, escaped errors and decodable images;
a 20,000-job synthetic OUT renders a bounded gallery from a bounded number of trace shards;
S3 and memory:// OUTs get their report written back."""

from __future__ import annotations

import base64
import io
import json
import math
import time
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import tifffile
from PIL import Image
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.images import decode_image, encode_png
from pipeline.outputs import RESULT_SCHEMA, TRACE_SCHEMA, image_uri, read_results
from pipeline.report import ReportOptions
from pipeline.report.build import build_report
from pipeline.report.data import Trace
from pipeline.report.svg import curve_svg, envelope
from pipeline.storage import Storage, join
from tests.support.builders import TINY_PARAMS, tiny_image, write_manifest, write_png

runner = CliRunner()
AUTO_STOP_PARAMS = json.dumps(
    {**json.loads(TINY_PARAMS), "stop": "auto", "stop_window": 3, "stop_patience": 4}
)
VOID = {"meta", "img", "br", "hr", "input", "link", "source", "wbr"}


# ---- a strict little DOM: html.parser, with every end tag checked against its start tag ----
@dataclass
class Node:
    tag: str
    attrs: dict[str, str | None] = field(default_factory=dict)
    children: list[Node | str] = field(default_factory=list)

    def find_all(self, tag: str, cls: str | None = None) -> list[Node]:
        found = []
        for child in self.children:
            if isinstance(child, Node):
                if child.tag == tag and (cls is None or cls in (child.attrs.get("class") or "")):
                    found.append(child)
                found += child.find_all(tag, cls)
        return found

    def text(self) -> str:
        return "".join(c if isinstance(c, str) else c.text() for c in self.children)


class _Tree(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack = [Node("#root")]

    def handle_starttag(self, tag, attrs):
        node = Node(tag, dict(attrs))
        self.stack[-1].children.append(node)
        if tag not in VOID:
            self.stack.append(node)

    def handle_startendtag(self, tag, attrs):
        self.stack[-1].children.append(Node(tag, dict(attrs)))

    def handle_endtag(self, tag):
        assert self.stack[-1].tag == tag, f"</{tag}> closes <{self.stack[-1].tag}>"
        self.stack.pop()

    def handle_data(self, data):
        self.stack[-1].children.append(data)


def parse(text: str) -> Node:
    tree = _Tree()
    tree.feed(text)
    tree.close()
    assert [n.tag for n in tree.stack] == ["#root"], "unclosed elements"
    return tree.stack[0]


def check_structure(root: Node) -> None:
    """One page, no script, nothing fetched from elsewhere, every in-page link resolves."""
    assert len(root.find_all("html")) == 1 and len(root.find_all("h1")) == 1
    assert not root.find_all("script") and not root.find_all("link")
    ids = [n.attrs["id"] for n in _all_nodes(root) if n.attrs.get("id")]
    assert len(ids) == len(set(ids)), "duplicate element ids"
    for img in root.find_all("img"):
        assert img.attrs["src"].startswith("data:image/")
    for link in root.find_all("a"):
        href = link.attrs["href"]
        assert not href.startswith(("http:", "https:", "//")), href
        if href.startswith("#") and href != "#_":
            assert href[1:] in ids, f"dangling link {href}"


def _all_nodes(node: Node) -> list[Node]:
    nodes = [c for c in node.children if isinstance(c, Node)]
    return nodes + [d for c in nodes for d in _all_nodes(c)]


def decode_data_uri(src: str) -> Image.Image:
    header, payload = src.split(",", 1)
    assert header in ("data:image/png;base64", "data:image/jpeg;base64")
    image = Image.open(io.BytesIO(base64.b64decode(payload)))
    image.load()
    return image


def cards_by_id(root: Node) -> dict[str, Node]:
    return {card.find_all("h3")[0].text(): card for card in root.find_all("article", "job")}


# ---- a small real run, through the CLI -------------------------------------------------------
@pytest.fixture(scope="module")
def real_run(tmp_path_factory, ray_local) -> dict:
    tmp = tmp_path_factory.mktemp("report-run")
    rng = np.random.default_rng(0)
    rows, common = [], {"task": "denoise", "iterations": 15, "params": TINY_PARAMS}
    for i, name in enumerate(("den-a", "den-b", "noref")):
        clean = tiny_image(i, 16 + 4 * i)
        noisy = np.clip(clean + rng.normal(0, 0.1, clean.shape), 0, 1).astype(np.float32)
        row = {"id": name, "image": write_png(tmp / "in" / f"{name}.png", noisy), **common}
        if name != "noref":
            row["reference"] = write_png(tmp / "in" / f"{name}_ref.png", clean)
        rows.append(row)
    # Stops early: its marker then sits inside the curve. The rule arms once the fit has
    # reached the noise level, which takes this tiny network a few hundred steps.
    rows[1].update(params=AUTO_STOP_PARAMS, seed=1, iterations=400)
    # A missing file whose name is markup: its error must come out as text, never as tags.
    rows.append({"id": "missing", "image": str(tmp / "in" / "<b>nope</b>&.png"), **common})
    manifest = write_manifest(tmp / "manifest.parquet", rows)
    out = tmp / "out"
    command = ["run", manifest, "--out", str(out), "--gpus", "2", "--sync-every", "1"]
    ran = runner.invoke(app, [*command, "--no-progress"])  # sync 1: auto stop checks every step
    assert ran.exit_code == 1, ran.output  # one job failed
    reported = runner.invoke(app, ["report", str(out)])
    assert reported.exit_code == 0, reported.output
    html = (out / "report.html").read_text()
    results = {r["id"]: r for r in read_results(Storage(), str(out)).to_pylist()}
    return {"out": out, "rows": rows, "html": html, "root": parse(html), "results": results}


@pytest.mark.ray
def test_real_report_shows_every_job(real_run):
    root = real_run["root"]
    check_structure(root)
    assert set(cards_by_id(root)) == {"den-a", "den-b", "noref"}
    failed = table_rows(root, "failed")
    error = real_run["results"]["missing"]["error"]
    assert "<b>nope</b>&" in error
    assert failed == [["missing", "denoise", "1", error]]  # escaped in the file, intact as text
    assert not root.find_all("b")  # the error's tags did not become elements
    tiles = root.find_all("div", "tile")
    tiles = {t.find_all("dt")[0].text(): t.find_all("dd")[0].text() for t in tiles}
    assert (tiles["jobs"], tiles["ok"], tiles["failed"]) == ("4", "3", "1")


@pytest.mark.ray
def test_real_report_images_are_the_run_images(real_run):
    cards = cards_by_id(real_run["root"])
    for row in real_run["rows"][:3]:
        figures = cards[row["id"]].find_all("figure")
        captions = [f.find_all("figcaption")[0].text().split()[0] for f in figures]
        assert captions == ["input", "restored", "reference"]
        images = [decode_data_uri(img.attrs["src"]) for img in cards[row["id"]].find_all("img")]
        restored = np.asarray(images[1].convert("RGB"), dtype=np.float32) / 255.0
        output = decode_image(Path(real_run["results"][row["id"]]["output"]).read_bytes())
        np.testing.assert_allclose(restored, output.pixels.transpose(1, 2, 0), atol=1 / 255)
        assert len(images) == (3 if "reference" in row else 2)  # no reference: a placeholder


@pytest.mark.ray
def test_real_report_curves_mark_the_kept_step(real_run):
    cards = cards_by_id(real_run["root"])
    for job_id, card in cards.items():
        result = real_run["results"][job_id]
        svg = card.find_all("svg")[0]
        lines = svg.find_all("polyline")
        assert len(lines) == (1 if job_id == "noref" else 2)  # energy, and PSNR with a reference
        points = lines[0].attrs["points"].split()
        assert len(points) == result["iterations"]  # one point per step: nothing dropped
        kept = result["stopped_at"]  # a step count: point number `kept` is its step
        assert f"kept step {kept} ({result['stop_reason']})" in svg.text()
        stop = svg.find_all("line", "stop")[0]
        assert float(stop.attrs["x1"]) == pytest.approx(float(points[kept - 1].split(",")[0]))
    early = real_run["results"]["den-b"]
    assert early["stop_reason"] == "auto" and early["stopped_at"] < early["iterations"]


# ---- synthetic OUT folders, written with outputs.py's schemas --------------------------------
def synthetic_out(storage: Storage, out: str, jobs: int, per_shard: int = 1000, steps: int = 30):
    """`jobs` results in shards of `per_shard`; every 3rd job has no reference, every 50th fails
    (with markup in its error). One PNG serves as every input; restored PNGs are not written."""
    index = np.arange(jobs)
    ids = np.array([f"job-{i:06d}" for i in index])
    psnr = 15.0 + 20.0 * ((index * 7919) % jobs) / jobs  # 7919 is prime: all values distinct
    failed, no_ref = index % 50 == 7, index % 3 == 0
    for n, start in enumerate(range(0, jobs, per_shard)):
        part = slice(start, start + per_shard)
        name = f"part-synthetic-{n:05d}.parquet"
        results = _results(ids[part], psnr[part], failed[part], no_ref[part])
        storage.write_parquet(join(out, "results", name), results)
        ok = ~failed[part]
        traces = _traces(ids[part][ok], psnr[part][ok], no_ref[part][ok], steps)
        storage.write_parquet(join(out, "traces", name), traces)
    picture = join(out, "inputs", "x.png")
    storage.write_bytes(picture, encode_png(tiny_image(0, 20)))
    manifest = join(out, "inputs", "manifest.parquet")
    table = pa.table({"id": ids, "task": ["denoise"] * jobs, "image": [picture] * jobs})
    storage.write_parquet(manifest, table)
    run_json = {"config": {"manifest": manifest}}
    storage.write_bytes(join(out, "run.json"), json.dumps(run_json).encode())
    return {"ids": ids, "psnr": np.where(no_ref | failed, np.nan, psnr), "failed": failed}


def _results(ids, psnr, failed, no_ref) -> pa.Table:
    n = len(ids)
    columns = {
        "id": ids,
        "task": np.where(np.arange(n) % 2, "denoise", "jpeg"),
        "status": np.where(failed, "failed", "ok"),
        "error": pa.array(["boom <script>alert(1)</script> & co: detail"] * n, mask=~failed),
        "iterations": np.full(n, 30),
        "energy": pa.array(1.0 / psnr, mask=failed),
        "psnr": pa.array(psnr, mask=failed | no_ref),
        "seconds": np.full(n, 36.0),
        "seed": np.arange(n),
        "device": ["cuda:0"] * n,
        "attempts": np.ones(n),
        "stopped_at": np.full(n, 20),
        "stop_reason": ["auto"] * n,
    }
    arrays = [pa.array(columns.get(f.name, [None] * n), f.type) for f in RESULT_SCHEMA]
    return pa.Table.from_arrays(arrays, schema=RESULT_SCHEMA)


def _traces(ids, psnr, no_ref, steps) -> pa.Table:
    step = np.tile(np.arange(steps), len(ids))
    columns = {
        "id": np.repeat(ids, steps),
        "step": step.astype(np.int32),
        "energy": np.exp(-step / 8.0),
        "psnr": pa.array(
            np.repeat(psnr, steps) * (1 - np.exp(-step / 5)), mask=np.repeat(no_ref, steps)
        ),
        "stop_stat": pa.nulls(len(step), pa.float64()),
    }
    return pa.table(columns, schema=TRACE_SCHEMA)


def report_root(storage: Storage, out: str, **options) -> Node:
    uri = build_report(storage, out, ReportOptions(**options)).uri
    root = parse(storage.read_bytes(uri).decode())
    check_structure(root)
    return root


class CountingStorage(Storage):
    """The real Storage, recording which Parquet files the report opens."""

    def __init__(self) -> None:
        super().__init__()
        self.opened: list[str] = []

    def open_parquet(self, uri: str):
        self.opened.append(uri)
        return super().open_parquet(uri)


def table_rows(root: Node, cls: str) -> list[list[str]]:
    """The cells' text of a table's body rows."""
    rows = root.find_all("table", cls)[0].find_all("tbody")[0].find_all("tr")
    return [[cell.text() for cell in row.find_all("td")] for row in rows]


def test_large_run_streams_a_bounded_report(tmp_path):
    storage = CountingStorage()
    truth = synthetic_out(storage, str(tmp_path), jobs=20_000)
    started = time.perf_counter()
    root = report_root(storage, str(tmp_path), gallery=40)
    elapsed = time.perf_counter() - started
    assert len(root.find_all("article", "job")) == 40
    # 20 trace shards of 1,000 jobs exist; only those holding shown jobs are opened, once each.
    traces_opened = [u for u in storage.opened if "/traces/" in u]
    assert 1 <= len(traces_opened) <= 20 and len(set(traces_opened)) == len(traces_opened)
    assert elapsed < 20, f"report took {elapsed:.1f} s"
    first = root.find_all("section", "gallery")[0].find_all("h3")[0].text()
    assert first == truth["ids"][np.nanargmin(truth["psnr"])]  # worst PSNR first
    assert len(table_rows(root, "failed")) == 400  # every failure fits the 500 listed
    assert "<script>" in root.text() and not root.find_all("script")
    tasks = {row[0]: row for row in table_rows(root, "tasks")}
    jpeg = np.arange(20_000) % 2 == 0
    assert float(tasks["jpeg"][3]) == pytest.approx(np.nanmedian(truth["psnr"][jpeg]), abs=0.005)


def test_sections_rank_worst_and_best_within_budget(tmp_path):
    truth = synthetic_out(Storage(), str(tmp_path), jobs=300, per_shard=100)
    root = report_root(Storage(), str(tmp_path), gallery=8)
    titles = [s.find_all("h2")[0].text() for s in root.find_all("section", "gallery")]
    assert titles == [
        "Worst 2 by PSNR with a reference",
        "Best 2 by PSNR with a reference",
        "Worst 2 by final energy without a reference",
        "Best 2 by final energy without a reference",
    ]
    shown = [h.text() for h in root.find_all("section", "gallery")[1].find_all("h3")]
    order = np.argsort(-np.nan_to_num(truth["psnr"], nan=-1))
    assert shown == list(truth["ids"][order[:2]])
    by_energy = report_root(Storage(), str(tmp_path), gallery=8, sort="energy")
    assert len(by_energy.find_all("article", "job")) == 8


def test_memory_out_and_missing_manifest():
    storage, out = Storage(), "memory://report-test/out"
    synthetic_out(storage, out, jobs=30, per_shard=10)
    storage.write_bytes(join(out, "run.json"), b"{}")  # no manifest recorded
    storage.write_bytes(image_uri(out, "job-000001"), encode_png(tiny_image(1, 20)))
    root = report_root(storage, out)
    assert "run.json names no manifest" in root.text()
    card = cards_by_id(root)["job-000001"]
    assert decode_data_uri(card.find_all("img")[0].attrs["src"]).size == (20, 20)


def test_a_tiff_output_is_shown_and_linked_with_its_notes(tmp_path):
    """A job restored as a 16-bit TIFF (--format same on a TIFF master): the report finds
    the .tif by the row's `output`, shows it, links it, and shows the row's notes."""
    out = str(tmp_path)
    uri = image_uri(out, "scan", "tif")
    Path(uri).parent.mkdir(parents=True)
    tifffile.imwrite(uri, np.full((12, 16, 3), 40000, np.uint16), photometric="rgb")
    row = {
        "id": "scan",
        "task": "denoise",
        "status": "ok",
        "output": uri,
        "iterations": 5,
        "energy": 0.1,
        "seconds": 1.0,
        "tiles": 4,
        "notes": "rotated upright (EXIF 6)",
    }
    columns = [pa.array([row.get(f.name)], f.type) for f in RESULT_SCHEMA]
    Storage().write_parquet(join(out, "results", "part-1.parquet"),
                            pa.Table.from_arrays(columns, schema=RESULT_SCHEMA))  # fmt: skip
    Storage().write_parquet(join(out, "traces", "part-1.parquet"), TRACE_SCHEMA.empty_table())
    card = cards_by_id(report_root(Storage(), out))["scan"]
    [restored] = card.find_all("img")  # no manifest: the input and reference are not shown
    thumb = decode_data_uri(restored.attrs["src"])
    assert thumb.size == (16, 12)
    assert np.asarray(thumb.convert("RGB"))[0, 0, 0] == round(40000 / 65535 * 255)
    links = [a.attrs["href"] for a in card.find_all("a") if a.attrs["href"].startswith("images")]
    assert links == [f"images/{Path(uri).parent.name}/scan.tif"]
    assert "rotated upright (EXIF 6)" in card.text() and "tiles" in card.text()


@pytest.mark.s3
def test_report_on_s3_is_written_back(s3_bucket):
    out = f"{s3_bucket}/runs/one"
    synthetic_out(Storage(), out, jobs=12, per_shard=5)
    reported = runner.invoke(app, ["report", out, "--gallery", "4", "--open"])
    assert reported.exit_code == 0, reported.output
    assert "not on this machine" in reported.output
    root = parse(Storage().read_bytes(f"{out}/report.html").decode())
    check_structure(root)
    assert len(root.find_all("article", "job")) == 4


def test_report_of_an_empty_folder_fails_clearly(tmp_path):
    reported = runner.invoke(app, ["report", str(tmp_path)])
    assert reported.exit_code == 2 and "nothing to report" in reported.output


def test_curve_svg_keeps_spikes_and_handles_odd_energies():
    values = np.ones(10_000)
    values[7_777] = 50.0
    kept = envelope(values)
    assert len(kept) <= 402 and 7_777 in kept
    trace = Trace(np.arange(5), np.array([1.0, 0.0, -1.0, math.nan, 2.0]), None)
    svg = parse(curve_svg(trace, stopped_at=3, reason="auto"))
    assert len(svg.find_all("polyline")[0].attrs["points"].split()) == 4  # NaN skipped, linear
    assert "energy (log)" not in svg.text() and "kept step 3 (auto)" in svg.text()
