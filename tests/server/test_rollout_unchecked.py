"""A device whose install committed unchecked (no live traffic judged it) is shown as such.

The gates count it as installed; `rollout status` and the API's rollout view say
how many of each stage's succeeded devices were not checked.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import select

from edgefleet.client.rollouts import echo_status, summary_line
from edgefleet.server.db.database import Database
from edgefleet.server.db.models import RolloutDevice
from edgefleet.trust import TrustRoot
from tests.conftest import KeySet
from tests.server.test_driver import FAST, make_fleet


def test_rollout_status_counts_the_devices_that_committed_unchecked(
    database: Database,
    tmp_path: Path,
    keyset: KeySet,
    trust: TrustRoot,
    capsys: pytest.CaptureFixture[str],
) -> None:
    f = make_fleet(database, tmp_path, keyset, trust, 3)
    f.sim.set_behaviour("dev-00", "idle")
    rid = f.start({"stages": [{"percent": 34}, {"percent": 100}], "gates": FAST})
    f.run_until(rid, "completed")  # unchecked devices do not hold the gates back
    with f.db.session() as session:
        stage_of = {
            rd.device_id: rd.stage_index
            for rd in session.scalars(select(RolloutDevice).where(RolloutDevice.rollout_id == rid))
        }
    status = f.status(rid)
    assert [s.unchecked for s in status.stages] == [
        int(stage_of["dev-00"] == index) for index in range(2)
    ]
    assert status.devices["succeeded"] == 3

    view = status.model_dump(mode="json")  # what the API answers
    capsys.readouterr()
    echo_status(view)
    out = capsys.readouterr().out
    assert "devices:   3 succeeded (1 unchecked)" in out
    assert "unchecked: installed, but its health check judged no live request" in out
    view["stage_index"] = stage_of["dev-00"]
    assert "succeeded (1 unchecked)" in summary_line(view)


def test_a_checked_install_is_not_counted(
    database: Database, tmp_path: Path, keyset: KeySet, trust: TrustRoot
) -> None:
    f = make_fleet(database, tmp_path, keyset, trust, 2)
    rid = f.start({"stages": [{"percent": 100}], "gates": FAST})
    f.run_until(rid, "completed")
    assert [s.unchecked for s in f.status(rid).stages] == [0]
