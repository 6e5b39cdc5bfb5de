"""dip_core is the mathematics only: importing it must not drag in I/O or scheduling."""

import subprocess
import sys

FORBIDDEN = ("ray", "fsspec", "s3fs", "pyarrow", "PIL", "typer", "rich", "skimage", "pipeline")


def test_import_dip_core_loads_no_io_or_scheduling_modules():
    code = (
        "import sys, dip_core\n"
        f"bad = [m for m in {FORBIDDEN!r} if m in sys.modules]\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"dip_core imported {out.stdout.strip()}"
