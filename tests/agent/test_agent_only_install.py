"""A device installs the wheel with `[agent]` alone: the agent runs without converter or server.

As docs/agent.md says a device does: the wheel (`make dist` builds it with the
sdist) installed into a virtual environment of its own, which also carries the
systemd files.
"""

from __future__ import annotations

import re
import subprocess
import venv
import zipfile
from pathlib import Path

import pytest

from tests.wheelenv import REPO, build_wheel

# The folders whose every file the wheel holds, and where: the core, and the
# top-level folders mapped into the edgefleet namespace.
PACKAGE_FOLDERS = {
    "edgefleet": "edgefleet",
    "agent": "edgefleet/agent",
    "client": "edgefleet/client",
    "converter": "edgefleet/converter",
    "hardware": "edgefleet/hardware",
    "server": "edgefleet/server",
}
PROBE = """
import sys
import edgefleet.agent.cli, edgefleet.agent.runner
from edgefleet.agent import Predictor
forbidden = {"onnx", "fastapi", "sqlalchemy", "alembic", "sympy", "sklearn"}
loaded = sorted({m.split(".")[0] for m in sys.modules} & forbidden)
converter = sorted(m for m in sys.modules if m.startswith("edgefleet.converter"))
crypto = any(m.startswith("cryptography") for m in sys.modules)  # verification is PyNaCl's
print(loaded, converter, crypto)
"""
# How docs/agent.md finds the systemd files in the installed package.
SYSTEMD_FILES = "import edgefleet.hardware as h; print(h.__path__[0])"


def package_files() -> set[str]:
    """Every file of every package folder (subpackages and data), as the wheel names it."""
    return {
        f"{inside}/{path.relative_to(REPO / folder).as_posix()}"
        for folder, inside in PACKAGE_FOLDERS.items()
        for path in (REPO / folder).rglob("*")
        if path.is_file() and "__pycache__" not in path.parts
    }


@pytest.mark.slow
def test_the_wheel_with_the_agent_extra_alone_installs_and_runs(tmp_path: Path) -> None:
    wheel, log = build_wheel(tmp_path)
    assert re.findall(r"\w+Warning: .*", log) == []  # setuptools' warnings, for one
    names = zipfile.ZipFile(wheel).namelist()
    assert package_files() - set(names) == set()  # subpackages are found, not listed
    profiles = sorted(p.name for p in (REPO / "hardware" / "profiles").glob("*.toml"))
    assert profiles and all(f"edgefleet/hardware/profiles/{p}" in names for p in profiles)
    for systemd_file in ("edgefleet-agent.service", "edgefleet-sysusers.conf"):
        assert f"edgefleet/hardware/systemd/{systemd_file}" in names

    prefix = tmp_path / "opt" / "edgefleet"  # /opt/edgefleet on a device
    venv.create(prefix, with_pip=True)
    python = prefix / "bin" / "python"
    subprocess.run(
        [python, "-m", "pip", "install", "--quiet", f"{wheel}[agent]"],
        check=True,
        capture_output=True,
        timeout=600,
    )
    probe = subprocess.run(
        [python, "-c", PROBE], check=True, capture_output=True, text=True, cwd=tmp_path
    )
    assert probe.stdout.strip() == "[] [] False"
    refused = subprocess.run(
        [prefix / "bin" / "edgefleet", "convert", "--help"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert refused.returncode != 0
    assert "pip install '.[converter]'" in refused.stderr
    targets = subprocess.run(
        [prefix / "bin" / "edgefleet", "targets", "list"],
        check=True,
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert all(p.removesuffix(".toml") in targets.stdout for p in profiles)
    found = subprocess.run(
        [python, "-c", SYSTEMD_FILES], check=True, capture_output=True, text=True, cwd=tmp_path
    )
    unit = Path("systemd", "edgefleet-agent.service")
    shipped = Path(found.stdout.strip()) / unit
    assert shipped.read_bytes() == (REPO / "hardware" / unit).read_bytes()
