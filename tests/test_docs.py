"""The docs name what the code has: every registered task and input role."""

from pathlib import Path

from dip_core import INPUT_ROLES, PRESETS, TASKS

ROOT = Path(__file__).resolve().parent.parent


def test_every_task_and_role_is_in_the_manifest_docs():
    text = (ROOT / "manifests" / "README.md").read_text()
    task_row = next(line for line in text.splitlines() if line.startswith("| `task`"))
    for name in TASKS:
        assert f"`{name}`" in task_row, name
    for role in INPUT_ROLES:
        assert f"| `{role.name}` |" in text, role.name


def test_every_task_is_in_the_readme_and_every_preset_in_docs_presets():
    readme = (ROOT / "README.md").read_text()
    for name in TASKS:
        assert f"`{name}`" in readme, name
    presets = (ROOT / "docs" / "presets.md").read_text()
    for name in PRESETS:
        assert f"| `{name}` |" in presets, name


def test_the_example_manifests_are_the_demos_jobs():
    import json

    import pyarrow.parquet as pq

    from manifests.make_examples import demo_rows

    for name, inputs in (("demo", "demo-out/inputs"), ("s3", "s3://my-bucket/dippipe-demo/inputs")):
        written = json.loads((ROOT / "manifests" / "examples" / f"{name}.json").read_text())
        parquet = pq.read_table(ROOT / "manifests" / "examples" / f"{name}.parquet").to_pylist()
        assert written == parquet
        given = [{k: v for k, v in row.items() if v is not None} for row in written]
        assert given == [
            {k: v for k, v in row.items() if v is not None} for row in demo_rows(inputs)
        ]


def test_the_readme_exit_code_table_is_the_code_table():
    from pipeline.exit_codes import MEANINGS

    text = (ROOT / "README.md").read_text()
    section = text[text.index("### Exit codes") :].split("\n#", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 2 and cells[0].isdigit():
            rows[int(cells[0])] = cells[1]
    assert rows == {int(code): meaning for code, meaning in MEANINGS.items()}
