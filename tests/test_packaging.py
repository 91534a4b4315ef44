"""The wheel a user installs carries everything hotmodel serves: the dashboard's static
files and the type marker, besides the code. Built from a copy of the source (the working
tree stays clean), the way pip builds it for `pip install .`."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_wheel_carries_the_dashboard_and_the_type_marker(tmp_path: Path) -> None:
    source = tmp_path / "source"
    shutil.copytree(ROOT / "src", source / "src", ignore=shutil.ignore_patterns("*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    out = tmp_path / "wheel"
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(source)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert built.returncode == 0, built.stdout + built.stderr
    (wheel,) = out.glob("hotmodel-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    ui = {f"hotmodel/ui/{p.name}" for p in (ROOT / "src" / "hotmodel" / "ui").iterdir()}
    assert ui and ui <= names, sorted(ui - names)
    assert "hotmodel/py.typed" in names and "hotmodel/server.py" in names
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "hotmodel = hotmodel.cli:main" in zipfile.ZipFile(wheel).read(entry).decode()
