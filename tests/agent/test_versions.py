"""versions/ and the current/previous links: staging, switching, rolling back, pruning."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from edgefleet import errors
from edgefleet.agent.errors import InstallError, RollbackError
from edgefleet.agent.layout import StateLayout
from edgefleet.agent.versions import InstalledVersion, Versions, version_of
from edgefleet.bundle import BundlePolicy
from edgefleet.trust import TrustRoot
from tests.agent.power_loss_driver import PROFILE, Bundles, prepare_bundles
from tests.conftest import KeySet


@pytest.fixture(scope="session")
def bundles(tmp_path_factory: pytest.TempPathFactory, keyset: KeySet) -> Bundles:
    return prepare_bundles(
        tmp_path_factory.getbasetemp() / f"install-bundles-{keyset.release.keyid[:8]}",
        keyset.release,
    )


@dataclass(frozen=True)
class RecordingLayout(StateLayout):
    """The real layout, remembering every link change and what each link named after it."""

    changes: list[tuple[str, str | None, str | None]] = field(default_factory=list)

    def point(self, link: Path, target: Path | None) -> None:
        super().point(link, target)
        names = [self.resolve_link(self.current), self.resolve_link(self.previous)]
        current, previous = (p.name if p else None for p in names)
        self.changes.append((link.name, current, previous))


@pytest.fixture
def layout(tmp_path: Path) -> RecordingLayout:
    made = RecordingLayout(tmp_path / "state")
    made.create()
    return made


@pytest.fixture
def versions(layout: RecordingLayout) -> Versions:
    return Versions(layout, keep=3)


def stage_all(versions: Versions, bundles: Bundles, trust: TrustRoot) -> list[InstalledVersion]:
    return [versions.stage(path, trust) for path in bundles.releases]


def test_stage_extracts_a_complete_version_with_its_manifest(
    versions: Versions, bundles: Bundles, trust: TrustRoot
) -> None:
    staged = versions.stage(bundles.releases[0], trust, BundlePolicy(profile=PROFILE))
    assert staged.id.startswith("demo@1.0.0-") and version_of(staged.id) == "1.0.0"
    assert (staged.directory / "manifest.json").is_file()
    assert staged.served_model == staged.directory / "model.onnx"
    assert versions.is_intact(staged)
    trust.verify_signed_by(staged.envelope, "release")
    assert [p.name for p in versions.layout.versions.iterdir()] == [staged.id]


def test_stage_twice_is_idempotent(versions: Versions, bundles: Bundles, trust: TrustRoot) -> None:
    first = versions.stage(bundles.releases[0], trust)
    (first.directory / "marker").write_text("not extracted again")
    again = versions.stage(bundles.releases[0], trust)
    assert again.id == first.id and (again.directory / "marker").exists()


def test_stage_after_a_cut_mid_staging_cleans_the_leftover(
    versions: Versions, bundles: Bundles, trust: TrustRoot
) -> None:
    staged = versions.stage(bundles.releases[0], trust)
    versions.remove(staged.id)
    leftover = versions.layout.versions / f".stage-{staged.id[-12:]}"
    leftover.mkdir()
    (leftover / "half-a-model").write_bytes(b"\0" * 100)
    assert versions.stage(bundles.releases[0], trust).id == staged.id
    assert not leftover.exists()


def test_stage_refuses_a_bundle_below_the_floor_and_leaves_nothing(
    versions: Versions, bundles: Bundles, trust: TrustRoot
) -> None:
    with pytest.raises(errors.BelowSecurityFloorError):
        versions.stage(bundles.releases[0], trust, BundlePolicy(security_floors={"demo": 10**15}))
    assert list(versions.layout.versions.iterdir()) == []


def test_activate_writes_previous_before_current(
    versions: Versions, layout: RecordingLayout, bundles: Bundles, trust: TrustRoot
) -> None:
    one, two, *_ = stage_all(versions, bundles, trust)
    versions.activate(one)
    versions.activate(two)
    # Every instant: current names a complete version, and the old one stays linked.
    assert layout.changes == [
        ("current", one.id, None),
        ("previous", one.id, one.id),
        ("current", two.id, one.id),
    ]


def test_activate_again_changes_nothing(
    versions: Versions, layout: RecordingLayout, bundles: Bundles, trust: TrustRoot
) -> None:
    one, two, *_ = stage_all(versions, bundles, trust)
    versions.activate(one)
    versions.activate(two)
    versions.activate(two)  # a resumed ACTIVATING must not make previous == current
    assert (versions.current_id(), versions.previous_id()) == (two.id, one.id)
    assert len(layout.changes) == 3


def test_rollback_serves_previous_and_clears_it(
    versions: Versions, bundles: Bundles, trust: TrustRoot
) -> None:
    one, two, *_ = stage_all(versions, bundles, trust)
    versions.activate(one)
    versions.activate(two)
    assert versions.rollback().id == one.id
    assert (versions.current_id(), versions.previous_id()) == (one.id, None)
    with pytest.raises(RollbackError):
        versions.rollback()


def test_rollback_with_nothing_installed_raises(versions: Versions) -> None:
    with pytest.raises(RollbackError):
        versions.rollback()
    assert versions.current() is None


def test_restore_is_absolute_and_idempotent(
    versions: Versions, layout: RecordingLayout, bundles: Bundles, trust: TrustRoot
) -> None:
    one, two, three, _ = stage_all(versions, bundles, trust)
    versions.activate(one)
    versions.activate(two)
    versions.activate(three)
    versions.restore(two, one)
    versions.restore(two, one)
    assert (versions.current_id(), versions.previous_id()) == (two.id, one.id)
    assert layout.changes[-2:] == [("current", two.id, two.id), ("previous", two.id, one.id)]


def test_prune_keeps_the_most_recent_and_never_the_linked_or_protected(
    versions: Versions, bundles: Bundles, trust: TrustRoot
) -> None:
    oldest, two, three, newest = stage_all(versions, bundles, trust)
    for age, version in enumerate([newest, three, two, oldest]):
        os.utime(version.directory, (1e9 - age, 1e9 - age))  # newest first
    versions.activate(oldest)  # activating makes it the most recent
    removed = versions.prune(protect={two.id})
    assert set(removed) == {three.id}
    assert set(versions.ids()) == {oldest.id, newest.id, two.id}


def test_prune_removes_leftovers_of_cut_operations(versions: Versions) -> None:
    for name in (".stage-abc", ".trash-demo@1.0.0-abc", "..stage-abc.x1y2"):
        (versions.layout.versions / name).mkdir()
    versions.prune()
    assert list(versions.layout.versions.iterdir()) == []


def test_remove_refuses_a_linked_version(
    versions: Versions, bundles: Bundles, trust: TrustRoot
) -> None:
    one = versions.stage(bundles.releases[0], trust)
    versions.activate(one)
    with pytest.raises(InstallError):
        versions.remove(one.id)


def test_damaged_version_is_not_intact_and_a_missing_one_does_not_load(
    versions: Versions, bundles: Bundles, trust: TrustRoot
) -> None:
    one = versions.stage(bundles.releases[0], trust)
    (one.directory / "model.onnx").write_bytes(b"changed")
    assert not versions.is_intact(one)
    with pytest.raises(InstallError, match="not installed"):
        versions.load("demo@9.9.9-000000000000")
