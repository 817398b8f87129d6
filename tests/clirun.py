"""`edgefleet ...` run in the test's own process, as the shell would, with its exit status."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgefleet.cli import cli
from edgefleet.cli.errors import run_with_error_handling


class Cli:
    """Call with the command's arguments; returns (stdout, stderr) after checking the status."""

    def __init__(self, capsys: pytest.CaptureFixture[str]) -> None:
        self._capsys = capsys

    def __call__(self, *args: str | Path, status: int = 0) -> tuple[str, str]:
        self._capsys.readouterr()
        code = run_with_error_handling(cli, [str(arg) for arg in args])
        out, err = self._capsys.readouterr()
        assert code == status, f"exit {code}\nstdout: {out}\nstderr: {err}"
        assert "Traceback" not in err
        return out, err
