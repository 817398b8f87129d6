"""The engine under the installer: runs the tables of states.py, persisting before each handler.

One step, always in this order:

    persist state.json (atomic; store and report counters + 1; the challenger)
    -> report the state (Reporter)
    -> run the state's handler -> an event
    -> TRANSITIONS[(state, event)] is the next state

A handler's exception becomes an event here and nowhere else: a DownloadError
while attempts are left is RETRY (jittered exponential backoff, persisted
attempt counter); refused input (an UntrustedInputError: a bundle that fails
verification, a version below its security floor) before anything was switched
is REFUSE, which leaves the machine resting as before (`states.refused_state`)
and is reported with the install state `refused`; any other exception is FAIL.
The reported reason is the error's code (as the CLI prints it: `tampered-file`,
`smoke-test`) and its message. Before activation or shadowing FAIL ends in
FAILED (nothing was switched), after it in ROLLING_BACK. Terminal states then
clean up: remove the downloaded file, remove a staged version that failed,
prune to keep N (sparing the challenger).

An exception while persisting or reporting (a full disk, a broken outbox) is
not an event: it propagates to the caller, state.json keeps the last state
written, and `resume()` continues from there.

The challenger (the version a shadow install runs beside `current`) is kept
in state.json and written by `_enter` with the state that changes it (see
record.py), so it follows the same rule: persisted first, then handed to
`on_shadow` by the state's handler.

Only one installer runs on a state directory at a time: each public call holds
an exclusive flock on versions/ (released by the kernel when a process dies).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from collections.abc import Iterator

from edgefleet.agent.errors import DownloadError, InstallError, InstallInProgressError
from edgefleet.agent.install.fetch import MAX_DOWNLOAD_ATTEMPTS
from edgefleet.agent.install.handlers import LOCAL_COPY, StateHandlers, Step
from edgefleet.agent.install.interfaces import Reporter
from edgefleet.agent.install.record import (
    MAX_STORE_COUNT,
    InstallRecord,
    StateFile,
    load_state,
    save_state,
)
from edgefleet.agent.install.states import (
    REFUSABLE,
    REFUSED,
    TERMINAL,
    Event,
    State,
    next_state,
    refused_state,
)
from edgefleet.agent.versions import name_of, version_of
from edgefleet.cli.errors import error_code
from edgefleet.errors import EdgefleetError, UntrustedInputError
from edgefleet.mqtt import StatusReport
from edgefleet.timefmt import format_time


def describe(exc: BaseException) -> str:
    """`code: message`, the code as the CLI prints it (`unknown-key`, `smoke-test`)."""
    code = error_code(exc) if isinstance(exc, (EdgefleetError, OSError)) else "internal"
    return f"{code}: {exc}"[:2000]


log = logging.getLogger(__name__)


class Engine(StateHandlers):
    """Steps the machine; `Installer` (machine.py) adds the public entry points."""

    reporter: Reporter | None

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

    def _load_state(self) -> StateFile:
        """Raises: InstallError when state.json cannot be read."""
        current = self.versions.current_id()
        served = name_of(current) if current else None
        return load_state(self.layout.state_file, served, self._rollback_counter(served))

    def _rollback_counter(self, served: str | None) -> int | None:
        """The release counter of `previous` when it is a version of the served model."""
        previous = self.versions.previous_id()
        if served is None or previous is None or name_of(previous) != served:
            return None
        try:
            return self.versions.load(previous).release_counter
        except InstallError:
            return None  # a damaged previous version: nothing to roll back to

    def _load_at_rest(self) -> StateFile:
        state = self._state = self._load_state()
        if state.state not in TERMINAL:
            raise InstallInProgressError(
                f"an install is in state {state.state.value}; it continues when the agent "
                "resumes (Installer.resume)"
            )
        return state

    def _enter(self, state: StateFile, target: State, record: InstallRecord) -> StateFile:
        """Persist `target` with `record`, then report it: the first half of every step."""
        entered = state.model_copy(
            update={
                "state": target,
                "store_count": state.store_count + 1,
                "report_sequence": state.report_sequence + 1,
                "security_floors": record.floors_on_entering(target, state.security_floors),
                "challenger": record.challenger_on_entering(target, state.challenger),
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
                    if event in (Event.FAIL, Event.REFUSE):
                        error = error or exc
            state = self._enter(state, self._next(state.state, event), record)
        self._settle(state)
        return state, error

    def _next(self, state: State, event: Event) -> State:
        if event is Event.REFUSE:
            return refused_state(state, serving=self.versions.current_id() is not None)
        return next_state(state, event)

    def _on_error(self, state: State, record: InstallRecord, exc: Exception) -> Step:
        if (
            state is State.DOWNLOADING
            and isinstance(exc, DownloadError)
            and record.attempts + 1 < MAX_DOWNLOAD_ATTEMPTS
        ):
            attempts = record.attempts + 1
            reason = f"attempt {attempts} of {MAX_DOWNLOAD_ATTEMPTS} failed: {describe(exc)}"
            return Event.RETRY, record.model_copy(update={"attempts": attempts, "reason": reason})
        if isinstance(exc, UntrustedInputError) and state in REFUSABLE:
            return Event.REFUSE, record.model_copy(
                update={"reason": describe(exc), "refused": error_code(exc)}
            )
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
        refused = record.refused is not None and state.state in TERMINAL
        status = StatusReport(
            device_id=self.config.device_id,
            sent_at=format_time(self.clock.now()),
            sequence=state.report_sequence,
            install_state=REFUSED if refused else state.state.value,
            bundle_name=record.bundle_name,
            bundle_version=record.bundle_version,
            previous_version=version_of(record.from_version) if record.from_version else None,
            reason=record.reason[:2048] if record.reason else None,
            directive_sequence=record.directive_sequence,
        )
        self.reporter.report(status)

    def _forget_previous_below_its_floor(self, state: StateFile) -> None:
        """Unlink `previous` when a floor its release committed lies above it.

        It could no longer be rolled back to, and must not answer as the fallback
        chain's previous step either; pruning then removes it like any old version.
        """
        previous_id = self.versions.previous_id()
        if previous_id is None:
            return
        try:
            previous = self.versions.load(previous_id)
        except InstallError:
            return  # a damaged version: the predictor leaves it out already
        if previous.release_counter >= state.floor_of(previous.name):
            return
        current = self.versions.current()
        self.versions.restore(current, None)
        log.info(
            "%s is below the security floor of %s: no longer kept as the previous version",
            previous.id,
            previous.name,
        )
        if self.on_activated is not None and current is not None:
            self.on_activated(current)  # the predictor drops its previous step

    def _settle(self, state: StateFile) -> None:
        """A terminal state's cleanup; idempotent, so a resume may run it again."""
        record = state.install
        if record is None or record.kind != "install":
            return
        if state.state is State.COMMITTED:
            self._forget_previous_below_its_floor(state)
        kept = {self.versions.current_id(), self.versions.previous_id(), state.challenger}
        if state.state is State.FAILED and record.to_version and record.to_version not in kept:
            self.versions.remove(record.to_version)
        downloads = self.layout.downloads
        leftovers = list(downloads.glob(f"{LOCAL_COPY}*"))
        if record.sha256:
            leftovers += downloads.glob(f"{record.sha256}*")
        for path in leftovers:
            if record.keep_partial and path.name != record.sha256:
                continue  # the transport resumes it if the server sends the directive again
            path.unlink(missing_ok=True)
        self.versions.prune(protect=[state.challenger])
