"""One handler per working state of the install machine, in the table `HANDLERS`.

A handler is a function (context, record) -> (event, record): it does the
state's work with the install context (context.py), names the event, and
returns the record to persist with the next state. It raises on failure; the
engine (engine.py) turns the exception into an event. `HANDLERS` sits beside
the transition table (states.py): a state with no handler is one where the
machine rests.

Every handler may run again after a power cut and must be idempotent:
DOWNLOADING keeps a complete file, STAGING keeps a staged version, ACTIVATING
and ROLLING_BACK set the links to absolute values they read from the record,
and SHADOWING, ACTIVATING (a promotion) and ROLLING_BACK hand the predictor the
challenger the machine persisted on entering the state, read from the record.

The bundle is read once after it arrives: VERIFYING checks the manifest alone
(signatures, limits, profile, floor, agent version), and STAGING extracts it,
checking every file as it writes it. The whole-file digest is taken only where
nothing took it yet in this call: a file found already downloaded (a restart),
or delivered by a fetcher that does not check it (see `checks_digest`).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path

from edgefleet import __version__
from edgefleet.agent.errors import CompatibilityError, DownloadError, InstallError
from edgefleet.agent.inference.timing import record_timing
from edgefleet.agent.install.compat import BundleNeeds, check_compatibility, check_disk
from edgefleet.agent.install.context import InstallContext
from edgefleet.agent.install.fetch import LocalFileFetcher, backoff_delay
from edgefleet.agent.install.health import Baseline, run_health_check
from edgefleet.agent.install.interfaces import checks_digest
from edgefleet.agent.install.record import InstallRecord
from edgefleet.agent.install.smoke import run_smoke_test
from edgefleet.agent.install.states import Event, State
from edgefleet.agent.versions import version_id
from edgefleet.bundle import BundleLimits, BundlePolicy, check_served_model, verify_manifest
from edgefleet.bundlefiles import SERVED_MODELS
from edgefleet.errors import (
    BundleTooLargeError,
    FileLengthError,
    LocalError,
    NothingToServeError,
    TamperedFileError,
)
from edgefleet.fileio import file_sha256
from edgefleet.mqtt import Directive
from edgefleet.profiles import load_profile

Step = tuple[Event, InstallRecord]
Handler = Callable[[InstallContext, InstallRecord], Step]
LOCAL_COPY = ".local-install.efb"  # under downloads/: a bundle file being copied in


def bundle_policy(context: InstallContext) -> BundlePolicy:
    return context.device_trust().bundle_policy(context.config.profile, __version__)


def bundle_limits(context: InstallContext) -> BundleLimits:
    return BundleLimits(max_bundle_bytes=context.config.limits.max_bundle_bytes)


def hand_challenger(context: InstallContext, id_: str | None) -> None:
    """Tell the predictor which version runs in shadow (None: none)."""
    if context.on_shadow is not None:
        context.on_shadow(context.versions.load(id_) if id_ else None)
        context.handed.append(id_)


def download(context: InstallContext, record: InstallRecord) -> Step:
    if record.attempts:
        context.clock.sleep(backoff_delay(record.attempts, context.rng))
    limits, downloads = context.config.limits, context.layout.downloads
    if record.directive is not None:
        directive = Directive.model_validate(record.directive)
        bundle = directive.bundle
        assert bundle is not None
        if bundle.length > limits.max_bundle_bytes:
            raise BundleTooLargeError(
                f"the directive's bundle is {bundle.length} bytes, over the limit of "
                f"{limits.max_bundle_bytes}"
            )
        destination = downloads / bundle.sha256
        if not destination.is_file():  # fetchers only ever rename a complete file there
            if context.fetcher is None:
                raise CompatibilityError("this agent has no transport to download bundles")
            check_disk(bundle.length, limits.disk_reserve_bytes, downloads, context.host)
            destination = context.fetcher.fetch(directive, destination)
            if checks_digest(context.fetcher):
                context.checked_download = destination
        return Event.DONE, record.model_copy(update={"download": str(destination)})
    source = Path(record.source_file or "")
    try:
        size = source.stat().st_size
    except OSError as exc:
        raise DownloadError(f"cannot read {source}: {exc.strerror}") from exc
    if size > limits.max_bundle_bytes:
        raise BundleTooLargeError(
            f"{source} is {size} bytes, over the limit of {limits.max_bundle_bytes}"
        )
    check_disk(size, limits.disk_reserve_bytes, downloads, context.host)
    length, sha256 = LocalFileFetcher(source).copy(downloads / LOCAL_COPY, limits.max_bundle_bytes)
    destination = downloads / sha256
    os.replace(downloads / LOCAL_COPY, destination)
    context.checked_download = destination  # hashed as it was copied
    update = {"download": str(destination), "sha256": sha256, "length": length}
    return Event.DONE, record.model_copy(update=update)


def _check_digest(path: Path, record: InstallRecord) -> None:
    length, sha256 = file_sha256(path)
    if length != record.length:
        raise FileLengthError(f"the bundle is {length} bytes, expected {record.length}")
    if sha256 != record.sha256:
        raise TamperedFileError(
            f"the bundle file's SHA-256 is {sha256[:12]}..., not {str(record.sha256)[:12]}... "
            "(the directive's, or the one taken when it was copied in)"
        )


def verify(context: InstallContext, record: InstallRecord) -> Step:
    path, sha256 = Path(record.download or ""), record.sha256
    assert sha256 is not None  # the directive's, or taken when the file was copied in
    if context.checked_download != path:
        _check_digest(path, record)
    _, manifest = verify_manifest(
        path,
        context.device_trust().root,
        bundle_policy(context),
        bundle_limits(context),
        context.clock.now(),
    )
    # Refused here, with the signatures, as `bundle build` and `bundle verify` refuse it.
    served = check_served_model(manifest, [context.config.profile])
    listed = manifest.files_by_path()
    update = {
        "to_version": version_id(manifest.name, manifest.version, sha256),
        "bundle_name": manifest.name,
        "bundle_version": manifest.version,
        "release_counter": manifest.release_counter,
        "security_floor": manifest.security_floor,
        "files_bytes": manifest.total_length,
        "served_model": served,
        "served_bytes": listed[served].length,
        "reason": None,
    }
    return Event.DONE, record.model_copy(update=update)


def check(context: InstallContext, record: InstallRecord) -> Step:
    if record.served_model is None or record.to_version is None:
        # A record persisted by an agent that verified less.
        raise NothingToServeError(f"the bundle holds none of {', '.join(SERVED_MODELS)}")
    needs = BundleNeeds(record.served_model, record.served_bytes or 0, record.files_bytes or 0)
    check_compatibility(
        needs,
        profile_name=context.config.profile,
        host=context.host,
        versions_dir=context.layout.versions,
        reserve_bytes=context.config.limits.disk_reserve_bytes,
        already_staged=context.versions.path_of(record.to_version).is_dir(),
    )
    return Event.DONE, record


def stage(context: InstallContext, record: InstallRecord) -> Step:
    """Extract the bundle: the one pass that checks every file (nothing is left on failure)."""
    if context.versions.current_id() == record.to_version:
        reason = f"{record.to_version} is already the version being served"
        if record.shadow:
            reason += ": not run in shadow beside itself"
        return Event.ALREADY_CURRENT, record.model_copy(update={"reason": reason})
    try:
        staged = context.versions.stage(
            Path(record.download or ""),
            context.device_trust().root,
            bundle_policy(context),
            bundle_limits(context),
            sha256=record.sha256,
            now=context.clock.now(),
        )
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise CompatibilityError(f"the disk filled up while staging: {exc}") from exc
        raise InstallError(f"cannot stage the bundle: {exc}") from exc
    if staged.id != record.to_version:
        raise InstallError(f"staged {staged.id}, but verified {record.to_version}")
    return Event.DONE, record


def smoke_test(context: InstallContext, record: InstallRecord) -> Step:
    version = context.versions.load(record.to_version or "")
    try:
        profile = load_profile(context.config.profile)
        providers, threads = profile.execution_providers, profile.threads
    except LocalError:
        providers, threads = ["CPUExecutionProvider"], 1
    smoke = run_smoke_test(version.directory, providers or ["CPUExecutionProvider"], threads)
    record_timing(context.layout, version.id, smoke_sample_ms=smoke.sample_ms)
    update: dict[str, object] = {}
    if context.probe is not None and context.mark is not None:
        before = context.probe.since(context.mark)
        update = {"baseline_requests": before.requests, "baseline_p95_ms": before.latency_p95_ms}
    return Event.SHADOW if record.shadow else Event.DONE, record.model_copy(update=update)


def activate(context: InstallContext, record: InstallRecord) -> Step:
    current = context.versions.current_id()
    if current not in (record.from_version, record.to_version):
        raise InstallError(f"current changed to {current} while activating: not switching")
    version = context.versions.load(record.to_version or "")
    if record.is_promotion():
        hand_challenger(context, None)  # it is served from now on, no longer compared
    context.versions.activate(version)
    if context.on_activated is not None:
        context.on_activated(version)
    return Event.DONE, record


def shadow(context: InstallContext, record: InstallRecord) -> Step:
    version = context.versions.load(record.to_version or "")
    hand_challenger(context, version.id)
    reason = (
        f"{version.id} runs in shadow beside {record.from_version}: "
        "its agreement is measured, its answers are never returned"
    )
    if context.on_shadow is None:
        reason += " (no predictor is running: it starts with the agent)"
    return Event.DONE, record.model_copy(update={"reason": reason})


def health_check(context: InstallContext, record: InstallRecord) -> Step:
    current = context.versions.current_id()
    if current != record.to_version:
        raise InstallError(f"current is {current}, not {record.to_version}: not checking it")
    baseline = None
    if record.baseline_requests is not None:
        baseline = Baseline(record.baseline_requests, record.baseline_p95_ms)
    health = run_health_check(context.probe, context.clock, context.config.health, baseline)
    if health.sample_ms and current is not None:
        record_timing(context.layout, current, live_sample_ms=health.sample_ms)
    return Event.DONE, record.model_copy(update={"reason": health.note})


def roll_back(context: InstallContext, record: InstallRecord) -> Step:
    versions = context.versions
    if record.kind == "install":
        target, previous, event = record.from_version, record.from_previous, Event.REVERTED
    else:
        # A rollback that keeps what is served (nothing of it to undo) keeps its fallback.
        keeps = record.to_version == record.from_version
        previous = record.from_previous if keeps else None
        target, event = record.to_version, Event.DONE
    before = versions.current_id()
    restored = versions.load(target) if target else None
    kept = None
    if previous and versions.path_of(previous).is_dir():
        kept = versions.load(previous)
    versions.restore(restored, kept)
    if context.on_activated is not None and before != target:
        context.on_activated(restored)
    # The challenger persisted on entering ROLLING_BACK, handed over only when
    # this install or rollback may have changed what the predictor runs.
    if record.kind == "install" and (record.shadow or record.is_promotion()):
        hand_challenger(context, record.from_challenger)  # spared from pruning: still there
    elif record.kind == "rollback" and record.from_challenger:
        hand_challenger(context, None)
    return event, record


HANDLERS: dict[State, Handler] = {
    State.DOWNLOADING: download,
    State.VERIFYING: verify,
    State.CHECKING: check,
    State.STAGING: stage,
    State.SMOKE_TESTING: smoke_test,
    State.ACTIVATING: activate,
    State.SHADOWING: shadow,
    State.HEALTH_CHECKING: health_check,
    State.ROLLING_BACK: roll_back,
}
