"""Shadow installs: a challenger staged and smoke-tested like an install, run beside `current`.

As in test_install.py, each case lists the chain of states the device reports;
each also checks what `on_shadow` was handed (`Device.shadowed`), the
challenger state.json records, and that `current` and `previous` did not move
unless a promotion or a rollback moves them.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgefleet.agent.errors import (
    CompatibilityError,
    HealthCheckError,
    InferenceError,
    RollbackError,
    SmokeTestError,
)
from edgefleet.agent.install import State, load_state
from edgefleet.agent.versions import InstalledVersion
from edgefleet.agentconfig import AgentConfig, Limits
from edgefleet.trust import TrustRoot
from tests.agent.power_loss_driver import (
    FAILING,
    HEALTHY,
    Bundles,
    Cut,
    Device,
    PowerCut,
    ScriptedProbe,
    device_config,
    make_directive,
    prepare_bundles,
)
from tests.agent.releases import release
from tests.conftest import KeySet

TO_SMOKE = ["downloading", "verifying", "checking", "staging", "smoke_testing"]
SHADOW_CHAIN = [*TO_SMOKE, "shadowing", "committed"]
INSTALL_CHAIN = [*TO_SMOKE, "activating", "health_checking", "committed"]
ROLLED_BACK = [*TO_SMOKE, "activating", "health_checking", "rolling_back", "failed"]


@pytest.fixture(scope="session")
def bundles(tmp_path_factory: pytest.TempPathFactory, keyset: KeySet) -> Bundles:
    return prepare_bundles(
        tmp_path_factory.getbasetemp() / f"install-bundles-{keyset.release.keyid[:8]}",
        keyset.release,
    )


@pytest.fixture(scope="session")
def challenger_bundle(
    tmp_path_factory: pytest.TempPathFactory, bundles: Bundles, keyset: KeySet
) -> Path:
    """demo 1.2.0 stating the security floor 1.1.0: raised by a promotion, not by a shadow run."""
    directory = tmp_path_factory.mktemp("challenger")
    return release(bundles, directory, keyset.release, "demo", "1.2.0", security_floor="1.1.0")


@pytest.fixture
def config(tmp_path: Path, trust: TrustRoot) -> AgentConfig:
    return device_config(tmp_path / "device", trust.raw)


def boot_serving(config: AgentConfig, server: Path, bundles: Bundles, count: int) -> Device:
    """A device that installed the first `count` releases; its reports and callbacks cleared."""
    device = Device.boot(config, server=server)
    for bundle in bundles.releases[:count]:
        device.installer.install_file(bundle)
    device.reporter.reports.clear()
    device.activated.clear()
    return device


@pytest.fixture
def serving_two(config: AgentConfig, tmp_path: Path, bundles: Bundles) -> Device:
    """Serving demo 1.1.0, with 1.0.0 as previous."""
    return boot_serving(config, tmp_path / "server", bundles, 2)


@pytest.fixture
def shadowing(
    serving_two: Device, bundles: Bundles, keyset: KeySet, challenger_bundle: Path
) -> Device:
    """Serving demo 1.1.0 (previous 1.0.0) with 1.2.0 in shadow (directive 1); cleared."""
    serving_two.installer.install_directive(directive(serving_two, keyset, challenger_bundle, 1))
    serving_two.reporter.reports.clear()
    serving_two.shadowed.clear()
    return serving_two


def directive(
    device: Device, keyset: KeySet, bundle: Path, sequence: int, shadow: bool = True
) -> bytes:
    """A signed directive to shadow (or install) `bundle`, published on the simulated server."""
    return make_directive(keyset.server, device.publish(bundle), sequence=sequence, shadow=shadow)


def ids(device: Device) -> tuple[str | None, str | None]:
    return device.versions.current_id(), device.versions.previous_id()


def challenger(device: Device) -> str | None:
    return load_state(device.config.state_dir / "state.json").challenger


def test_shadow_directive_stages_smoke_tests_and_runs_beside_current(
    serving_two: Device, bundles: Bundles, keyset: KeySet, challenger_bundle: Path
) -> None:
    device = serving_two
    before = ids(device)
    status = device.installer.install_directive(directive(device, keyset, challenger_bundle, 1))
    assert device.reporter.states == SHADOW_CHAIN
    assert all(
        r.directive_sequence == 1 and r.bundle_version == "1.2.0" for r in device.reporter.reports
    )
    new = status.challenger
    assert new is not None and new.startswith("demo@1.2.0-")
    assert (status.state, status.current, status.previous) == (State.COMMITTED, *before)
    assert device.shadowed == [new] and device.activated == []  # current never moved
    assert status.reason is not None and f"{new} runs in shadow beside {before[0]}" in status.reason
    assert "never returned" in (device.reporter.reports[-1].reason or "")
    assert status.security_floors == {}  # not served: its stated floor does not apply yet
    staged = device.installer.challenger()
    assert staged is not None and staged.id == new and device.versions.is_intact(staged)
    assert list(device.config.state_dir.joinpath("downloads").iterdir()) == []


def test_challenger_survives_a_restart(shadowing: Device) -> None:
    running = challenger(shadowing)
    restarted = shadowing.reboot()
    status = restarted.installer.resume()
    assert restarted.reporter.states == ["committed"]  # the last report, sent again
    assert restarted.shadowed == [running]  # the restarted predictor gets it again
    assert status.challenger == running and ids(restarted) == ids(shadowing)
    handed = restarted.installer.challenger()
    assert handed is not None and handed.id == running


def test_prune_never_deletes_the_challenger(
    tmp_path: Path, trust: TrustRoot, bundles: Bundles, keyset: KeySet, challenger_bundle: Path
) -> None:
    config = device_config(tmp_path / "d", trust.raw, limits=Limits(keep_versions=2))
    device = boot_serving(config, tmp_path / "server", bundles, 2)
    device.installer.install_directive(directive(device, keyset, challenger_bundle, 1))
    running = challenger(device)
    device.installer.install_file(bundles.releases[3])  # another bundle: it keeps running
    assert challenger(device) == running and device.shadowed == [running]
    # Pruning to keep 2 removed 1.0.0 but spared the challenger beside current and previous.
    assert set(device.versions.ids()) == {*ids(device), running}
    assert running is not None and device.versions.path_of(running).is_dir()


def test_promotion_by_a_normal_install_of_the_same_bundle_clears_the_challenger(
    shadowing: Device, bundles: Bundles, keyset: KeySet, challenger_bundle: Path
) -> None:
    device, running = shadowing, challenger(shadowing)
    old = ids(device)[0]
    status = device.installer.install_directive(
        directive(device, keyset, challenger_bundle, 2, shadow=False)
    )
    assert device.reporter.states == INSTALL_CHAIN
    assert device.shadowed == [None] and device.activated == [running]
    assert (status.current, status.previous, status.challenger) == (running, old, None)
    assert status.security_floors == {"demo": 1_000_001_000_000}  # served now: it applies


def test_failed_promotion_puts_the_challenger_back(
    shadowing: Device, bundles: Bundles, keyset: KeySet, challenger_bundle: Path
) -> None:
    running, before = challenger(shadowing), ids(shadowing)
    device = shadowing.reboot(probe=ScriptedProbe(HEALTHY, FAILING))
    promote = directive(device, keyset, challenger_bundle, 2, shadow=False)
    with pytest.raises(HealthCheckError, match="error rate"):
        device.installer.install_directive(promote)
    assert device.reporter.states == ROLLED_BACK
    assert ids(device) == before and challenger(device) == running
    assert device.shadowed == [None, running]  # stopped when promoted, back after the rollback
    assert device.installer.status().security_floors == {}  # it never committed
    assert running is not None and device.versions.path_of(running).is_dir()  # not removed


def test_new_shadow_directive_replaces_the_challenger(
    shadowing: Device, bundles: Bundles, keyset: KeySet
) -> None:
    before = ids(shadowing)
    status = shadowing.installer.install_directive(
        directive(shadowing, keyset, bundles.releases[3], 2)
    )
    assert shadowing.reporter.states == SHADOW_CHAIN
    assert status.challenger is not None and status.challenger.startswith("demo@1.3.0-")
    assert shadowing.shadowed == [status.challenger] and ids(shadowing) == before


def test_shadow_bundle_failing_its_smoke_test_is_refused_and_nothing_changes(
    shadowing: Device, bundles: Bundles, keyset: KeySet
) -> None:
    running, before, on_disk = challenger(shadowing), ids(shadowing), shadowing.versions.ids()
    state_before = load_state(shadowing.config.state_dir / "state.json")
    broken = directive(shadowing, keyset, bundles.smoke_broken, 2)
    with pytest.raises(SmokeTestError):
        shadowing.installer.install_directive(broken)
    assert shadowing.reporter.states == [*TO_SMOKE, "failed"]
    assert (shadowing.reporter.reports[-1].reason or "").startswith("smoke-test: ")
    after = load_state(shadowing.config.state_dir / "state.json")
    assert (after.challenger, after.security_floors) == (running, state_before.security_floors)
    assert shadowing.shadowed == [] and ids(shadowing) == before
    assert shadowing.versions.ids() == on_disk


def test_challenger_the_predictor_cannot_load_is_rolled_back_to_the_previous_one(
    shadowing: Device, bundles: Bundles, keyset: KeySet
) -> None:
    running, before = challenger(shadowing), ids(shadowing)
    handed: list[str | None] = []

    def set_challenger(version: InstalledVersion | None) -> None:
        handed.append(version.id if version else None)
        if version is not None and version.version == "1.3.0":
            raise InferenceError("onnxruntime: out of memory")

    shadowing.installer.on_shadow = set_challenger
    with pytest.raises(InferenceError):
        shadowing.installer.install_directive(directive(shadowing, keyset, bundles.releases[3], 2))
    assert shadowing.reporter.states == [*TO_SMOKE, "shadowing", "rolling_back", "failed"]
    assert "inference: onnxruntime: out of memory" in (shadowing.installer.status().reason or "")
    assert handed[-1] == running and challenger(shadowing) == running
    assert ids(shadowing) == before
    assert not any(id_.startswith("demo@1.3.0-") for id_ in shadowing.versions.ids())


def test_rollback_directive_rolls_back_and_stops_the_challenger(
    shadowing: Device, keyset: KeySet
) -> None:
    current, previous = ids(shadowing)
    running = challenger(shadowing)
    rollback = make_directive(keyset.server, None, sequence=2, action="rollback")
    status = shadowing.installer.install_directive(rollback)
    assert shadowing.reporter.states == ["rolling_back", "committed"]
    assert (status.current, status.previous, status.challenger) == (previous, None, None)
    assert shadowing.shadowed == [None] and shadowing.activated == [previous]
    assert status.reason == (
        f"rolled back from {current} to {previous} on request; the challenger {running} stopped"
    )


def test_rollback_directive_naming_the_shadowed_bundle_only_stops_the_challenger(
    shadowing: Device, bundles: Bundles, keyset: KeySet, challenger_bundle: Path
) -> None:
    before = ids(shadowing)
    running = challenger(shadowing)
    assert running is not None and running.startswith("demo@1.2.0-")
    ref = shadowing.publish(challenger_bundle)  # the challenger's bundle
    rollback = make_directive(keyset.server, ref, sequence=2, action="rollback")
    status = shadowing.installer.install_directive(rollback)
    assert ids(shadowing) == before and status.challenger is None
    assert shadowing.shadowed == [None] and shadowing.activated == []


def test_rollback_without_a_previous_version_only_stops_the_challenger(
    config: AgentConfig, tmp_path: Path, bundles: Bundles, keyset: KeySet
) -> None:
    device = boot_serving(config, tmp_path / "server", bundles, 1)
    device.installer.install_directive(directive(device, keyset, bundles.releases[1], 1))
    before = ids(device)
    assert before[1] is None and challenger(device) is not None
    status = device.installer.rollback()
    assert device.reporter.states[-2:] == ["rolling_back", "committed"]
    assert ids(device) == before and status.challenger is None
    assert device.shadowed[-1] is None and device.activated == []
    with pytest.raises(RollbackError):  # nothing left to undo
        device.installer.rollback()


def test_shadow_directive_on_a_device_serving_nothing_is_refused(
    config: AgentConfig, tmp_path: Path, bundles: Bundles, keyset: KeySet
) -> None:
    device = Device.boot(config, server=tmp_path / "server")
    with pytest.raises(CompatibilityError, match="compare it with"):
        device.installer.install_directive(directive(device, keyset, bundles.releases[0], 1))
    status = device.installer.status()
    assert device.reporter.states == ["refused"] and device.shadowed == []
    assert (status.state, status.refused) == (State.IDLE, "compatibility")
    assert (status.current, status.challenger, status.last_directive_sequence) == (None, None, 1)
    assert device.versions.ids() == []


def test_bundle_being_served_is_not_run_in_shadow(
    serving_two: Device, bundles: Bundles, keyset: KeySet
) -> None:
    status = serving_two.installer.install_directive(
        directive(serving_two, keyset, bundles.releases[1], 1)
    )
    assert serving_two.reporter.states == [*TO_SMOKE[:4], "committed"]
    assert status.challenger is None and serving_two.shadowed == []
    assert status.reason is not None and "not run in shadow beside itself" in status.reason


@pytest.mark.parametrize("mid", [False, True], ids=["after persisting", "after handing over"])
def test_power_cut_in_shadowing_resumes_and_hands_the_challenger_over_once(
    serving_two: Device, bundles: Bundles, keyset: KeySet, mid: bool, challenger_bundle: Path
) -> None:
    before = ids(serving_two)
    cut = serving_two.reboot(cut=Cut(at="shadowing", mid=mid))
    with pytest.raises(PowerCut):
        cut.installer.install_directive(directive(cut, keyset, challenger_bundle, 1))
    assert cut.shadowed == ([challenger(cut)] if mid else [])
    restarted = serving_two.reboot()
    status = restarted.installer.resume()
    assert restarted.reporter.states == ["shadowing", "shadowing", "committed"]
    assert status.challenger is not None and status.challenger.startswith("demo@1.2.0-")
    assert restarted.shadowed == [status.challenger]  # SHADOWING again; not handed twice
    assert ids(restarted) == before and status.state is State.COMMITTED


def test_state_file_written_before_shadow_installs_is_read(serving_two: Device) -> None:
    path = serving_two.config.state_dir / "state.json"
    raw = json.loads(path.read_text())
    del raw["challenger"], raw["security_floors"], raw["trust_root"]
    del raw["fleet_timestamp_sequence"]
    for added in ("shadow", "from_challenger", "security_floor", "refused"):
        del raw["install"][added]
    path.write_text(json.dumps({**raw, "format": 1, "security_floor": 1_000_001_000_000}))
    status = serving_two.reboot().installer.resume()
    assert status.state is State.COMMITTED and status.challenger is None
    # The served name's, lowered to its previous version (1.0.0) so it can still roll back.
    assert status.security_floors == {"demo": 1_000_000_000_000}
    assert load_state(path).format == 4  # read as format 4 without a challenger
