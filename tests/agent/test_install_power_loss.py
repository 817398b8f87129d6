"""SIGKILL in every state of the install machine: the device serves the old or the new version.

Each case runs the installer in a child process (tests/agent/power_loss_driver.py)
that SIGKILLs itself right after the named state is persisted, or with `mid`
inside that state's handler (after its first link change, or half way through
the download). A second process then resumes, as the agent does at startup.
The device must end serving a complete, verified version whose files match
its manifest, the machine at rest (COMMITTED or FAILED) with a report saying
why, nothing half-installed left behind, and the last report before the cut
sent again with the same sequence (at-least-once, deduplicated by sequence).
Shadow cases (a directive with `shadow: true`) must end serving the old
version with the new one recorded as the challenger and handed to the
restarted process's `on_shadow` exactly once.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from edgefleet.agent.config import write_config
from edgefleet.agent.install import State, load_state
from edgefleet.agent.layout import StateLayout
from edgefleet.agent.versions import Versions, version_id
from edgefleet.fileio import file_sha256
from edgefleet.mqtt import StatusReport
from edgefleet.trust import TrustRoot
from tests.agent.power_loss_driver import (
    Bundles,
    Device,
    device_config,
    make_directive,
    prepare_bundles,
)
from tests.conftest import KeySet

REPOSITORY = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def bundles(tmp_path_factory: pytest.TempPathFactory, keyset: KeySet) -> Bundles:
    return prepare_bundles(
        tmp_path_factory.getbasetemp() / f"install-bundles-{keyset.release.keyid[:8]}",
        keyset.release,
    )


@dataclass(frozen=True)
class PowerLoss:
    cut_at: str
    mid: bool = False  # inside the handler rather than right after the state is persisted
    health: str = "good"  # what the new version's live traffic looks like
    bundle: str = "next"  # demo 1.2.0, or "smoke_broken" (demo 2.0.0)
    final: str = "committed"
    serving: str = "new"  # or "old"
    shadow: bool = False  # a shadow directive: the new version runs beside, never served

    @property
    def id(self) -> str:
        where = "inside" if self.mid else "after persisting"
        kind = "shadow of the " if self.shadow else ""
        return f"{where} {self.cut_at}, {kind}{self.bundle} bundle, {self.health} health"

    @property
    def in_shadow(self) -> bool:
        return self.shadow and self.final == "committed"


CASES = [
    PowerLoss("downloading"),
    PowerLoss("downloading", mid=True),  # half a .part on disk: the download resumes
    PowerLoss("verifying"),
    PowerLoss("checking"),
    PowerLoss("staging"),
    PowerLoss("smoke_testing"),
    PowerLoss("activating"),
    PowerLoss("activating", mid=True),  # previous <- current done, current <- new not yet
    PowerLoss("health_checking"),
    PowerLoss("committed"),
    PowerLoss("health_checking", health="bad", final="failed", serving="old"),
    PowerLoss("rolling_back", health="bad", final="failed", serving="old"),
    PowerLoss("rolling_back", mid=True, health="bad", final="failed", serving="old"),
    PowerLoss("failed", health="bad", final="failed", serving="old"),
    PowerLoss("smoke_testing", bundle="smoke_broken", final="failed", serving="old"),
    PowerLoss("failed", bundle="smoke_broken", final="failed", serving="old"),
    PowerLoss("smoke_testing", shadow=True, serving="old"),
    PowerLoss("shadowing", shadow=True, serving="old"),
    PowerLoss("shadowing", mid=True, shadow=True, serving="old"),  # the predictor has it
    PowerLoss("committed", shadow=True, serving="old"),
    PowerLoss("smoke_testing", bundle="smoke_broken", shadow=True, final="failed", serving="old"),
]


def drive(tmp: Path, reports: Path, *args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "tests.agent.power_loss_driver"]
    command += ["--config", str(tmp / "agent.toml"), "--server", str(tmp / "server")]
    command += ["--reports", str(reports), *args]
    return subprocess.run(
        command, cwd=REPOSITORY, capture_output=True, text=True, timeout=120, check=False
    )


def read_reports(path: Path) -> list[StatusReport]:
    lines = path.read_text().splitlines() if path.exists() else []
    return [StatusReport.model_validate_json(line) for line in lines]


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_sigkill_leaves_the_device_serving_the_old_or_the_new_version(
    tmp_path: Path, trust: TrustRoot, keyset: KeySet, bundles: Bundles, case: PowerLoss
) -> None:
    config = device_config(tmp_path / "device", trust.raw)
    write_config(tmp_path / "agent.toml", config)
    device = Device.boot(config, server=tmp_path / "server")
    device.installer.install_file(bundles.releases[0])
    device.installer.install_file(bundles.releases[1])
    old, older = device.versions.current_id(), device.versions.previous_id()
    bundle = bundles.smoke_broken if case.bundle == "smoke_broken" else bundles.releases[2]
    ref = device.publish(bundle)
    new = version_id(ref.name, ref.version, file_sha256(bundle)[1])
    directive = tmp_path / "directive.json"
    directive.write_bytes(make_directive(keyset.server, ref, sequence=1, shadow=case.shadow))

    health = ["--health", case.health]
    cut = ["--cut-at", case.cut_at, *(["--mid"] if case.mid else [])]
    first = drive(tmp_path, tmp_path / "before.jsonl", *cut, *health, "directive", str(directive))
    assert first.returncode == -signal.SIGKILL, first.stderr
    second = drive(tmp_path, tmp_path / "after.jsonl", *health, "resume")
    assert second.returncode == 0, second.stderr

    # Serving: a complete version, verified, its files those of its manifest.
    versions = Versions(StateLayout(config.state_dir), keep=config.limits.keep_versions)
    serving = versions.current()
    expected = (new, old) if case.serving == "new" else (old, older)
    assert (versions.current_id(), versions.previous_id()) == expected
    assert serving is not None and versions.is_intact(serving)
    trust.verify_signed_by(serving.envelope, "release")

    # At rest, and said so.
    state = load_state(config.state_dir / "state.json")
    assert state.state is State(case.final)
    before, after = read_reports(tmp_path / "before.jsonl"), read_reports(tmp_path / "after.jsonl")
    assert before[-1].install_state == case.cut_at
    assert (after[0].sequence, after[0].install_state) == (before[-1].sequence, case.cut_at)
    assert after[-1].install_state == case.final
    assert after[-1].sequence == state.report_sequence
    if case.final == "failed":
        assert after[-1].reason, "a failure must say why"
        code = "smoke-test" if case.bundle == "smoke_broken" else "health-check"
        assert after[-1].reason.startswith(f"{code}: ")

    # Nothing half-installed is left behind.
    leftovers = [p.name for p in config.state_dir.joinpath("versions").iterdir()]
    assert sorted(leftovers) == sorted(versions.ids())
    assert (new in versions.ids()) == (case.serving == "new" or case.in_shadow)
    assert state.challenger == (new if case.in_shadow else None)
    handed = second.stdout.splitlines()[-1].split()
    assert handed == ["shadowed:", *([new] if case.in_shadow else [])]  # once, after restart
    assert list(config.state_dir.joinpath("downloads").iterdir()) == []
    assert state.last_directive_sequence == 1
