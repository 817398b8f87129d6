"""The engine: runs the tables of states.py over an install context, persisting before each handler.

One step, always in this order:

    persist state.json (atomic; store and report counters + 1; the challenger)
    -> report the state (the context's Reporter)
    -> run the state's handler (HANDLERS in handlers.py) -> an event
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
in state.json and written by `enter` with the state that changes it (see
record.py), so it follows the same rule: persisted first, then handed to
`on_shadow` by the state's handler.

Only one installer runs on a state directory at a time: each public call holds
an exclusive flock on versions/ (`locked`; released by the kernel when a
process dies).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from collections.abc import Iterator

from edgefleet.agent.errors import DownloadError, InstallError, InstallInProgressError
from edgefleet.agent.install.context import InstallContext
from edgefleet.agent.install.fetch import MAX_DOWNLOAD_ATTEMPTS
from edgefleet.agent.install.handlers import HANDLERS, LOCAL_COPY, Step
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
from edgefleet.errors import EdgefleetError, UntrustedInputError
from edgefleet.mqtt import StatusReport
from edgefleet.timefmt import format_time
from edgefleet.wire import error_code

log = logging.getLogger(__name__)


def describe(exc: BaseException) -> str:
    """`code: message`, the code as the CLI prints it (`unknown-key`, `smoke-test`)."""
    code = error_code(exc) if isinstance(exc, (EdgefleetError, OSError)) else "internal"
    return f"{code}: {exc}"[:2000]


@contextlib.contextmanager
def locked(context: InstallContext) -> Iterator[None]:
    """Hold the state directory for one public call, which starts afresh.

    Raises: InstallInProgressError when another installer holds it.
    """
    fd = os.open(context.layout.versions, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InstallInProgressError(
                f"another installer is working on {context.layout.root}"
            ) from None
        context.start_call()
        yield
    finally:
        os.close(fd)  # releases the lock


def read_state(context: InstallContext) -> StateFile:
    """Raises: InstallError when state.json cannot be read."""
    versions = context.versions
    current = versions.current_id()
    served = name_of(current) if current else None
    return load_state(context.layout.state_file, served, _rollback_counter(context, served))


def _rollback_counter(context: InstallContext, served: str | None) -> int | None:
    """The release counter of `previous` when it is a version of the served model."""
    previous = context.versions.previous_id()
    if served is None or previous is None or name_of(previous) != served:
        return None
    try:
        return context.versions.load(previous).release_counter
    except InstallError:
        return None  # a damaged previous version: nothing to roll back to


def read_state_at_rest(context: InstallContext) -> StateFile:
    """The persisted state, kept in the context.

    Raises: InstallInProgressError when an install is in flight (it awaits `resume()`).
    """
    state = context.persisted = read_state(context)
    if state.state not in TERMINAL:
        raise InstallInProgressError(
            f"an install is in state {state.state.value}; it continues when the agent "
            "resumes (Installer.resume)"
        )
    return state


def enter(
    context: InstallContext, state: StateFile, target: State, record: InstallRecord
) -> StateFile:
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
    save_state(context.layout.state_file, entered)
    context.persisted = entered
    report(context, entered)
    return entered


def run(context: InstallContext, state: StateFile) -> tuple[StateFile, Exception | None]:
    """Step until a terminal state; return it and the error that failed the install."""
    error: Exception | None = None
    context.mark = context.probe.mark() if context.probe is not None else None
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
                event, record = HANDLERS[state.state](context, record)
            except Exception as exc:  # every failure becomes an event: see the docstring
                event, record = _on_error(state.state, record, exc)
                if event in (Event.FAIL, Event.REFUSE):
                    error = error or exc
        state = enter(context, state, next_after(context, state.state, event), record)
    settle(context, state)
    return state, error


def next_after(context: InstallContext, state: State, event: Event) -> State:
    if event is Event.REFUSE:
        return refused_state(state, serving=context.versions.current_id() is not None)
    return next_state(state, event)


def _on_error(state: State, record: InstallRecord, exc: Exception) -> Step:
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
    return Event.FAIL, record.model_copy(update={"reason": reason, "keep_partial": keep_partial})


def report(context: InstallContext, state: StateFile) -> None:
    """Send the status report of `state` (again, after a restart: the same sequence)."""
    record = state.install
    if context.reporter is None or record is None:
        return
    refused = record.refused is not None and state.state in TERMINAL
    status = StatusReport(
        device_id=context.config.device_id,
        sent_at=format_time(context.clock.now()),
        sequence=state.report_sequence,
        install_state=REFUSED if refused else state.state.value,
        bundle_name=record.bundle_name,
        bundle_version=record.bundle_version,
        previous_version=version_of(record.from_version) if record.from_version else None,
        reason=record.reason[:2048] if record.reason else None,
        directive_sequence=record.directive_sequence,
    )
    context.reporter.report(status)


def _forget_previous_below_its_floor(context: InstallContext, state: StateFile) -> None:
    """Unlink `previous` when a floor its release committed lies above it.

    It could no longer be rolled back to, and must not answer as the fallback
    chain's previous step either; pruning then removes it like any old version.
    """
    versions = context.versions
    previous_id = versions.previous_id()
    if previous_id is None:
        return
    try:
        previous = versions.load(previous_id)
    except InstallError:
        return  # a damaged version: the predictor leaves it out already
    if previous.release_counter >= state.floor_of(previous.name):
        return
    current = versions.current()
    versions.restore(current, None)
    log.info(
        "%s is below the security floor of %s: no longer kept as the previous version",
        previous.id,
        previous.name,
    )
    if context.on_activated is not None and current is not None:
        context.on_activated(current)  # the predictor drops its previous step


def settle(context: InstallContext, state: StateFile) -> None:
    """A terminal state's cleanup; idempotent, so a resume may run it again."""
    record = state.install
    if record is None or record.kind != "install":
        return
    versions = context.versions
    if state.state is State.COMMITTED:
        _forget_previous_below_its_floor(context, state)
    kept = {versions.current_id(), versions.previous_id(), state.challenger}
    if state.state is State.FAILED and record.to_version and record.to_version not in kept:
        versions.remove(record.to_version)
    downloads = context.layout.downloads
    leftovers = list(downloads.glob(f"{LOCAL_COPY}*"))
    if record.sha256:
        leftovers += downloads.glob(f"{record.sha256}*")
    for path in leftovers:
        if record.keep_partial and path.name != record.sha256:
            continue  # the transport resumes it if the server sends the directive again
        path.unlink(missing_ok=True)
    versions.prune(protect=[state.challenger])
