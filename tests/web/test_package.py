"""The wheel carries the pages' templates and static files."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest

from tests.wheelenv import REPO, build_wheel

WEB = REPO / "server" / "web"


@pytest.mark.slow
def test_the_wheel_has_every_template_and_static_file(tmp_path: Path) -> None:
    wheel, _ = build_wheel(tmp_path)
    names = set(zipfile.ZipFile(wheel).namelist())
    wanted = {
        "edgefleet/server/web/" + path.relative_to(WEB).as_posix()
        for folder in ("templates", "static")
        for path in (WEB / folder).rglob("*")
        if path.is_file()
    }
    assert wanted, "no templates or static files found in the sources"
    assert "edgefleet/server/web/templates/base.html" in wanted
    assert wanted - names == set()
