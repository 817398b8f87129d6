"""Everything the installer must refuse: each with its exact error, the device unchanged.

Directives are refused before anything is persisted (state.json byte for byte
the same, no report). A refused bundle is reported `refused` with its error
code and the machine rests as before (COMMITTED: the device serves what it
served); device limits fail the install (FAILED, reported with the reason).
Either way nothing is staged or left in downloads/.
"""

from __future__ import annotations

import datetime as dt
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from edgefleet import errors
from edgefleet.agent.errors import CompatibilityError, SmokeTestError
from edgefleet.agent.install import Host, Installer, State
from edgefleet.agent.install.compat import check_runtime
from edgefleet.agentconfig import AgentConfig, Limits
from edgefleet.bundle import build_bundle
from edgefleet.keys import SigningKey
from edgefleet.mqtt import BundleRef
from edgefleet.signing import Envelope
from edgefleet.timefmt import utcnow
from edgefleet.trust import TrustRoot
from edgefleet.wire import error_code
from tests.agent.power_loss_driver import (
    PROFILE,
    Bundles,
    Device,
    device_config,
    make_directive,
    prepare_bundles,
)
from tests.agent.releases import release
from tests.conftest import KeySet, make_trust_root
from tests.core.forge import Member, flip_byte, forge, manifest_for, write_bundle


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
def serving(config: AgentConfig, tmp_path: Path, bundles: Bundles) -> Device:
    """A device serving demo 1.0.0."""
    device = Device.boot(config, server=tmp_path / "server")
    device.installer.install_file(bundles.releases[0])
    return device


def snapshot(device: Device) -> tuple[bytes, list[str], list[str], str | None, str | None]:
    state_dir = device.config.state_dir
    return (
        (state_dir / "state.json").read_bytes(),
        sorted(p.name for p in (state_dir / "versions").iterdir()),
        sorted(p.name for p in (state_dir / "downloads").iterdir()),
        device.versions.current_id(),
        device.versions.previous_id(),
    )


# --- directives ---------------------------------------------------------------------------

NOW = utcnow()
Forger = Callable[[KeySet, BundleRef], bytes]


def _directive(keys: KeySet, ref: BundleRef, **changes: Any) -> bytes:
    fields: dict[str, Any] = {"key": keys.server, "sequence": 6, **changes}
    return make_directive(fields.pop("key"), ref, **fields)


DIRECTIVE_ATTACKS: dict[str, tuple[Forger, type[errors.EdgefleetError]]] = {
    "replayed": (lambda k, r: _directive(k, r, sequence=5), errors.ReplayedDirectiveError),
    "out of order": (lambda k, r: _directive(k, r, sequence=4), errors.ReplayedDirectiveError),
    "expired": (
        lambda k, r: _directive(k, r, issued=NOW - dt.timedelta(hours=2)),
        errors.DirectiveExpiredError,
    ),
    "from the future": (
        lambda k, r: _directive(k, r, issued=NOW + dt.timedelta(hours=2)),
        errors.DirectiveFromFutureError,
    ),
    "for another device": (
        lambda k, r: _directive(k, r, device_id="cam-02"),
        errors.WrongDeviceError,
    ),
    "signed by a release key": (
        lambda k, r: _directive(k, r, key=k.release),
        errors.WrongRoleError,
    ),
    "signed by an unknown key": (
        lambda k, r: _directive(k, r, key=SigningKey.generate()),
        errors.UnknownKeyError,
    ),
    "changed after signing": (
        lambda k, r: _directive(k, r).replace(b'"sequence":6', b'"sequence":9'),
        errors.BadSignatureError,
    ),
    "not a directive": (lambda k, r: b'{"hello": "device"}', errors.MalformedDocumentError),
}


@pytest.mark.parametrize("attack", DIRECTIVE_ATTACKS, ids=list(DIRECTIVE_ATTACKS))
def test_directive_refused_and_state_unchanged(
    serving: Device, bundles: Bundles, keyset: KeySet, attack: str
) -> None:
    first = serving.publish(bundles.releases[1])
    serving.installer.install_directive(make_directive(keyset.server, first, sequence=5))
    serving.reporter.reports.clear()
    before = snapshot(serving)
    forger, error = DIRECTIVE_ATTACKS[attack]
    with pytest.raises(errors.EdgefleetError) as raised:
        serving.installer.install_directive(forger(keyset, serving.publish(bundles.releases[2])))
    assert type(raised.value) is error, raised.value
    assert snapshot(serving) == before
    assert serving.reporter.reports == []


def test_directive_refused_under_an_expired_trust_root(
    tmp_path: Path, keyset: KeySet, bundles: Bundles
) -> None:
    expired = make_trust_root(keyset, expires=utcnow() - dt.timedelta(days=1))
    device = Device.boot(device_config(tmp_path / "d", expired.raw), server=tmp_path / "s")
    directive = make_directive(keyset.server, device.publish(bundles.releases[0]), sequence=1)
    with pytest.raises(errors.TrustRootExpiredError):
        device.installer.install_directive(directive)
    assert device.installer.status().state is State.IDLE and device.reporter.reports == []


# --- bundles: through `agent install FILE` ------------------------------------------------

Maker = Callable[[Path, Bundles, KeySet], Path]
FILES = {"model.onnx": b"\x08\x07" * 3000, "smoke.json": b"{}"}


def _copy(source: Path, target: Path, edit: Callable[[bytes], bytes]) -> Path:
    target.write_bytes(edit(source.read_bytes()))
    return target


def _tampered(tmp: Path, b: Bundles, k: KeySet) -> Path:
    path = _copy(b.releases[2], tmp / "t.efb", lambda data: data)
    model = (b.model_dir / "model.onnx").read_bytes()
    flip_byte(path, path.read_bytes().index(model) + len(model) // 2)
    return path


def _built(
    tmp: Path,
    b: Bundles,
    keys: list[SigningKey],
    profiles: tuple[str, ...] = (),
    min_agent_version: str | None = None,
) -> Path:
    output = tmp / "x.efb"
    build_bundle(
        b.model_dir,
        output,
        name="demo",
        version="1.9.0",
        keys=keys,
        profiles=profiles,
        min_agent_version=min_agent_version,
    )
    return output


def _without_smoke(tmp: Path, b: Bundles, k: KeySet) -> Path:
    shutil.copytree(b.model_dir, tmp / "src")
    (tmp / "src" / "smoke.npz").unlink()
    build_bundle(tmp / "src", tmp / "x.efb", name="demo", version="1.9.0", keys=[k.release])
    return tmp / "x.efb"


ABOVE_FLOOR = {"release_counter": 10**13}


def _forged(members: list[Member] | None = None) -> Maker:
    return lambda tmp, b, k: forge(
        tmp / "f.efb", FILES, [k.release], members=members, profiles=[PROFILE], **ABOVE_FLOOR
    )


BUNDLE_ATTACKS: dict[str, tuple[Maker, type[errors.EdgefleetError]]] = {
    "tampered model": (_tampered, errors.TamperedFileError),
    "truncated": (
        lambda t, b, k: _copy(b.releases[2], t / "x.efb", lambda d: d[: len(d) // 2]),
        errors.BundleTruncatedError,
    ),
    "manifest changed after signing": (
        lambda t, b, k: _copy(
            b.releases[2],
            t / "x.efb",
            lambda d: d.replace(b'"version":"1.2.0"', b'"version":"1.2.9"'),
        ),
        errors.BadSignatureError,
    ),
    "unsigned": (
        lambda t, b, k: write_bundle(
            t / "u.efb",
            Envelope(signed=manifest_for(FILES, profiles=[PROFILE]), signatures=[]),
            [Member(n, d) for n, d in FILES.items()],
        ),
        errors.ThresholdError,
    ),
    "signed by an unknown key": (
        lambda t, b, k: _built(t, b, [SigningKey.generate()]),
        errors.UnknownKeyError,
    ),
    "signed by the server key": (lambda t, b, k: _built(t, b, [k.server]), errors.WrongRoleError),
    "for another profile": (
        lambda t, b, k: _built(t, b, [k.release], profiles=("aarch64",)),
        errors.ProfileMismatchError,
    ),
    "for a newer agent": (
        lambda t, b, k: _built(t, b, [k.release], min_agent_version="9.0.0"),
        errors.AgentTooOldError,
    ),
    "below the security floor": (lambda t, b, k: b.releases[0], errors.BelowSecurityFloorError),
    "below the floor a release stated": (
        lambda t, b, k: release(b, t, k.release, "demo", "1.0.9"),
        errors.BelowSecurityFloorError,
    ),
    "unlisted file": (
        _forged([*(Member(n, d) for n, d in FILES.items()), Member("run.sh", b"rm -rf /")]),
        errors.UnlistedFileError,
    ),
    "listed file missing": (
        _forged([Member("model.onnx", FILES["model.onnx"])]),
        errors.MissingFileError,
    ),
    "symlink": (
        _forged([Member("model.onnx", type=b"2", linkname="/etc/shadow")]),
        errors.LinkInBundleError,
    ),
    "path traversal": (
        _forged([*(Member(n, d) for n, d in FILES.items()), Member("../../etc/cron.d/x", b"x")]),
        errors.UnsafePathError,
    ),
    "not a bundle": (
        lambda t, b, k: _copy(b.releases[2], t / "x.efb", lambda d: b"\x7fELF" + d[4:4000]),
        errors.NotABundleError,
    ),
    "no smoke test": (_without_smoke, SmokeTestError),
    # A refusal (exit 1), before any disk is taken: it was a CompatibilityError in CHECKING.
    "no model to serve": (
        lambda t, b, k: forge(
            t / "f.efb",
            {"smoke.json": b"{}"},
            [k.release],
            profiles=[PROFILE],
            release_counter=ABOVE_FLOOR["release_counter"],
        ),
        errors.NothingToServeError,
    ),
}


@pytest.mark.parametrize("attack", BUNDLE_ATTACKS, ids=list(BUNDLE_ATTACKS))
def test_bundle_attack_through_install_file_refused_with_nothing_staged(
    serving: Device, bundles: Bundles, keyset: KeySet, tmp_path: Path, attack: str
) -> None:
    # demo 1.1.0 stating the floor 1.1.0: 1.0.x is below it from now on.
    stating = release(bundles, tmp_path / "floor", keyset.release, "demo", "1.1.0", "1.1.0")
    serving.installer.install_file(stating)
    serving.reporter.reports.clear()
    _, versions, downloads, current, previous = snapshot(serving)
    maker, error = BUNDLE_ATTACKS[attack]
    (tmp_path / "attack").mkdir()
    with pytest.raises(errors.EdgefleetError) as raised:
        serving.installer.install_file(maker(tmp_path / "attack", bundles, keyset))
    assert type(raised.value) is error, raised.value
    assert snapshot(serving)[1:] == (versions, downloads, current, previous)
    status, report = serving.installer.status(), serving.reporter.reports[-1]
    assert report.reason is not None and report.reason.startswith(f"{error_code(raised.value)}: ")
    assert error.__name__ not in report.reason
    if issubclass(error, errors.UntrustedInputError):  # refused: nothing changed, nor the state
        assert (report.install_state, status.state) == ("refused", State.COMMITTED)
        assert status.refused == error_code(raised.value)
    else:  # the bundle is genuine but does not work here
        assert (report.install_state, status.state) == ("failed", State.FAILED)
        assert status.refused is None


def test_bundle_over_the_size_limit_refused_before_it_is_copied(
    tmp_path: Path, trust: TrustRoot, bundles: Bundles
) -> None:
    config = device_config(tmp_path / "d", trust.raw, limits=Limits(max_bundle_bytes=50_000))
    device = Device.boot(config, server=tmp_path / "s")
    with pytest.raises(errors.BundleTooLargeError):
        device.installer.install_file(bundles.releases[0])
    assert device.reporter.states == ["downloading", "refused"]
    assert device.installer.status().state is State.IDLE  # it serves nothing, as before
    assert list((config.state_dir / "downloads").iterdir()) == []


# --- bundles: through a directive ---------------------------------------------------------

DELIVERED: dict[str, tuple[Callable[[bytes], bytes], type[errors.EdgefleetError]]] = {
    "other bytes of the same length": (
        lambda d: d[:-600] + bytes([d[-600] ^ 1]) + d[-599:],
        errors.TamperedFileError,
    ),
    "a longer file": (lambda d: d + b"\0" * 512, errors.FileLengthError),
}


@pytest.mark.parametrize("delivered", DELIVERED, ids=list(DELIVERED))
def test_delivered_bytes_that_are_not_the_directives_bundle_refused(
    serving: Device, bundles: Bundles, keyset: KeySet, delivered: str
) -> None:
    before = snapshot(serving)[1:]
    ref = serving.publish(bundles.releases[2])
    edit, error = DELIVERED[delivered]
    served = serving.server.root / ref.sha256
    served.write_bytes(edit(served.read_bytes()))  # a server or cache that serves the wrong file
    with pytest.raises(error):
        serving.installer.install_directive(make_directive(keyset.server, ref, sequence=1))
    assert snapshot(serving)[1:] == before
    report = serving.reporter.reports[-1]
    assert (report.install_state, report.directive_sequence) == ("refused", 1)
    assert serving.installer.status().state is State.COMMITTED


def test_directive_naming_a_bundle_over_the_limit_is_not_downloaded(
    serving: Device, bundles: Bundles, keyset: KeySet
) -> None:
    ref = serving.publish(bundles.releases[2]).model_copy(update={"length": 10**12})
    with pytest.raises(errors.BundleTooLargeError):
        serving.installer.install_directive(make_directive(keyset.server, ref, sequence=1))
    assert serving.server.calls == 0


def test_directive_whose_sources_this_agent_cannot_use_fails(
    serving: Device, bundles: Bundles, keyset: KeySet
) -> None:
    installer = serving.installer
    only_blocks = Installer(
        serving.config, installer.layout, installer.trust, {"mqtt-blocks": serving.server}
    )
    ref = serving.publish(bundles.releases[2])
    with pytest.raises(CompatibilityError, match="no transport"):
        only_blocks.install_directive(make_directive(keyset.server, ref, sequence=1))


# --- the device itself ---------------------------------------------------------------------


def _host(
    free: Callable[[Path], int] = lambda path: 10**12,
    memory: Callable[[], int | None] = lambda: 10**12,
    runtime: Callable[[str], bool] = lambda module: True,
) -> Host:
    return Host(free_bytes=free, available_memory=memory, has_module=runtime)


DEVICE_LIMITS: dict[str, tuple[Host, str, list[str]]] = {
    "disk full before download": (
        _host(lambda path: 1024),
        "not enough disk",
        ["downloading", "failed"],
    ),
    "disk full for staging": (
        _host(lambda path: 1024 if path.name == "versions" else 10**12),
        "not enough disk",
        ["downloading", "verifying", "checking", "failed"],
    ),
    "no runtime installed": (
        _host(runtime=lambda module: False),
        "onnxruntime",
        ["downloading", "verifying", "checking", "failed"],
    ),
    "not enough memory": (
        _host(memory=lambda: 1024),
        "not enough memory",
        ["downloading", "verifying", "checking", "failed"],
    ),
}


@pytest.mark.parametrize("limit", DEVICE_LIMITS, ids=list(DEVICE_LIMITS))
def test_device_that_cannot_take_the_bundle_refuses_with_nothing_staged(
    serving: Device, bundles: Bundles, limit: str
) -> None:
    host, reason, chain = DEVICE_LIMITS[limit]
    device = Device.boot(serving.config, server=serving.server.root, host=host)
    before = snapshot(device)[1:]
    with pytest.raises(CompatibilityError, match=reason):
        device.installer.install_file(bundles.releases[2])
    assert device.reporter.states == chain
    assert snapshot(device)[1:] == before


def test_profile_that_does_not_run_the_bundles_runtime_is_refused() -> None:
    # The core's check (`bundle build` and `bundle verify` run it too): a refusal.
    with pytest.raises(errors.RuntimeNotOnProfileError, match="profile armv7-tflite does not run"):
        check_runtime("model.onnx", "armv7-tflite", Host())
    assert check_runtime("model.tflite", "armv7-tflite", Host()) == "ai_edge_litert"


@pytest.mark.parametrize("profile", ["x86_64-avx2", "x86_64-vnni", "aarch64"])
def test_profiles_that_run_both_runtimes_take_either_model(profile: str) -> None:
    assert check_runtime("model.onnx", profile, Host()) == "onnxruntime"
    assert check_runtime("model.tflite", profile, Host()) == "ai_edge_litert"
