"""A device installs `edgefleet[agent]` alone: the agent runs without converter or server code."""

from __future__ import annotations

import subprocess
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
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


@pytest.mark.slow
def test_agent_extra_alone_installs_and_imports(tmp_path: Path) -> None:
    venv.create(tmp_path / "venv", with_pip=True)
    python = tmp_path / "venv" / "bin" / "python"
    subprocess.run(
        [python, "-m", "pip", "install", "--quiet", f"{REPO}[agent]"],
        check=True,
        capture_output=True,
        timeout=600,
    )
    probe = subprocess.run(
        [python, "-c", PROBE], check=True, capture_output=True, text=True, cwd=tmp_path
    )
    assert probe.stdout.strip() == "[] [] False"
    refused = subprocess.run(
        [python, "-m", "edgefleet", "convert", "--help"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert refused.returncode != 0
    assert "pip install 'edgefleet[converter]'" in refused.stderr
