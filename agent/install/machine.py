"""The installer: runs the tables of states.py, persisting before each state's handler.

One step, always in this order:

    persist state.json (atomic; store and report counters + 1)
    -> report the state (Reporter)
    -> run the state's handler -> an event
    -> TRANSITIONS[(state, event)] is the next state

A handler's exception becomes an event here and nowhere else: a DownloadError
while attempts are left is RETRY (jittered exponential backoff, persisted
attempt counter), any other exception is FAIL with its class and message as
the reported reason; before activation FAIL ends in FAILED (nothing was
switched), after it in ROLLING_BACK. Terminal states then clean up: remove the
downloaded file, remove a staged version that failed, prune to keep N.

An exception while persisting or reporting (a full disk, a broken outbox) is
not an event: it propagates to the caller, state.json keeps the last state
written, and `resume()` continues from there.

Only one installer runs on a state directory at a time: each public call holds
an exclusive flock on versions/ (released by the kernel when a process dies).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import random
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from edgefleet.agent.config import AgentConfig
from edgefleet.agent.errors import (
    CompatibilityError,
    DownloadError,
    InstallError,
    InstallInProgressError,
    RollbackError,
)
from edgefleet.agent.install.fetch import MAX_DOWNLOAD_ATTEMPTS, TransportFetchers
from edgefleet.agent.install.handlers import LOCAL_COPY, StateHandlers, Step
from edgefleet.agent.install.interfaces import (
    Clock,
    Fetcher,
    HealthProbe,
    Host,
    OnActivated,
    Reporter,
    SystemClock,
)
from edgefleet.agent.install.record import (
    MAX_RESUMES,
    MAX_STORE_COUNT,
    InstallRecord,
    StateFile,
    load_state,
    save_state,
)
from edgefleet.agent.install.states import TERMINAL, Event, State, next_state, resume_state
from edgefleet.agent.layout import StateLayout
from edgefleet.agent.versions import Versions, version_of
from edgefleet.errors import UsageError
from edgefleet.mqtt import StatusReport, verify_directive
from edgefleet.timefmt import format_time
from edgefleet.trust import TrustRoot


@dataclass(frozen=True)
class InstallStatus:
    """Where the machine is and what the device serves (`agent status`)."""

    state: State
    current: str | None
    previous: str | None
    install: InstallRecord | None
    last_directive_sequence: int
    security_floor: int

    @property
    def reason(self) -> str | None:
        return self.install.reason if self.install else None


def describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:2000]


class Installer(StateHandlers):
    """Installs bundles crash-safely; see the package docstring for the interfaces."""

    def __init__(
        self,
        config: AgentConfig,
        layout: StateLayout,
        trust: TrustRoot,
        fetchers: Fetcher | Mapping[str, Fetcher] | None = None,
        reporter: Reporter | None = None,
        probe: HealthProbe | None = None,
        on_activated: OnActivated | None = None,
        clock: Clock | None = None,
        *,
        host: Host | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self.layout = layout
        self.trust = trust  # replace it when the trust root is rotated
        self.fetcher = TransportFetchers(fetchers) if isinstance(fetchers, Mapping) else fetchers
        self.reporter = reporter
        self.probe = probe
        self.on_activated = on_activated
        self.clock = clock or SystemClock()
        self.host = host or Host()
        self.rng = rng or random.Random()
        self.versions = Versions(layout, config.limits.keep_versions)
        layout.create()
        self._state = StateFile()
        self._mark: object | None = None

    # --- public entry points ---------------------------------------------------------------

    def install_directive(self, data: bytes) -> InstallStatus:
        """Verify a directive (refusing replays) and carry it out: install or roll back.

        Raises:
            InstallInProgressError: another install is running or awaits `resume()`.
            DirectiveError, SignatureError, MalformedDocumentError, TrustRootExpiredError:
                the directive is refused; nothing is persisted or reported.
            Whatever failed the install (BundleError, CompatibilityError,
                SmokeTestError, HealthCheckError, DownloadError, ...), after the
                machine has rolled back, reported and persisted FAILED.
            RollbackError: a rollback directive, and nothing to roll back to.
        """
        with self._locked():
            state = self._load_at_rest()
            directive = verify_directive(
                data,
                self.trust,
                device_id=self.config.device_id,
                last_sequence=state.last_directive_sequence,
                now=self.clock.now(),
            )
            state = state.model_copy(update={"last_directive_sequence": directive.sequence})
            if directive.action == "rollback":
                return self._start_rollback(state, directive.sequence)
            bundle = directive.bundle
            assert bundle is not None  # the schema requires it for installs
            record = self._new_record(
                "install",
                directive=directive.model_dump(mode="json", by_alias=True),
                directive_sequence=directive.sequence,
                bundle_name=bundle.name,
                bundle_version=bundle.version,
                sha256=bundle.sha256,
                length=bundle.length,
            )
            if directive.shadow:
                reason = "shadow installs are not supported by this installer: nothing was changed"
                self._start(state, record.model_copy(update={"reason": reason}), Event.REFUSE)
                raise CompatibilityError(reason)
            return self._start(state, record, Event.INSTALL)

    def install_file(self, path: Path) -> InstallStatus:
        """Install a bundle file (a USB stick): every check of a network install but the directive.

        Raises:
            UsageError: `path` is not a file.
            InstallInProgressError, and whatever failed the install (as `install_directive`).
        """
        source = Path(path).resolve()
        if not source.is_file():
            raise UsageError(f"{path} is not a bundle file")
        with self._locked():
            state = self._load_at_rest()
            record = self._new_record("install", source_file=str(source))
            return self._start(state, record, Event.INSTALL)

    def rollback(self) -> InstallStatus:
        """Serve the previous version again (`agent rollback`).

        Raises:
            RollbackError: there is no previous version; nothing changed.
            InstallInProgressError: an install is running or awaits `resume()`.
        """
        with self._locked():
            return self._start_rollback(self._load_at_rest(), None)

    def resume(self) -> InstallStatus:
        """Continue or roll back what a restart interrupted. Call it at startup,
        before the predictor loads `current`: the rollback of a model that
        crashes the process must come first. Never raises an install's error:
        the outcome is in the returned status and the reports.

        Raises:
            InstallInProgressError: another process is installing.
            InstallError: state.json cannot be read.
        """
        with self._locked():
            state = self._state = load_state(self.layout.state_file)
            record = state.install
            if record is None:
                return self.status()
            if state.state in TERMINAL:
                self._report(state)  # again: the last report may not have gone out
                self._settle(state)
                return self.status()
            # Count the restart durably before anything else can crash this boot too.
            record = record.model_copy(update={"resumes": record.resumes + 1})
            state = state.model_copy(update={"install": record})
            save_state(self.layout.state_file, state)
            self._report(state)
            target = resume_state(
                state.state, self.versions.current_id(), record.from_version, record.to_version
            )
            assert target is not None
            if record.resumes > MAX_RESUMES:
                target = State.ROLLING_BACK
                reason = f"the agent restarted {record.resumes} times during this install"
                record = record.model_copy(update={"reason": reason})
            elif target is State.ROLLING_BACK and record.reason is None:
                reason = f"interrupted in {state.state.value}; current is not what it recorded"
                record = record.model_copy(update={"reason": reason})
            self._run(self._enter(state, target, record))
            return self.status()

    def status(self) -> InstallStatus:
        """Raises: InstallError when state.json cannot be read."""
        state = load_state(self.layout.state_file)
        return InstallStatus(
            state=state.state,
            current=self.versions.current_id(),
            previous=self.versions.previous_id(),
            install=state.install,
            last_directive_sequence=state.last_directive_sequence,
            security_floor=state.security_floor,
        )

    # --- running the machine ---------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        fd = os.open(self.layout.versions, os.O_RDONLY)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise InstallInProgressError(
                    f"another installer is working on {self.layout.root}"
                ) from None
            yield
        finally:
            os.close(fd)  # releases the lock

    def _load_at_rest(self) -> StateFile:
        state = self._state = load_state(self.layout.state_file)
        if state.state not in TERMINAL:
            raise InstallInProgressError(
                f"an install is in state {state.state.value}; it continues when the agent "
                "resumes (Installer.resume)"
            )
        return state

    def _new_record(self, kind: str, **fields: object) -> InstallRecord:
        return InstallRecord.model_validate(
            {
                "kind": kind,
                "started_at": format_time(self.clock.now()),
                "from_version": self.versions.current_id(),
                "from_previous": self.versions.previous_id(),
                **fields,
            }
        )

    def _start(self, state: StateFile, record: InstallRecord, event: Event) -> InstallStatus:
        fresh = state.model_copy(update={"store_count": 0})
        _, error = self._run(self._enter(fresh, next_state(state.state, event), record))
        if error is not None:
            raise error
        return self.status()

    def _start_rollback(self, state: StateFile, directive_sequence: int | None) -> InstallStatus:
        current, previous = self.versions.current_id(), self.versions.previous_id()
        if previous is None:
            raise RollbackError("there is no previous version to roll back to")
        record = self._new_record(
            "rollback",
            directive_sequence=directive_sequence,
            to_version=previous,
            bundle_name=previous.partition("@")[0],
            bundle_version=version_of(previous),
            reason=f"rolled back from {current} to {previous} on request",
        )
        return self._start(state, record, Event.ROLLBACK)

    def _enter(self, state: StateFile, target: State, record: InstallRecord) -> StateFile:
        """Persist `target` with `record`, then report it: the first half of every step."""
        floor = state.security_floor
        if target is State.COMMITTED and record.kind == "install" and record.release_counter:
            floor = max(floor, record.release_counter)
        entered = state.model_copy(
            update={
                "state": target,
                "store_count": state.store_count + 1,
                "report_sequence": state.report_sequence + 1,
                "security_floor": floor,
                "install": record,
            }
        )
        save_state(self.layout.state_file, entered)
        self._state = entered
        self._report(entered)
        return entered

    def _run(self, state: StateFile) -> tuple[StateFile, Exception | None]:
        """Step until a terminal state; return it and the error that failed the install."""
        error: Exception | None = None
        self._mark = self.probe.mark() if self.probe is not None else None
        while state.state not in TERMINAL:
            record = state.install
            assert record is not None
            if state.store_count > MAX_STORE_COUNT and state.state is not State.ROLLING_BACK:
                error = error or InstallError(
                    f"the install stored its state {state.store_count} times: stopped a loop"
                )
                event, record = Event.FAIL, record.model_copy(update={"reason": describe(error)})
            else:
                try:
                    event, record = self.handler(state.state)(record)
                except Exception as exc:  # every failure becomes an event: see the docstring
                    event, record = self._on_error(state.state, record, exc)
                    if event is Event.FAIL:
                        error = error or exc
            state = self._enter(state, next_state(state.state, event), record)
        self._settle(state)
        return state, error

    def _on_error(self, state: State, record: InstallRecord, exc: Exception) -> Step:
        if (
            state is State.DOWNLOADING
            and isinstance(exc, DownloadError)
            and record.attempts + 1 < MAX_DOWNLOAD_ATTEMPTS
        ):
            attempts = record.attempts + 1
            reason = f"attempt {attempts} of {MAX_DOWNLOAD_ATTEMPTS} failed: {describe(exc)}"
            return Event.RETRY, record.model_copy(update={"attempts": attempts, "reason": reason})
        keep_partial = isinstance(exc, DownloadError)
        reason = describe(exc)
        if record.reason and state is State.ROLLING_BACK:
            reason = f"{record.reason}; then the rollback failed: {reason}"
        return Event.FAIL, record.model_copy(
            update={"reason": reason, "keep_partial": keep_partial}
        )

    def _report(self, state: StateFile) -> None:
        record = state.install
        if self.reporter is None or record is None:
            return
        status = StatusReport(
            device_id=self.config.device_id,
            sent_at=format_time(self.clock.now()),
            sequence=state.report_sequence,
            install_state=state.state.value,
            bundle_name=record.bundle_name,
            bundle_version=record.bundle_version,
            previous_version=version_of(record.from_version) if record.from_version else None,
            reason=record.reason[:2048] if record.reason else None,
            directive_sequence=record.directive_sequence,
        )
        self.reporter.report(status)

    def _settle(self, state: StateFile) -> None:
        """A terminal state's cleanup; idempotent, so a resume may run it again."""
        record = state.install
        if record is None or record.kind != "install":
            return
        linked = {self.versions.current_id(), self.versions.previous_id()}
        if state.state is State.FAILED and record.to_version and record.to_version not in linked:
            self.versions.remove(record.to_version)
        downloads = self.layout.downloads
        leftovers = list(downloads.glob(f"{LOCAL_COPY}*"))
        if record.sha256:
            leftovers += downloads.glob(f"{record.sha256}*")
        for path in leftovers:
            if record.keep_partial and path.name != record.sha256:
                continue  # the transport resumes it if the server sends the directive again
            path.unlink(missing_ok=True)
        self.versions.prune()
