"""The install state machine end to end, on real bundles and real onnxruntime/LiteRT sessions.

Table-driven as in the Mender client: each case lists the chain of states the
device reports and where it ends up serving.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from edgefleet import errors
from edgefleet.agent.errors import (
    DownloadError,
    HealthCheckError,
    InstallError,
    InstallInProgressError,
    RollbackError,
    SmokeTestError,
)
from edgefleet.agent.install import HealthSnapshot, State, StateFile, load_state
from edgefleet.agent.install.fetch import MAX_DOWNLOAD_ATTEMPTS, LocalFileFetcher
from edgefleet.agent.install.record import MAX_RESUMES, MAX_STORE_COUNT, save_state
from edgefleet.agent.versions import InstalledVersion, version_of
from edgefleet.agentconfig import AgentConfig, Limits
from edgefleet.bundle import build_bundle
from edgefleet.fileio import file_sha256
from edgefleet.mqtt import BundleRef
from edgefleet.trust import TrustRoot
from edgefleet.wire import error_code
from tests.agent.power_loss_driver import (
    FAILING,
    HEALTHY,
    SILENT,
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
INSTALL_CHAIN = [*TO_SMOKE, "activating", "health_checking", "committed"]
ROLLED_BACK = [*TO_SMOKE, "activating", "health_checking", "rolling_back", "failed"]


@pytest.fixture(scope="session")
def bundles(tmp_path_factory: pytest.TempPathFactory, keyset: KeySet) -> Bundles:
    return prepare_bundles(
        tmp_path_factory.getbasetemp() / f"install-bundles-{keyset.release.keyid[:8]}",
        keyset.release,
    )


@pytest.fixture
def config(tmp_path: Path, trust: TrustRoot) -> AgentConfig:
    return device_config(tmp_path / "device", trust.raw)


@pytest.fixture
def device(config: AgentConfig, tmp_path: Path) -> Device:
    return Device.boot(config, server=tmp_path / "server")


@pytest.fixture
def serving_two(device: Device, bundles: Bundles) -> Device:
    """A device serving demo 1.1.0 with 1.0.0 as previous; its reports cleared."""
    device.installer.install_file(bundles.releases[0])
    device.installer.install_file(bundles.releases[1])
    device.reporter.reports.clear()
    device.activated.clear()
    return device


def ids(device: Device) -> tuple[str | None, str | None]:
    return device.versions.current_id(), device.versions.previous_id()


def test_directive_install_reports_every_state_and_serves_the_new_version(
    serving_two: Device, bundles: Bundles, keyset: KeySet
) -> None:
    device = serving_two
    old = ids(device)
    directive = make_directive(keyset.server, device.publish(bundles.releases[2]), sequence=1)
    status = device.installer.install_directive(directive)
    assert device.reporter.states == INSTALL_CHAIN
    reports = device.reporter.reports
    assert [r.sequence for r in reports] == list(
        range(reports[0].sequence, 1 + reports[-1].sequence)
    )
    assert all(r.directive_sequence == 1 and r.previous_version == "1.1.0" for r in reports)
    assert all(r.bundle_version == "1.2.0" for r in reports)
    assert status.state is State.COMMITTED and status.previous == old[0]
    assert status.current is not None and status.current.startswith("demo@1.2.0-")
    assert device.activated == [status.current]
    assert status.reason is not None and "healthy over 50 requests" in status.reason
    assert status.last_directive_sequence == 1
    assert status.security_floors == {}  # 1.2.0 states no floor: an install raises none
    assert list(device.config.state_dir.joinpath("downloads").iterdir()) == []
    current = device.versions.current()
    assert current is not None and device.versions.is_intact(current)


def test_file_install_takes_the_same_path_without_a_directive(
    device: Device, bundles: Bundles
) -> None:
    status = device.installer.install_file(bundles.releases[0])
    assert device.reporter.states == INSTALL_CHAIN
    assert status.current is not None and status.current.startswith("demo@1.0.0-")
    assert status.previous is None and status.last_directive_sequence == 0


def _bytes_read_by_this_process() -> int:
    """What the kernel counts as read by this process (all its threads): `rchar`."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("/proc/self/io has no rchar")


@pytest.mark.parametrize("delivery", ["file", "directive"])
def test_an_install_reads_the_bundle_once_after_copying_it_in(
    device: Device, bundles: Bundles, keyset: KeySet, tmp_path: Path, delivery: str
) -> None:
    # The copy under downloads/ hashes the file (as a transport does), the manifest
    # alone decides, and extraction checks every file: two reads, where hashing the
    # file again and verifying it whole before extracting made four.
    source = tmp_path / "big"
    shutil.copytree(bundles.model_dir, source)
    (source / "weights.bin").write_bytes(os.urandom(16 * 1024 * 1024))
    bundle = tmp_path / "big.efb"
    build_bundle(source, bundle, name="demo", version="1.5.0", keys=[keyset.release])
    size = bundle.stat().st_size
    directive = None
    if delivery == "directive":  # delivered offline with its bundle: a fetcher that checks it
        ref = BundleRef(name="demo", version="1.5.0", sha256=file_sha256(bundle)[1], length=size)
        directive = make_directive(keyset.server, ref, sequence=1)
        device.installer.fetcher = LocalFileFetcher(bundle)
    before = _bytes_read_by_this_process()
    if directive is None:
        status = device.installer.install_file(bundle)
    else:
        status = device.installer.install_directive(directive)
    reads = (_bytes_read_by_this_process() - before) / size
    assert status.current is not None and status.current.startswith("demo@1.5.0-")
    assert 2 <= reads < 2.5, f"the bundle was read {reads:.2f} times"


def test_installing_the_version_being_served_commits_without_switching(
    serving_two: Device, bundles: Bundles
) -> None:
    before = ids(serving_two)
    status = serving_two.installer.install_file(bundles.releases[1])
    assert serving_two.reporter.states == [*TO_SMOKE[:4], "committed"]
    assert ids(serving_two) == before and serving_two.activated == []
    assert status.reason is not None and "already the version being served" in status.reason


def test_tflite_bundle_passes_its_smoke_test_with_litert(
    tmp_path: Path, trust: TrustRoot, bundles: Bundles
) -> None:
    config = device_config(tmp_path / "pi", trust.raw, profile="armv7-tflite")
    device = Device.boot(config, server=tmp_path / "server")
    status = device.installer.install_file(bundles.tflite)
    assert status.state is State.COMMITTED
    current = device.versions.current()
    assert current is not None and current.served_model == current.directory / "model.tflite"


@dataclass(frozen=True)
class Failure:
    """An install that must fail: what goes wrong, the chain reported, the error raised."""

    bundle: str  # "next" (demo 1.2.0) or "smoke_broken"
    probe: tuple[HealthSnapshot, ...]
    chain: list[str]
    error: type[Exception]
    reason: str
    failures: int = 0


SLOW = HealthSnapshot(requests=50, errors=0, fallbacks=0, latency_p95_ms=9.0)
FALLING_BACK = HealthSnapshot(requests=50, errors=0, fallbacks=10, latency_p95_ms=2.0)
FAILURES = {
    "smoke outputs off": Failure(
        "smoke_broken", (HEALTHY,), [*TO_SMOKE, "failed"], SmokeTestError, "differs by 0.5"
    ),
    "errors under traffic": Failure(
        "next", (HEALTHY, FAILING), ROLLED_BACK, HealthCheckError, "error rate 40.0%"
    ),
    "fallbacks under traffic": Failure(
        "next", (HEALTHY, FALLING_BACK), ROLLED_BACK, HealthCheckError, "fallback rate 20.0%"
    ),
    "slower than the previous version": Failure(
        "next", (HEALTHY, SLOW), ROLLED_BACK, HealthCheckError, "p95 latency 9.00 ms"
    ),
    "server never answers": Failure(
        "next",
        (HEALTHY,),
        [*["downloading"] * MAX_DOWNLOAD_ATTEMPTS, "failed"],
        DownloadError,
        "simulated outage",
        failures=100,
    ),
}


@pytest.mark.parametrize("case", FAILURES.values(), ids=FAILURES.keys())
def test_failed_install_rolls_back_to_the_old_version_and_reports_why(
    serving_two: Device, bundles: Bundles, keyset: KeySet, case: Failure
) -> None:
    device = serving_two.reboot(probe=ScriptedProbe(*case.probe))
    device.server.failures = case.failures
    before = ids(device)
    bundle = bundles.smoke_broken if case.bundle == "smoke_broken" else bundles.releases[2]
    directive = make_directive(keyset.server, device.publish(bundle), sequence=1)
    with pytest.raises(case.error) as raised:
        device.installer.install_directive(directive)
    assert device.reporter.states == case.chain
    assert case.reason in (device.reporter.reports[-1].reason or "")
    assert isinstance(raised.value, errors.EdgefleetError)
    code = error_code(raised.value)  # the code the CLI prints, never the class name
    assert (device.reporter.reports[-1].reason or "").startswith(f"{code}: ")
    assert ids(device) == before  # current and previous both as they were
    assert device.installer.status().state is State.FAILED
    assert len(device.versions.ids()) == 2  # the failed version is not kept
    downloads = device.config.state_dir.joinpath("downloads").iterdir()
    assert [p for p in downloads if not p.name.endswith((".part", ".blocks"))] == []


def test_failed_first_install_leaves_nothing_installed_rather_than_a_bad_model(
    device: Device, bundles: Bundles
) -> None:
    device = device.reboot(probe=ScriptedProbe(HEALTHY, FAILING))
    with pytest.raises(HealthCheckError):
        device.installer.install_file(bundles.releases[0])
    assert ids(device) == (None, None) and device.versions.ids() == []
    assert device.activated[-1] is None  # the predictor is told to unload


def test_predictor_that_cannot_load_the_new_version_gets_the_old_one_back(
    serving_two: Device, bundles: Bundles
) -> None:
    before = ids(serving_two)
    loaded: list[str | None] = []

    def reload(version: InstalledVersion | None) -> None:
        loaded.append(version.id if version else None)
        if version is not None and version.version == "1.2.0":
            raise RuntimeError("onnxruntime: out of memory")

    installer = serving_two.installer
    installer.on_activated = reload
    with pytest.raises(RuntimeError):
        installer.install_file(bundles.releases[2])
    assert serving_two.reporter.states == [*TO_SMOKE, "activating", "rolling_back", "failed"]
    assert installer.status().reason == "internal: onnxruntime: out of memory"
    assert ids(serving_two) == before and loaded[-1] == before[0]


def test_download_retries_with_growing_jittered_backoff(
    serving_two: Device, bundles: Bundles, keyset: KeySet
) -> None:
    device = serving_two
    device.server.failures = 2
    directive = make_directive(keyset.server, device.publish(bundles.releases[2]), sequence=1)
    assert device.installer.install_directive(directive).state is State.COMMITTED
    assert device.reporter.states == ["downloading"] * 3 + INSTALL_CHAIN[1:]
    assert "attempt 1 of 5 failed" in (device.reporter.reports[1].reason or "")
    first, second = device.clock.sleeps[:2]
    assert 1.0 <= first <= 2.0 and 2.0 <= second <= 4.0


def test_no_traffic_during_the_health_check_commits_with_a_note(
    serving_two: Device, bundles: Bundles
) -> None:
    device = serving_two.reboot(probe=ScriptedProbe(HEALTHY, SILENT))
    status = device.installer.install_file(bundles.releases[2])
    assert status.state is State.COMMITTED
    assert status.reason is not None and "committed unchecked: no traffic in 30 s" in status.reason
    assert sum(device.clock.sleeps) == pytest.approx(30.0)


def test_install_refused_while_another_process_holds_the_lock(
    device: Device, bundles: Bundles
) -> None:
    fd = os.open(device.config.state_dir / "versions", os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with pytest.raises(InstallInProgressError):
            device.installer.install_file(bundles.releases[0])
    finally:
        os.close(fd)
    assert device.reporter.reports == [] and device.installer.status().state is State.IDLE


def test_install_refused_while_an_interrupted_one_awaits_resume(
    device: Device, bundles: Bundles
) -> None:
    cut = device.reboot(cut=Cut(at="staging"))
    with pytest.raises(PowerCut):
        cut.installer.install_file(bundles.releases[0])
    restarted = device.reboot()
    with pytest.raises(InstallInProgressError):
        restarted.installer.install_file(bundles.releases[1])
    assert restarted.installer.resume().state is State.COMMITTED
    record = restarted.installer.status().install
    assert record is not None and restarted.versions.current_id() == record.to_version


def test_rollback_on_request_serves_previous_and_clears_it(serving_two: Device) -> None:
    current, previous = ids(serving_two)
    status = serving_two.installer.rollback()
    assert serving_two.reporter.states == ["rolling_back", "committed"]
    assert (status.current, status.previous) == (previous, None)
    assert serving_two.activated == [previous]
    assert status.reason == f"rolled back from {current} to {previous} on request"
    with pytest.raises(RollbackError):
        serving_two.installer.rollback()
    assert serving_two.installer.status() == status


def test_rollback_directive_rolls_back_and_consumes_its_sequence(
    serving_two: Device, keyset: KeySet
) -> None:
    _, previous = ids(serving_two)
    directive = make_directive(keyset.server, None, sequence=4, action="rollback")
    status = serving_two.installer.install_directive(directive)
    assert status.current == previous and status.last_directive_sequence == 4
    assert [r.directive_sequence for r in serving_two.reporter.reports] == [4, 4]


def test_rollback_directive_naming_the_served_bundle_rolls_back(
    serving_two: Device, bundles: Bundles, keyset: KeySet
) -> None:
    _, previous = ids(serving_two)
    served = serving_two.publish(bundles.releases[1])  # demo 1.1.0, what it serves
    directive = make_directive(keyset.server, served, sequence=4, action="rollback")
    status = serving_two.installer.install_directive(directive)
    assert serving_two.reporter.states == ["rolling_back", "committed"]
    assert status.current == previous and status.last_directive_sequence == 4


def test_rollback_directive_naming_another_bundle_keeps_what_is_served(
    serving_two: Device, bundles: Bundles, keyset: KeySet
) -> None:
    # The server rolls back a rollout's bundle (1.2.0) on a device whose install of it
    # never happened: going back from 1.1.0 to 1.0.0 would be one step too far.
    before = ids(serving_two)
    never_installed = serving_two.publish(bundles.releases[2])
    directive = make_directive(keyset.server, never_installed, sequence=4, action="rollback")
    status = serving_two.installer.install_directive(directive)
    assert ids(serving_two) == before and status.last_directive_sequence == 4
    assert serving_two.reporter.states == ["rolling_back", "committed"]
    assert [r.directive_sequence for r in serving_two.reporter.reports] == [4, 4]
    assert status.reason == (f"rollback from demo@1.2.0 not needed: {before[0]} is served and kept")


# --- security floors: a release key's decision, per model name ----------------------------


def test_a_hotfix_between_the_rolled_back_and_the_undone_version_installs(
    serving_two: Device, bundles: Bundles, keyset: KeySet, tmp_path: Path
) -> None:
    # 1.1.0 -> 1.2.0, rolled back by the server (an aborted rollout), then hotfix 1.1.1.
    device = serving_two
    device.installer.install_directive(
        make_directive(keyset.server, device.publish(bundles.releases[2]), sequence=1)
    )
    undone = device.publish(bundles.releases[2])
    device.installer.install_directive(
        make_directive(keyset.server, undone, sequence=2, action="rollback")
    )
    assert version_of(device.versions.current_id() or "") == "1.1.0"
    hotfix = release(bundles, tmp_path / "r", keyset.release, "demo", "1.1.1")
    status = device.installer.install_directive(
        make_directive(keyset.server, device.publish(hotfix), sequence=3)
    )
    assert device.reporter.states[-1] == "committed" and status.security_floors == {}
    assert status.current is not None and status.current.startswith("demo@1.1.1-")


def test_floors_are_per_model_name(device: Device, bundles: Bundles, keyset: KeySet) -> None:
    directory = device.config.state_dir.parent / "releases"
    m2 = release(bundles, directory, keyset.release, "m2", "5.0.0", security_floor="5.0.0")
    device.installer.install_file(m2)
    assert device.installer.status().security_floors == {"m2": 5_000_000_000_000}
    m = release(bundles, directory, keyset.release, "m", "3.1.0")
    status = device.installer.install_file(m)
    assert status.current is not None and status.current.startswith("m@3.1.0-")
    with pytest.raises(errors.BelowSecurityFloorError, match="below the security floor"):
        device.installer.install_file(release(bundles, directory, keyset.release, "m2", "4.9.0"))
    assert device.reporter.states[-1] == "refused"


def test_a_stated_floor_rises_when_the_release_commits_not_when_its_health_check_fails(
    tmp_path: Path, trust: TrustRoot, bundles: Bundles, keyset: KeySet
) -> None:
    device = Device.boot(device_config(tmp_path / "d", trust.raw), server=tmp_path / "s")
    device.installer.install_file(bundles.releases[0])
    stating = release(bundles, tmp_path / "r", keyset.release, "demo", "1.2.0", "1.1.0")
    failing = device.reboot(probe=ScriptedProbe(FAILING))
    with pytest.raises(HealthCheckError):
        failing.installer.install_file(stating)
    assert failing.reporter.states == ROLLED_BACK
    assert failing.installer.status().security_floors == {}
    status = device.reboot().installer.install_file(stating)
    assert status.security_floors == {"demo": 1_000_001_000_000}
    with pytest.raises(errors.BelowSecurityFloorError):
        device.reboot().installer.install_file(bundles.releases[0])  # 1.0.0
    device.reboot().installer.install_file(bundles.releases[1])  # 1.1.0: at the floor


@pytest.fixture
def above_a_stated_floor(device: Device, bundles: Bundles, keyset: KeySet) -> Device:
    """Serving demo 1.2.0 stating the floor 1.1.0, with 1.0.0 (below it) as previous.

    The commit unlinks such a previous version; it is linked again here as a power cut
    between the commit and that cleanup would leave it.
    """
    device.installer.install_file(bundles.releases[0])
    old = device.versions.current()
    directory = device.config.state_dir.parent / "releases"
    device.installer.install_file(
        release(bundles, directory, keyset.release, "demo", "1.2.0", security_floor="1.1.0")
    )
    device.versions.restore(device.versions.current(), old)
    device.reporter.reports.clear()
    device.activated.clear()
    return device


def test_a_committed_floor_unlinks_a_previous_version_below_it(
    device: Device, bundles: Bundles, keyset: KeySet
) -> None:
    device.installer.install_file(bundles.releases[0])  # 1.0.0
    stating = release(bundles, device.config.state_dir.parent / "r", keyset.release, "demo",
                      "1.2.0", security_floor="1.1.0")  # fmt: skip
    device.activated.clear()
    device.installer.install_file(stating)
    current, previous = ids(device)
    assert (current or "").startswith("demo@1.2.0") and previous is None
    # The predictor is told again, so that its fallback chain drops the previous step.
    assert [version_of(v or "") for v in device.activated] == ["1.2.0", "1.2.0"]
    with pytest.raises(RollbackError):
        device.installer.rollback()


def test_a_local_rollback_below_the_floor_is_refused_and_changes_nothing(
    above_a_stated_floor: Device,
) -> None:
    device = above_a_stated_floor
    before = ids(device)
    with pytest.raises(errors.BelowSecurityFloorError, match=r"demo@1\.0\.0"):
        device.installer.rollback()
    status = device.installer.status()
    assert ids(device) == before and device.activated == []
    assert (status.state, status.refused) == (State.COMMITTED, "below-security-floor")
    assert device.reporter.states == ["refused"]
    assert (device.reporter.reports[-1].reason or "").startswith("below-security-floor: ")


def test_a_rollback_directive_below_the_floor_is_refused_and_reported(
    above_a_stated_floor: Device, keyset: KeySet
) -> None:
    # A stolen server key signs a rollback to the vulnerable release: the device refuses.
    device = above_a_stated_floor
    before = ids(device)
    directive = make_directive(keyset.server, None, sequence=7, action="rollback")
    with pytest.raises(errors.BelowSecurityFloorError):
        device.installer.install_directive(directive)
    status = device.installer.status()
    assert ids(device) == before and status.last_directive_sequence == 7
    assert [(r.install_state, r.directive_sequence) for r in device.reporter.reports] == [
        ("refused", 7)
    ]
    assert status.state is State.COMMITTED


def test_the_floor_of_an_older_state_file_applies_to_the_served_name(
    serving_two: Device, bundles: Bundles
) -> None:
    state_file = serving_two.config.state_dir / "state.json"
    old = json.loads(state_file.read_text())
    del old["security_floors"]
    state_file.write_text(json.dumps({**old, "format": 2, "security_floor": 1_000_001_000_000}))
    restarted = serving_two.reboot()
    # Lowered to the previous version (1.0.0), so the rollback the device could do before
    # its agent was upgraded still works; nothing older than that installs.
    assert restarted.installer.status().security_floors == {"demo": 1_000_000_000_000}
    assert restarted.installer.rollback().state is State.COMMITTED
    assert (ids(restarted)[0] or "").startswith("demo@1.0.0")
    assert json.loads(state_file.read_text())["security_floors"] == {"demo": 1_000_000_000_000}


@pytest.mark.parametrize(("keep", "kept"), [(2, [2, 3]), (3, [1, 2, 3]), (5, [0, 1, 2, 3])])
def test_keeps_the_last_n_versions(
    tmp_path: Path, trust: TrustRoot, bundles: Bundles, keep: int, kept: list[int]
) -> None:
    config = device_config(tmp_path / "d", trust.raw, limits=Limits(keep_versions=keep))
    device = Device.boot(config, server=tmp_path / "server")
    for bundle in bundles.releases:
        device.installer.install_file(bundle)
    on_disk = sorted(id_.split("-")[0] for id_ in device.versions.ids())
    assert on_disk == [f"demo@{Bundles.version(i)}" for i in kept]


def test_a_model_that_kills_the_agent_in_health_check_is_rolled_back_after_max_resumes(
    serving_two: Device, bundles: Bundles
) -> None:
    before = ids(serving_two)
    with pytest.raises(PowerCut):
        serving_two.reboot(cut=Cut(at="health_checking")).installer.install_file(
            bundles.releases[2]
        )
    for _ in range(MAX_RESUMES):  # each restart dies again once the new model serves
        with pytest.raises(PowerCut):
            serving_two.reboot(cut=Cut(at="health_checking", skip=1)).installer.resume()
    final = serving_two.reboot(cut=Cut(at="health_checking", skip=1))
    status = final.installer.resume()
    assert final.reporter.states == ["health_checking", "rolling_back", "failed"]
    assert status.reason == f"the agent restarted {MAX_RESUMES + 1} times during this install"
    assert ids(final) == before


def test_store_counter_over_its_cap_stops_the_install(serving_two: Device) -> None:
    path = serving_two.config.state_dir / "state.json"
    state = load_state(path)
    assert state.install is not None
    looping = StateFile(
        state=State.VERIFYING,
        store_count=MAX_STORE_COUNT + 1,
        report_sequence=state.report_sequence,
        install=state.install.model_copy(update={"kind": "install"}),
    )
    save_state(path, looping)
    status = serving_two.reboot().installer.resume()
    assert status.state is State.FAILED
    assert status.reason is not None and "stopped a loop" in status.reason


def test_state_file_of_a_newer_agent_is_refused_not_guessed(device: Device) -> None:
    (device.config.state_dir / "state.json").write_text('{"format": 5, "state": "warp"}')
    with pytest.raises(InstallError, match="newer agent"):
        device.installer.resume()
