"""The package as a user installs it: a wheel built from a copy of the sources,
installed with some extras into a fresh virtual environment.

The copy keeps the build's output (build/, *.egg-info) out of the working tree;
the environment has no system site packages, so nothing leaks in from the test
environment: what is importable there is what the extras brought.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import venv
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# What the wheel is built from: the packaging files and every top-level package folder.
SOURCES = (
    "pyproject.toml",
    "setup.py",
    "README.md",
    "edgefleet",
    "agent",
    "client",
    "converter",
    "hardware",
    "server",
)


def build_wheel(where: Path) -> tuple[Path, str]:
    """The wheel of a copy of the sources, in `where`, and the build's log."""
    source = where / "source"
    source.mkdir(parents=True)
    for name in SOURCES:
        origin = REPO / name
        if origin.is_dir():
            shutil.copytree(origin, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(origin, source / name)
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-v", "-w", where / "dist", source],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert built.returncode == 0, built.stdout + built.stderr
    (wheel,) = (where / "dist").glob("edgefleet-*-py3-none-any.whl")
    return wheel, built.stdout + built.stderr


def fresh_venv(where: Path, requirement: str) -> Path:
    """A virtual environment in `where` with `requirement` installed; its python."""
    venv.create(where, with_pip=True)
    python = where / "bin" / "python"
    subprocess.run(
        [python, "-m", "pip", "install", "--quiet", requirement],
        check=True,
        capture_output=True,
        timeout=900,
    )
    return python


__all__ = ["REPO", "SOURCES", "build_wheel", "fresh_venv"]
