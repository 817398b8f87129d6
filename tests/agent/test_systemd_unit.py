"""The systemd files in hardware/systemd work together, with what docs/agent.md installs.

systemd's own tools check them: `systemd-analyze verify` the unit (it checks every
directive and that ExecStart is executable), `systemd-sysusers --root` the user
file. The tests skip without the tools unless EDGEFLEET_REQUIRE_SYSTEMD is set
(Debian: the `systemd` package).
"""

from __future__ import annotations

import configparser
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "hardware" / "systemd" / "edgefleet-agent.service"
SYSUSERS = REPO / "hardware" / "systemd" / "edgefleet-sysusers.conf"
DOCS = (REPO / "docs" / "agent.md").read_text()
VENV = "/opt/edgefleet"  # where docs/agent.md installs the agent


def systemd_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        if os.environ.get("EDGEFLEET_REQUIRE_SYSTEMD"):
            pytest.fail(f"{name} is required (EDGEFLEET_REQUIRE_SYSTEMD): apt-get install systemd")
        pytest.skip(f"{name} is not installed (Debian: the systemd package)")
    return path


def service() -> configparser.SectionProxy:
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(UNIT.read_text())
    return parser["Service"]


def test_the_unit_verifies(tmp_path: Path) -> None:
    analyze = systemd_tool("systemd-analyze")
    # The unit as installed, but starting this test environment's edgefleet (a virtual
    # environment as /opt/edgefleet is): verify checks that ExecStart is executable.
    installed = Path(sys.executable).parent / "edgefleet"
    unit = tmp_path / UNIT.name
    unit.write_text(UNIT.read_text().replace(f"{VENV}/bin/edgefleet", str(installed)))
    assert str(installed) in unit.read_text()
    verified = subprocess.run(
        [analyze, "verify", unit], capture_output=True, text=True, timeout=120
    )
    assert verified.returncode == 0 and verified.stderr == "", verified.stderr


def test_the_unit_starts_what_the_docs_install() -> None:
    unit = service()
    assert unit["ExecStart"] == (
        f"{VENV}/bin/edgefleet agent run --config /etc/edgefleet/agent.toml"
    )
    assert f"python3 -m venv {VENV}" in DOCS
    assert f"{VENV}/bin/pip install" in DOCS
    assert "--group edgefleet -o /etc/edgefleet/agent.toml" in DOCS  # readable by the service
    # The state directory systemd gives the service's user is the one the agent uses.
    assert unit["StateDirectory"] == "edgefleet"
    assert unit["Environment"] == "EDGEFLEET_STATE_DIR=/var/lib/edgefleet"
    assert "--state-dir /var/lib/edgefleet" in DOCS


def test_the_unit_keeps_the_state_private() -> None:
    """Every file the agent creates is its user's alone, and so is the state directory
    (the unit verifies with these values: test_the_unit_verifies)."""
    unit = service()
    assert unit["UMask"] == "0077"
    assert unit["StateDirectoryMode"] == "0700"
    assert "`UMask=0077`" in DOCS and "(mode 0700)" in DOCS


def test_sysusers_creates_the_user_and_group_the_unit_runs_as(tmp_path: Path) -> None:
    sysusers = systemd_tool("systemd-sysusers")
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    subprocess.run(
        [sysusers, f"--root={root}", SYSUSERS], check=True, capture_output=True, timeout=120
    )
    unit = service()
    users = {line.split(":")[0]: line.split(":") for line in (root / "etc/passwd").open()}
    groups = {line.split(":")[0]: line.split(":") for line in (root / "etc/group").open()}
    user = users[unit["User"]]
    assert groups[unit["Group"]][2] == user[3]  # the user's primary group is the unit's Group
    assert user[5] == "/var/lib/edgefleet" and user[6].strip().endswith("nologin")
