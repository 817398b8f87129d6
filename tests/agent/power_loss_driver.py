"""Simulators for the install tests, and a driver that runs the installer in a child process.

Simulators implement the installer's own interfaces, never mocks of a library:
`FakeClock` (Clock), `ScriptedProbe` (HealthProbe), `RecordingReporter`
(Reporter), `ServerFetcher` (Fetcher: serves bundle files by SHA-256 as the
fleet server would, can fail a number of times, resumes a `.part`).

A power cut is a `Cut`: armed with a state, it fires either right after that
state is persisted (the reporter sees it) or, with `mid`, inside the state's
handler after its first link change (`CuttingLayout`), half way through a
download (`ServerFetcher`), or right after the predictor was handed a
challenger (the installer's `on_shadow`, recorded in `Device.shadowed`). In
the test process it raises `PowerCut` (a BaseException, which the installer
never catches); in the driver it is SIGKILL. The driver:

    python -m tests.agent.power_loss_driver --config agent.toml --server DIR
        --reports reports.jsonl [--cut-at STATE [--mid]] [--health good|bad]
        (directive FILE | resume)

It prints the state the machine rests in, then `shadowed: <ids>`: the
challengers handed to `on_shadow` by this process, in order ("-" for None).
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from edgefleet.agent.config import load_config
from edgefleet.agent.errors import DownloadError
from edgefleet.agent.install import HealthSnapshot, Host, Installer, InstallStatus
from edgefleet.agent.layout import StateLayout
from edgefleet.agent.versions import InstalledVersion, Versions
from edgefleet.agentconfig import AgentConfig, HealthSettings
from edgefleet.bundle import read_manifest
from edgefleet.keys import SigningKey
from edgefleet.mqtt import BundleRef, Directive, HttpSource, StatusReport, sign_directive
from edgefleet.timefmt import format_time, utcnow
from edgefleet.trust import load_trust_root

HEALTHY = HealthSnapshot(requests=50, errors=0, fallbacks=0, latency_p95_ms=2.0)
FAILING = HealthSnapshot(requests=50, errors=20, fallbacks=0, latency_p95_ms=2.0)
SILENT = HealthSnapshot(requests=0, errors=0, fallbacks=0, latency_p95_ms=None)


class PowerCut(BaseException):
    """The power went out (in-process simulation: nothing after it runs)."""


@dataclass
class Cut:
    """Where to cut the power; `fire` is PowerCut in-process, SIGKILL in the driver."""

    at: str | None = None
    mid: bool = False
    skip: int = 0  # sightings of `at` to let pass first (a resume reports the old state again)
    state: str | None = None  # the state last persisted, as reported
    fire: Callable[[], None] = field(default=lambda: _raise_power_cut())

    def persisted(self, state: str) -> None:
        self.state = state
        if state == self.at and not self.mid:
            if self.skip:
                self.skip -= 1
                return
            self.at = None
            self.fire()

    def inside(self) -> None:
        """A point inside the current state's handler where the power may go."""
        if self.mid and self.state == self.at:
            self.at = None
            self.fire()


def _raise_power_cut() -> None:
    raise PowerCut


def _sigkill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class FakeClock:
    """Wall time starts at the real time (directives are dated by it); sleeping is instant."""

    def __init__(self) -> None:
        self.start = utcnow()
        self.elapsed = 0.0
        self.sleeps: list[float] = []

    def now(self) -> dt.datetime:
        return (self.start + dt.timedelta(seconds=self.elapsed)).replace(microsecond=0)

    def monotonic(self) -> float:
        return self.elapsed

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.elapsed += seconds


class ScriptedProbe:
    """Answers `since` from a script, in order; the last answer repeats."""

    def __init__(self, *script: HealthSnapshot) -> None:
        self.script = list(script) or [SILENT]
        self.marks = 0

    def mark(self) -> object:
        self.marks += 1
        return self.marks

    def since(self, mark: object) -> HealthSnapshot:
        return self.script.pop(0) if len(self.script) > 1 else self.script[0]


class RecordingReporter:
    """Keeps every report; with `log`, also appends it to a JSON-lines file, fsynced."""

    def __init__(self, cut: Cut | None = None, log: Path | None = None) -> None:
        self.reports: list[StatusReport] = []
        self.cut = cut
        self.log = log

    def report(self, status: StatusReport) -> None:
        self.reports.append(status)
        if self.log is not None:
            with open(self.log, "a", encoding="utf-8") as handle:
                handle.write(status.model_dump_json() + "\n")
                handle.flush()
                os.fsync(handle.fileno())
        if self.cut is not None:
            self.cut.persisted(status.install_state)

    @property
    def states(self) -> list[str]:
        return [r.install_state for r in self.reports]


@dataclass(frozen=True)
class CuttingLayout(StateLayout):
    """The real layout; the power may go right after each link change."""

    cut: Cut = field(default_factory=Cut)

    def point(self, link: Path, target: Path | None) -> None:
        super().point(link, target)
        self.cut.inside()


class ServerFetcher:
    """The fleet server's side of a transport: bundle files kept by SHA-256 under `root`.

    Writes `<destination>.part` in two halves and resumes a part left by a cut;
    renames to `destination` when complete. It checks nothing: the installer must.
    """

    def __init__(self, root: Path, failures: int = 0, cut: Cut | None = None) -> None:
        self.root = root
        self.failures = failures
        self.cut = cut or Cut()
        self.calls = 0

    def publish(self, bundle: Path, name: str, version: str) -> BundleRef:
        data = bundle.read_bytes()
        sha256 = hashlib.sha256(data).hexdigest()
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / sha256).write_bytes(data)
        return BundleRef(name=name, version=version, sha256=sha256, length=len(data))

    def fetch(self, directive: Directive, destination: Path) -> Path:
        self.calls += 1
        if self.failures > 0:
            self.failures -= 1
            raise DownloadError("simulated outage: connection refused")
        assert directive.bundle is not None
        data = (self.root / directive.bundle.sha256).read_bytes()
        part = destination.with_name(destination.name + ".part")
        done = part.stat().st_size if part.exists() else 0
        with open(part, "ab") as handle:
            for end in (len(data) // 2, len(data)):
                if end > done:
                    handle.write(data[done:end])
                    handle.flush()
                    os.fsync(handle.fileno())
                    done = end
                    self.cut.inside()
        os.replace(part, destination)
        return destination


def make_directive(
    server_key: SigningKey,
    bundle: BundleRef | None,
    *,
    sequence: int,
    device_id: str = "cam-01",
    action: Literal["install", "rollback"] = "install",
    issued: dt.datetime | None = None,
    lifetime: dt.timedelta = dt.timedelta(hours=1),
    shadow: bool = False,
) -> bytes:
    issued = issued or utcnow() - dt.timedelta(minutes=1)
    directive = Directive(
        device_id=device_id,
        sequence=sequence,
        issued=format_time(issued),
        expires=format_time(issued + lifetime),
        action=action,
        bundle=bundle,  # for a rollback: the bundle it undoes, or None
        sources=[HttpSource(url="https://fleet.example/bundle")] if action == "install" else [],
        shadow=shadow,
    )
    return sign_directive(directive, [server_key])


@dataclass
class Device:
    """One boot of an agent on a state directory, wired to the simulators."""

    config: AgentConfig
    server: ServerFetcher
    installer: Installer
    reporter: RecordingReporter
    probe: ScriptedProbe
    clock: FakeClock
    cut: Cut
    activated: list[str | None]
    shadowed: list[str | None]  # what `on_shadow` was handed, in order

    @classmethod
    def boot(
        cls,
        config: AgentConfig,
        *,
        server: Path,
        probe: ScriptedProbe | None = None,
        cut: Cut | None = None,
        log: Path | None = None,
        host: Host | None = None,
        failures: int = 0,
    ) -> Device:
        cut = cut or Cut()
        probe = probe or ScriptedProbe(HEALTHY)
        reporter = RecordingReporter(cut, log)
        fetcher = ServerFetcher(server, failures=failures, cut=cut)
        clock = FakeClock()
        activated: list[str | None] = []
        shadowed: list[str | None] = []

        def on_shadow(version: InstalledVersion | None) -> None:
            shadowed.append(version.id if version else None)
            cut.inside()

        installer = Installer(
            config,
            CuttingLayout(config.state_dir, cut),
            load_trust_root(config.trust_root),
            fetcher,
            reporter,
            probe,
            lambda version: activated.append(version.id if version else None),
            clock,
            on_shadow=on_shadow,
            host=host,
        )
        return cls(config, fetcher, installer, reporter, probe, clock, cut, activated, shadowed)

    def reboot(self, probe: ScriptedProbe | None = None, cut: Cut | None = None) -> Device:
        """The agent again after a restart: new objects, the same disk."""
        return Device.boot(self.config, server=self.server.root, probe=probe, cut=cut)

    @property
    def versions(self) -> Versions:
        return self.installer.versions

    def publish(self, bundle: Path) -> BundleRef:
        _, manifest = read_manifest(bundle)
        return self.server.publish(bundle, manifest.name, manifest.version)


PROFILE = "x86_64-vnni"
MODELS = Path(__file__).parent.parent / "fixtures" / "models"


@dataclass(frozen=True)
class Bundles:
    """Real bundles of the digits MLP converted for PROFILE, signed by the test release key."""

    model_dir: Path  # the converter's output
    releases: tuple[Path, ...]  # demo 1.0.0, 1.1.0, 1.2.0, 1.3.0
    smoke_broken: Path  # demo 2.0.0, whose expected smoke outputs were altered before signing
    tflite: Path  # demo-lite 1.0.0 for armv7-tflite (LiteRT)

    @staticmethod
    def version(index: int) -> str:
        return f"1.{index}.0"


def _convert(model: str, target: str, out_dir: Path) -> Path:
    import numpy as np

    from edgefleet.converter import ConvertOptions, convert
    from tests.fixtures import datasets

    features, labels = datasets.digits_tabular()
    split = datasets.split(len(features))
    calibration = out_dir.parent / f"{out_dir.name}-calibration.npz"
    np.savez(calibration, features=features[split.calibration])
    validation = out_dir.parent / f"{out_dir.name}-validation.npz"
    np.savez(validation, features=features[split.validation])
    validation_labels = out_dir.parent / f"{out_dir.name}-labels.npy"
    np.save(validation_labels, labels[split.validation])
    # The float model ships whatever this machine measures: the tests kill installs, not
    # candidates, and a pinned choice converts faster and the same way everywhere. With
    # labels, the report states its accuracy (the server's reference for labelled feedback).
    options = ConvertOptions(
        target=target,
        calibration=calibration,
        validation=validation,
        labels=validation_labels,
        candidate="float",
    )
    convert(MODELS / model, out_dir, options)
    return out_dir


def prepare_bundles(directory: Path, release: SigningKey) -> Bundles:
    """Convert and sign once per directory (the test session's, keyed by the release key)."""
    import shutil

    import numpy as np

    from edgefleet.bundle import build_bundle

    done = directory / "done"
    model_dir = directory / "model"
    bundles = Bundles(
        model_dir=model_dir,
        releases=tuple(directory / f"demo-{Bundles.version(i)}.efb" for i in range(4)),
        smoke_broken=directory / "demo-2.0.0-smoke-broken.efb",
        tflite=directory / "demo-lite-1.0.0.efb",
    )
    if done.exists():
        return bundles
    directory.mkdir(parents=True, exist_ok=True)
    _convert("digits_mlp.onnx", PROFILE, model_dir)
    for index, path in enumerate(bundles.releases):
        build_bundle(model_dir, path, name="demo", version=Bundles.version(index), keys=[release])
    broken = directory / "model-smoke-broken"
    shutil.copytree(model_dir, broken)
    with np.load(broken / "smoke.npz") as archive:
        arrays = {name: archive[name] for name in archive.files}
    arrays["expected/probabilities"] = arrays["expected/probabilities"] + 0.5
    np.savez(broken / "smoke.npz", **arrays)
    build_bundle(broken, bundles.smoke_broken, name="demo", version="2.0.0", keys=[release])
    lite = _convert("digits_mlp.tflite", "armv7-tflite", directory / "model-lite")
    build_bundle(lite, bundles.tflite, name="demo-lite", version="1.0.0", keys=[release])
    done.touch()
    return bundles


def device_config(root: Path, trust_raw: bytes, **changes: object) -> AgentConfig:
    """A device's configuration under `root`, its trust root written beside it."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "trust.json").write_bytes(trust_raw)
    config = AgentConfig(
        device_id="cam-01",
        profile=PROFILE,
        state_dir=root / "state",
        trust_root=root / "trust.json",
        health=HealthSettings(duration_seconds=30.0, min_requests=20),
    )
    return config.model_copy(update=changes)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--server", type=Path, required=True)
    parser.add_argument("--reports", type=Path, required=True)
    parser.add_argument("--cut-at")
    parser.add_argument("--mid", action="store_true")
    parser.add_argument("--health", choices=["good", "bad"], default="good")
    parser.add_argument("action", choices=["directive", "resume"])
    parser.add_argument("directive", type=Path, nargs="?")
    args = parser.parse_args(argv)
    cut = Cut(at=args.cut_at, mid=args.mid, fire=_sigkill)
    probe = ScriptedProbe(HEALTHY if args.health == "good" else FAILING)
    device = Device.boot(
        load_config(args.config), server=args.server, probe=probe, cut=cut, log=args.reports
    )
    installer = device.installer
    status: InstallStatus
    if args.action == "resume":
        status = installer.resume()
    else:
        try:
            status = installer.install_directive(args.directive.read_bytes())
        except Exception as exc:  # the outcome is in state.json and the reports
            print(f"install failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            status = installer.status()
    print(status.state.value)
    print("shadowed:", " ".join(id_ or "-" for id_ in device.shadowed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
