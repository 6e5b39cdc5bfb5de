"""dip_core is the mathematics only: importing it must not drag in I/O or scheduling; and the
pipeline uses dip_core only through the names its package exports."""

import ast
import subprocess
import sys
from pathlib import Path

FORBIDDEN = ("ray", "fsspec", "s3fs", "pyarrow", "PIL", "typer", "rich", "skimage", "pipeline")
PIPELINE = Path(__file__).resolve().parents[2] / "pipeline"


def test_import_dip_core_loads_no_io_or_scheduling_modules():
    code = (
        "import sys, dip_core\n"
        f"bad = [m for m in {FORBIDDEN!r} if m in sys.modules]\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"dip_core imported {out.stdout.strip()}"


def _dip_core_internals(tree: ast.AST, exported: set[str]) -> list[str]:
    """dip_core modules, or names dip_core does not export, that the imports of `tree` name
    (at any depth: imports inside functions count too)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names if alias.name.startswith("dip_core.")]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.startswith("dip_core."):
                found.append(node.module)
            elif node.module == "dip_core":
                found += [f"dip_core.{a.name}" for a in node.names if a.name not in exported]
    return found


def test_the_pipeline_imports_only_dip_cores_public_names():
    import dip_core

    exported = set(dip_core.__all__)
    bad = []
    for path in sorted(PIPELINE.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        bad += [f"{path.relative_to(PIPELINE.parent)}: {name}"
                for name in _dip_core_internals(tree, exported)]  # fmt: skip
    assert PIPELINE.is_dir() and not bad, f"dip_core internals imported: {bad}"


# What the report package may use from the rest of the project: it reads a run's OUT and
# its manifest (a file, folder or glob, as the run read it).
REPORT_MAY_USE = {"dip_core", "pipeline.errors", "pipeline.images", "pipeline.manifest",
                  "pipeline.outputs", "pipeline.storage"}  # fmt: skip


def test_the_report_is_a_closed_subsystem():
    used = set()
    for path in sorted((PIPELINE / "report").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            modules = []
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules = [node.module]
            elif isinstance(node, ast.ImportFrom) and node.level > 1:  # out of the package
                modules = [f"pipeline.{'.'.join(filter(None, [node.module]))} (relative)"]
            used |= {m for m in modules if m.split(".")[0] in ("dip_core", "pipeline")}
    outside = {m for m in used if not m.startswith("pipeline.report")}
    assert outside == REPORT_MAY_USE
    nobody_else = [path for path in PIPELINE.glob("*.py")
                   if "pipeline.report." in path.read_text()]  # fmt: skip
    assert nobody_else == [], "only pipeline.report's public names are used outside it"
