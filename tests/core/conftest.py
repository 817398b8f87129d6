"""Fixtures of the core's command-line tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.clirun import Cli


@pytest.fixture
def run(capsys: pytest.CaptureFixture[str]) -> Cli:
    return Cli(capsys)


@pytest.fixture
def keydir(tmp_path: Path, run: Cli) -> Path:
    """A fresh key set (root, release, server keys and trust.json v1)."""
    run("keys", "init", tmp_path / "keys")
    return tmp_path / "keys"
