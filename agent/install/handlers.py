"""One handler per working state of the install machine: do the state's work, name the event.

Each handler takes the persisted record and returns (event, updated record);
it raises on failure and the engine (engine.py) turns the exception into an
event. Every handler may run again after a power cut and must be idempotent:
DOWNLOADING keeps a complete file, STAGING keeps a staged version, ACTIVATING
and ROLLING_BACK set the links to absolute values they read from the record,
and SHADOWING, ACTIVATING (a promotion) and ROLLING_BACK hand the predictor the
challenger the machine persisted on entering the state, read from the record.
"""

from __future__ import annotations

import errno
import os
import random
from collections.abc import Callable
from pathlib import Path

from edgefleet import __version__
from edgefleet.agent.config import AgentConfig
from edgefleet.agent.errors import CompatibilityError, DownloadError, InstallError
from edgefleet.agent.inference.timing import record_timing
from edgefleet.agent.install.compat import BundleNeeds, check_compatibility, check_disk
from edgefleet.agent.install.fetch import LocalFileFetcher, backoff_delay
from edgefleet.agent.install.health import Baseline, run_health_check
from edgefleet.agent.install.interfaces import (
    Clock,
    Fetcher,
    HealthProbe,
    Host,
    OnActivated,
    OnShadow,
)
from edgefleet.agent.install.record import InstallRecord, StateFile
from edgefleet.agent.install.smoke import run_smoke_test
from edgefleet.agent.install.states import Event, State
from edgefleet.agent.layout import StateLayout
from edgefleet.agent.versions import Versions, version_id
from edgefleet.bundle import BundleLimits, BundlePolicy, verify_bundle
from edgefleet.bundlefiles import SERVED_MODELS
from edgefleet.errors import BundleTooLargeError, FileLengthError, LocalError, TamperedFileError
from edgefleet.fileio import file_sha256
from edgefleet.mqtt import Directive
from edgefleet.profiles import load_profile
from edgefleet.trust import TrustRoot

Step = tuple[Event, InstallRecord]
LOCAL_COPY = ".local-install.efb"  # under downloads/: a bundle file being copied in


class StateHandlers:
    """The handlers; `Installer` supplies the attributes and runs them."""

    config: AgentConfig
    layout: StateLayout
    trust: TrustRoot
    fetcher: Fetcher | None
    probe: HealthProbe | None
    on_activated: OnActivated | None
    on_shadow: OnShadow | None
    clock: Clock
    host: Host
    rng: random.Random
    versions: Versions
    _state: StateFile  # the last persisted state (for the security floors)
    _mark: object | None  # the probe's mark at the start of this run (for the baseline)
    _handed: list[str | None]  # the challengers handed to `on_shadow` by this call, in order

    def handler(self, state: State) -> Callable[[InstallRecord], Step]:
        """Raises: KeyError for a terminal state (they have no handler)."""
        return {
            State.DOWNLOADING: self._download,
            State.VERIFYING: self._verify,
            State.CHECKING: self._check,
            State.STAGING: self._stage,
            State.SMOKE_TESTING: self._smoke_test,
            State.ACTIVATING: self._activate,
            State.SHADOWING: self._shadow,
            State.HEALTH_CHECKING: self._health_check,
            State.ROLLING_BACK: self._roll_back,
        }[state]

    def _policy(self) -> BundlePolicy:
        return BundlePolicy(
            profile=self.config.profile,
            security_floors=self._state.security_floors,
            agent_version=__version__,
        )

    def _limits(self) -> BundleLimits:
        return BundleLimits(max_bundle_bytes=self.config.limits.max_bundle_bytes)

    def _directive(self, record: InstallRecord) -> Directive:
        return Directive.model_validate(record.directive)

    def _download(self, record: InstallRecord) -> Step:
        if record.attempts:
            self.clock.sleep(backoff_delay(record.attempts, self.rng))
        downloads, limit = self.layout.downloads, self.config.limits.max_bundle_bytes
        reserve = self.config.limits.disk_reserve_bytes
        if record.directive is not None:
            directive = self._directive(record)
            bundle = directive.bundle
            assert bundle is not None
            if bundle.length > limit:
                raise BundleTooLargeError(
                    f"the directive's bundle is {bundle.length} bytes, over the limit of {limit}"
                )
            destination = downloads / bundle.sha256
            if not destination.is_file():  # fetchers only ever rename a complete file there
                if self.fetcher is None:
                    raise CompatibilityError("this agent has no transport to download bundles")
                check_disk(bundle.length, reserve, downloads, self.host)
                destination = self.fetcher.fetch(directive, destination)
            return Event.DONE, record.model_copy(update={"download": str(destination)})
        source = Path(record.source_file or "")
        try:
            size = source.stat().st_size
        except OSError as exc:
            raise DownloadError(f"cannot read {source}: {exc.strerror}") from exc
        if size > limit:
            raise BundleTooLargeError(f"{source} is {size} bytes, over the limit of {limit}")
        check_disk(size, reserve, downloads, self.host)
        length, sha256 = LocalFileFetcher(source).copy(downloads / LOCAL_COPY, limit)
        destination = downloads / sha256
        os.replace(downloads / LOCAL_COPY, destination)
        update = {"download": str(destination), "sha256": sha256, "length": length}
        return Event.DONE, record.model_copy(update=update)

    def _verify(self, record: InstallRecord) -> Step:
        path = Path(record.download or "")
        length, sha256 = file_sha256(path)
        if length != record.length:
            raise FileLengthError(f"the bundle is {length} bytes, expected {record.length}")
        if sha256 != record.sha256:
            raise TamperedFileError(
                f"the bundle file's SHA-256 is {sha256[:12]}..., not {str(record.sha256)[:12]}... "
                "(the directive's, or the one taken when it was copied in)"
            )
        verified = verify_bundle(
            path, self.trust, self._policy(), self._limits(), now=self.clock.now()
        )
        manifest = verified.manifest
        listed = manifest.files_by_path()
        served = next((name for name in SERVED_MODELS if name in listed), None)
        update = {
            "to_version": version_id(manifest.name, manifest.version, sha256),
            "bundle_name": manifest.name,
            "bundle_version": manifest.version,
            "release_counter": manifest.release_counter,
            "security_floor": manifest.security_floor,
            "files_bytes": manifest.total_length,
            "served_model": served,
            "served_bytes": listed[served].length if served else None,
            "reason": None,
        }
        return Event.DONE, record.model_copy(update=update)

    def _check(self, record: InstallRecord) -> Step:
        if record.served_model is None or record.to_version is None:
            raise CompatibilityError(f"the bundle holds none of {', '.join(SERVED_MODELS)}")
        needs = BundleNeeds(record.served_model, record.served_bytes or 0, record.files_bytes or 0)
        check_compatibility(
            needs,
            profile_name=self.config.profile,
            host=self.host,
            versions_dir=self.layout.versions,
            reserve_bytes=self.config.limits.disk_reserve_bytes,
            already_staged=self.versions.path_of(record.to_version).is_dir(),
        )
        return Event.DONE, record

    def _stage(self, record: InstallRecord) -> Step:
        if self.versions.current_id() == record.to_version:
            reason = f"{record.to_version} is already the version being served"
            if record.shadow:
                reason += ": not run in shadow beside itself"
            return Event.ALREADY_CURRENT, record.model_copy(update={"reason": reason})
        try:
            staged = self.versions.stage(
                Path(record.download or ""),
                self.trust,
                self._policy(),
                self._limits(),
                sha256=record.sha256,
                now=self.clock.now(),
            )
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise CompatibilityError(f"the disk filled up while staging: {exc}") from exc
            raise InstallError(f"cannot stage the bundle: {exc}") from exc
        if staged.id != record.to_version:
            raise InstallError(f"staged {staged.id}, but verified {record.to_version}")
        return Event.DONE, record

    def _smoke_test(self, record: InstallRecord) -> Step:
        version = self.versions.load(record.to_version or "")
        try:
            profile = load_profile(self.config.profile)
            providers, threads = profile.execution_providers, profile.threads
        except LocalError:
            providers, threads = ["CPUExecutionProvider"], 1
        smoke = run_smoke_test(version.directory, providers or ["CPUExecutionProvider"], threads)
        record_timing(self.layout, version.id, smoke_sample_ms=smoke.sample_ms)
        update: dict[str, object] = {}
        if self.probe is not None and self._mark is not None:
            before = self.probe.since(self._mark)
            update = {
                "baseline_requests": before.requests,
                "baseline_p95_ms": before.latency_p95_ms,
            }
        return Event.SHADOW if record.shadow else Event.DONE, record.model_copy(update=update)

    def _activate(self, record: InstallRecord) -> Step:
        current = self.versions.current_id()
        if current not in (record.from_version, record.to_version):
            raise InstallError(f"current changed to {current} while activating: not switching")
        version = self.versions.load(record.to_version or "")
        if record.is_promotion():
            self._hand_challenger(None)  # it is served from now on, no longer compared
        self.versions.activate(version)
        if self.on_activated is not None:
            self.on_activated(version)
        return Event.DONE, record

    def _shadow(self, record: InstallRecord) -> Step:
        version = self.versions.load(record.to_version or "")
        self._hand_challenger(version.id)
        reason = (
            f"{version.id} runs in shadow beside {record.from_version}: "
            "its agreement is measured, its answers are never returned"
        )
        if self.on_shadow is None:
            reason += " (no predictor is running: it starts with the agent)"
        return Event.DONE, record.model_copy(update={"reason": reason})

    def _hand_challenger(self, id_: str | None) -> None:
        """Tell the predictor which version runs in shadow (None: none)."""
        if self.on_shadow is not None:
            self.on_shadow(self.versions.load(id_) if id_ else None)
            self._handed.append(id_)

    def _health_check(self, record: InstallRecord) -> Step:
        current = self.versions.current_id()
        if current != record.to_version:
            raise InstallError(f"current is {current}, not {record.to_version}: not checking it")
        baseline = None
        if record.baseline_requests is not None:
            baseline = Baseline(record.baseline_requests, record.baseline_p95_ms)
        health = run_health_check(self.probe, self.clock, self.config.health, baseline)
        if health.sample_ms and current is not None:
            record_timing(self.layout, current, live_sample_ms=health.sample_ms)
        return Event.DONE, record.model_copy(update={"reason": health.note})

    def _roll_back(self, record: InstallRecord) -> Step:
        if record.kind == "install":
            target, previous, event = record.from_version, record.from_previous, Event.REVERTED
        else:
            # A rollback that keeps what is served (nothing of it to undo) keeps its fallback.
            keeps = record.to_version == record.from_version
            previous = record.from_previous if keeps else None
            target, event = record.to_version, Event.DONE
        before = self.versions.current_id()
        restored = self.versions.load(target) if target else None
        kept = None
        if previous and self.versions.path_of(previous).is_dir():
            kept = self.versions.load(previous)
        self.versions.restore(restored, kept)
        if self.on_activated is not None and before != target:
            self.on_activated(restored)
        # The challenger persisted on entering ROLLING_BACK, handed over only when
        # this install or rollback may have changed what the predictor runs.
        if record.kind == "install" and (record.shadow or record.is_promotion()):
            self._hand_challenger(record.from_challenger)  # spared from pruning: still there
        elif record.kind == "rollback" and record.from_challenger:
            self._hand_challenger(None)
        return event, record
