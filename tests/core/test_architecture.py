"""The architecture's import rules (docs/architecture.md) hold, and a breach of each is caught.

lint-imports checks the contracts in pyproject.toml (as `make lint` does) on a
copy of the sources laid out as the installed package is: import-linter, like
mypy, cannot follow the mapping of the top-level folders.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.wheelenv import REPO

PACKAGE_FOLDERS = ("agent", "client", "converter", "hardware", "server")
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def installed_layout(where: Path) -> Path:
    """edgefleet/ with every top-level package folder inside it, as a wheel installs them."""
    ignore = shutil.ignore_patterns("__pycache__")
    shutil.copytree(REPO / "edgefleet", where / "edgefleet", ignore=ignore)
    for folder in PACKAGE_FOLDERS:
        shutil.copytree(REPO / folder, where / "edgefleet" / folder, ignore=ignore)
    return where


def lint_imports(where: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [LINT_IMPORTS, "--no-cache", REPO / "pyproject.toml"],
        cwd=where,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_the_sources_keep_every_contract(tmp_path: Path) -> None:
    result = lint_imports(installed_layout(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 kept, 0 broken" in result.stdout


@pytest.mark.parametrize(
    ("module", "line", "contract"),
    [
        ("timefmt.py", "import edgefleet.agent.config", "the core imports no deployable"),
        ("agent/__init__.py", "import edgefleet.converter", "a deployable never imports another"),
        ("client/__init__.py", "import edgefleet.server.errors", "the client imports nothing"),
        ("client/api.py", "import sqlalchemy", "the client imports nothing"),
    ],
)
def test_a_forbidden_import_breaks_its_contract(
    tmp_path: Path, module: str, line: str, contract: str
) -> None:
    tree = installed_layout(tmp_path)
    with (tree / "edgefleet" / module).open("a") as source:
        source.write(f"\n{line}\n")
    result = lint_imports(tree)
    assert result.returncode == 1
    broken = [row for row in result.stdout.splitlines() if row.endswith(" BROKEN")]
    assert any(row.startswith(contract) for row in broken), result.stdout
