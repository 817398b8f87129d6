"""The installer: the public entry points of the install machine, over an install context.

`Installer` builds the install context (context.py) and keeps nothing else.
Each entry point takes the state directory's lock, checks the machine is at
rest, persists the first state of an install or rollback with its record and
lets the engine (engine.py) step through the tables of states.py and the
handlers (handlers.py) until the machine rests again. `resume()` continues
what a restart interrupted, then hands the persisted challenger to
`on_shadow` again (a restarted predictor runs none); `challenger()` names it
for a predictor opened later.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from edgefleet.agent.errors import (
    CompatibilityError,
    InstallError,
    PrivatePathError,
    RollbackError,
)
from edgefleet.agent.install import engine
from edgefleet.agent.install.context import InstallContext
from edgefleet.agent.install.engine import describe
from edgefleet.agent.install.fetch import TransportFetchers
from edgefleet.agent.install.handlers import hand_challenger
from edgefleet.agent.install.interfaces import (
    Clock,
    Fetcher,
    HealthProbe,
    Host,
    OnActivated,
    OnBenchmark,
    OnDiagnostics,
    OnShadow,
    Reporter,
    SystemClock,
)
from edgefleet.agent.install.record import (
    MAX_RESUMES,
    InstallRecord,
    StateFile,
    save_state,
)
from edgefleet.agent.install.states import TERMINAL, Event, State, resume_state
from edgefleet.agent.layout import StateLayout
from edgefleet.agent.versions import InstalledVersion, Versions, name_of, version_of
from edgefleet.agentconfig import AgentConfig
from edgefleet.errors import BelowSecurityFloorError, EdgefleetError, UsageError
from edgefleet.mqtt import BundleRef, FleetTimestamp
from edgefleet.timefmt import format_time
from edgefleet.trust import TrustRoot
from edgefleet.wire import error_code

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class InstallStatus:
    """Where the machine is and what the device serves (`agent status`)."""

    state: State
    current: str | None
    previous: str | None
    install: InstallRecord | None
    last_directive_sequence: int
    security_floors: dict[str, int]  # per model name: the lowest release counter it runs
    challenger: str | None  # the version running in shadow beside `current`
    trust_root: TrustRoot  # the trust root the device verifies everything under

    @property
    def reason(self) -> str | None:
        return self.install.reason if self.install else None

    @property
    def refused(self) -> str | None:
        """The error code when the last install or rollback was refused (nothing changed)."""
        return self.install.refused if self.install else None


class Installer:
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
        on_shadow: OnShadow | None = None,
        on_diagnostics: OnDiagnostics | None = None,
        on_benchmark: OnBenchmark | None = None,
        host: Host | None = None,
        rng: random.Random | None = None,
    ) -> None:
        layout.create()
        # An interrupted install `prepare_resume` left for `finish_resume` to continue.
        self._deferred: tuple[StateFile, State, InstallRecord] | None = None
        self.context = InstallContext(
            config=config,
            layout=layout,
            trust=trust,
            versions=Versions(layout, config.limits.keep_versions),
            fetcher=TransportFetchers(fetchers) if isinstance(fetchers, Mapping) else fetchers,
            reporter=reporter,
            probe=probe,
            on_activated=on_activated,
            on_shadow=on_shadow,
            clock=clock or SystemClock(),
            host=host or Host(),
            rng=rng or random.Random(),
            on_diagnostics=on_diagnostics,
            on_benchmark=on_benchmark,
        )

    # --- the context's parts, as the agent and its tests use them ---------------------------

    @property
    def config(self) -> AgentConfig:
        return self.context.config

    @property
    def layout(self) -> StateLayout:
        return self.context.layout

    @property
    def versions(self) -> Versions:
        return self.context.versions

    @property
    def trust(self) -> TrustRoot:
        """The trust root the device verifies everything under now (as state.json holds it).

        Raises: InstallError when state.json cannot be read.
        """
        return self.context.device_trust(engine.read_state(self.context)).root

    @property
    def fetcher(self) -> Fetcher | None:
        return self.context.fetcher

    @fetcher.setter
    def fetcher(self, fetcher: Fetcher | None) -> None:
        self.context.fetcher = fetcher

    @property
    def on_activated(self) -> OnActivated | None:
        return self.context.on_activated

    @on_activated.setter
    def on_activated(self, on_activated: OnActivated | None) -> None:
        self.context.on_activated = on_activated

    @property
    def on_shadow(self) -> OnShadow | None:
        return self.context.on_shadow

    @on_shadow.setter
    def on_shadow(self, on_shadow: OnShadow | None) -> None:
        self.context.on_shadow = on_shadow

    # --- public entry points ---------------------------------------------------------------

    def install_directive(self, data: bytes) -> InstallStatus:
        """Verify a directive (refusing replays) and carry it out: install, shadow, roll back,
        answer a diagnostics request (`on_diagnostics`) or take a benchmark request
        (`on_benchmark`), each after the sequence is persisted, the machine's state left as
        it was.

        A shadow directive stages and smoke-tests the bundle as an install does,
        then makes it the challenger (`on_shadow`) instead of switching `current`.

        Raises:
            InstallInProgressError: another install is running or awaits `resume()`.
            DirectiveError, SignatureError, MalformedDocumentError, TrustRootExpiredError:
                the directive is refused; nothing is persisted or reported.
            Whatever failed the install (BundleError, CompatibilityError,
                SmokeTestError, HealthCheckError, DownloadError, ...), after the
                machine has rolled back, reported and persisted FAILED.
            CompatibilityError: a shadow directive, and nothing is served to compare it
                with (refused: reported `refused`, nothing changed).
            BelowSecurityFloorError: a rollback directive to a version below its name's
                security floor (refused: reported `refused`, nothing changed).
            RollbackError: a rollback directive, and nothing to roll back to.
        """
        context = self.context
        with engine.locked(context):
            state = engine.read_state_at_rest(context)
            directive, trust = context.device_trust(state).accept_directive(
                data, device_id=context.config.device_id, now=context.clock.now()
            )
            state = state.with_trust(trust.snapshot())
            if directive.action in ("diagnostics", "benchmark"):
                self._persist(state)  # spent: a replay is refused
                answer = (
                    context.on_diagnostics
                    if directive.action == "diagnostics"
                    else context.on_benchmark
                )
                if answer is not None:
                    answer(directive)
                return self.status()
            if directive.action == "rollback":
                return self._start_rollback(state, directive.sequence, directive.bundle)
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
                shadow=directive.shadow,
            )
            if directive.shadow and record.from_version is None:
                self._refuse(
                    state,
                    record,
                    CompatibilityError(
                        "a shadow install needs a version being served to compare it with"
                    ),
                )
            return self._start(state, record, Event.INSTALL)

    def accept_trust_root(self, data: bytes) -> TrustRoot:
        """Trust root version N+1, persisted in state.json before anything trusts it.

        From then on everything (directives, fleet timestamps, bundles) is verified
        under it. Allowed while an install awaits `resume()`: only the trust changes.

        Raises:
            MalformedDocumentError, TrustRootVersionError, TrustRootSignatureError:
                refused; nothing is persisted.
            InstallInProgressError: another installer holds the state directory.
        """
        context = self.context
        with engine.locked(context):
            state = engine.read_state(context)
            trust = context.device_trust(state).accept_root(data)
            self._persist(state.with_trust(trust.snapshot()))
            return trust.root

    def accept_fleet_timestamp(self, data: bytes) -> FleetTimestamp:
        """A fleet timestamp above the last accepted one (or that one again); its sequence
        is persisted, so that after a restart an older one is refused.

        Raises:
            MalformedDocumentError, SignatureError, FleetTimestampError,
                TrustRootExpiredError: refused; nothing is persisted.
            InstallInProgressError: another installer holds the state directory.
        """
        context = self.context
        with engine.locked(context):
            state = engine.read_state(context)
            stamp, trust = context.device_trust(state).accept_fleet_timestamp(
                data, now=context.clock.now()
            )
            if trust.timestamp_sequence != state.fleet_timestamp_sequence:
                self._persist(state.with_trust(trust.snapshot()))
            return stamp

    def _persist(self, state: StateFile) -> None:
        save_state(self.context.layout.state_file, state)
        self.context.persisted = state

    def install_file(self, path: Path) -> InstallStatus:
        """Install a bundle file (a USB stick): every check of a network install but the directive.

        Raises:
            UsageError: `path` is not a file.
            PrivatePathError: `path` (symlinks resolved) is inside the state directory: the
                agent's own key and state are never copied out as a bundle.
            InstallInProgressError, and whatever failed the install (as `install_directive`).
        """
        source = Path(path).resolve()
        if source.is_relative_to(self.layout.root.resolve()):
            raise PrivatePathError(
                f"{path} is inside the agent's state directory {self.layout.root}: "
                "install from a bundle file outside it"
            )
        if not source.is_file():
            raise UsageError(f"{path} is not a bundle file")
        return self._install_from(source)

    def install_upload(self, path: Path) -> InstallStatus:
        """Install a bundle the local API received: a file it wrote directly in downloads/
        (never a path a caller named). The API removes it when the install ends; its name
        starts with the local copy's, so an install's cleanup removes one a crash left.

        Raises:
            InstallInProgressError, and whatever failed the install (as `install_directive`).
        """
        assert path.parent == self.layout.downloads, path
        return self._install_from(path)

    def _install_from(self, source: Path) -> InstallStatus:
        with engine.locked(self.context):
            state = engine.read_state_at_rest(self.context)
            record = self._new_record("install", source_file=str(source))
            return self._start(state, record, Event.INSTALL)

    def rollback(self) -> InstallStatus:
        """Serve the previous version again (`agent rollback`); stops the challenger too.

        Without a previous version but with a challenger, only the challenger stops.

        Raises:
            RollbackError: there is no previous version and no challenger; nothing changed.
            BelowSecurityFloorError: the previous version is below its name's security
                floor (refused: reported `refused`, nothing changed).
            InstallInProgressError: an install is running or awaits `resume()`.
        """
        with engine.locked(self.context):
            return self._start_rollback(engine.read_state_at_rest(self.context), None)

    def resume(self) -> InstallStatus:
        """Continue or roll back what a restart interrupted: `prepare_resume()`, then
        `finish_resume()`. Never raises an install's error: the outcome is in the
        returned status and the reports.

        Raises:
            InstallInProgressError: another process is installing.
            InstallError: state.json cannot be read.
        """
        self.prepare_resume()
        return self.finish_resume()

    def prepare_resume(self) -> State | None:
        """The half of a resume that must come before the predictor loads `current`:
        count the restart durably (before anything else can crash this boot too), and
        roll back now when the install must be (more than MAX_RESUMES restarts: a model
        that crashes the process; `current` not what was recorded). The state an install
        was interrupted in, when it continues in `finish_resume()` (called once the
        predictor serves, so that a health check sees live traffic); None when nothing
        is left to continue. A terminal state is reported again and settled, and the
        challenger (if any) handed to `on_shadow` again.

        Raises:
            InstallInProgressError: another process is installing.
            InstallError: state.json cannot be read.
        """
        context = self.context
        self._deferred = None
        with engine.locked(context):
            state = context.persisted = engine.read_state(context)
            record = state.install
            if record is None:
                return None
            if state.state in TERMINAL:
                engine.report(context, state)  # again: the last report may not have gone out
                engine.settle(context, state)
                self._hand_challenger_again()
                return None
            record = record.model_copy(update={"resumes": record.resumes + 1})
            state = state.model_copy(update={"install": record})
            save_state(context.layout.state_file, state)
            engine.report(context, state)
            target = resume_state(
                state.state, context.versions.current_id(), record.from_version, record.to_version
            )
            assert target is not None
            if record.resumes > MAX_RESUMES:
                target = State.ROLLING_BACK
                reason = f"the agent restarted {record.resumes} times during this install"
                record = record.model_copy(update={"reason": reason})
            elif target is State.ROLLING_BACK and record.reason is None:
                reason = f"interrupted in {state.state.value}; current is not what it recorded"
                record = record.model_copy(update={"reason": reason})
            if target is State.ROLLING_BACK:
                engine.run(context, engine.enter(context, state, target, record))
                self._hand_challenger_again()
                return None
            self._deferred = (state, target, record)
            return state.state

    def finish_resume(self) -> InstallStatus:
        """Continue the install `prepare_resume()` left to continue, if any.

        Raises:
            InstallInProgressError: another process is installing.
        """
        deferred, self._deferred = self._deferred, None
        if deferred is None:
            return self.status()
        context = self.context
        with engine.locked(context):
            state, target, record = deferred
            context.persisted = state
            engine.run(context, engine.enter(context, state, target, record))
            self._hand_challenger_again()
            return self.status()

    def _hand_challenger_again(self) -> None:
        """After a restart the predictor runs no challenger: hand it the persisted one."""
        challenger, handed = self.context.persisted.challenger, self.context.handed
        if challenger is None or (handed and handed[-1] == challenger):
            return
        try:
            hand_challenger(self.context, challenger)
        except Exception as exc:  # a shadow run is an experiment: never fail a resume for it
            log.warning("the challenger %s was not handed over: %s", challenger, describe(exc))

    def challenger(self) -> InstalledVersion | None:
        """The version running in shadow beside `current`, or None.

        The agent asks after opening its predictor (which `resume()` precedes)
        and passes it to `Predictor.set_challenger`.

        Raises:
            InstallError: state.json cannot be read, or the challenger's directory
                is gone or damaged.
        """
        id_ = engine.read_state(self.context).challenger
        return None if id_ is None else self.versions.load(id_)

    def status(self) -> InstallStatus:
        """Raises: InstallError when state.json cannot be read."""
        state = engine.read_state(self.context)
        return InstallStatus(
            state=state.state,
            current=self.versions.current_id(),
            previous=self.versions.previous_id(),
            install=state.install,
            last_directive_sequence=state.last_directive_sequence,
            security_floors=dict(state.security_floors),
            challenger=state.challenger,
            trust_root=self.context.device_trust(state).root,
        )

    # --- starting an install or a rollback ---------------------------------------------------

    def _new_record(self, kind: str, **fields: object) -> InstallRecord:
        return InstallRecord.model_validate(
            {
                "kind": kind,
                "started_at": format_time(self.context.clock.now()),
                "from_version": self.versions.current_id(),
                "from_previous": self.versions.previous_id(),
                "from_challenger": self.context.persisted.challenger,
                **fields,
            }
        )

    def _start(self, state: StateFile, record: InstallRecord, event: Event) -> InstallStatus:
        context = self.context
        fresh = state.model_copy(update={"store_count": 0})
        target = engine.next_after(context, state.state, event)
        _, error = engine.run(context, engine.enter(context, fresh, target, record))
        if error is not None:
            raise error
        return self.status()

    def _refuse(self, state: StateFile, record: InstallRecord, error: EdgefleetError) -> NoReturn:
        """Persist and report a directive or rollback refused at rest, then raise `error`."""
        update = {"reason": describe(error), "refused": error_code(error)}
        self._start(state, record.model_copy(update=update), Event.REFUSE)
        raise error

    def _start_rollback(
        self,
        state: StateFile,
        directive_sequence: int | None,
        rolling_back: BundleRef | None = None,
    ) -> InstallStatus:
        """Roll back to the previous version, or keep the current one when a rollback
        directive names a bundle (`rolling_back`) that this device does not serve: the
        server rolls back every device a rollout may have reached, and one whose install
        never happened must not go one version further back."""
        current, previous = self.versions.current_id(), self.versions.previous_id()
        challenger = state.challenger
        if previous is None and challenger is None and rolling_back is None:
            raise RollbackError("there is no previous version to roll back to")
        target: str | None
        if rolling_back is not None and not _is_version(current, rolling_back):
            if current is None:
                raise RollbackError(
                    f"nothing is served; nothing to roll back from "
                    f"{rolling_back.name}@{rolling_back.version}"
                )
            target = current
            reason = (
                f"rollback from {rolling_back.name}@{rolling_back.version} not needed: "
                f"{current} is served and kept"
            )
        elif previous is None:  # the links stay as they are (restore is absolute)
            target = current
            reason = f"there is no previous version to roll back to; {current} is kept"
        else:
            target = previous
            reason = f"rolled back from {current} to {previous} on request"
        if challenger is not None:
            reason += f"; the challenger {challenger} stopped"
        record = self._new_record(
            "rollback",
            directive_sequence=directive_sequence,
            to_version=target,
            bundle_name=name_of(target) if target else None,
            bundle_version=version_of(target) if target else None,
            reason=reason,
        )
        if target is not None and target != current:
            below = self._below_floor(state, target)
            if below is not None:
                self._refuse(state, record, below)
        return self._start(state, record, Event.ROLLBACK)

    def _below_floor(self, state: StateFile, id_: str) -> BelowSecurityFloorError | None:
        """The refusal of activating version `id_` when it is below its name's floor.

        A damaged version is not judged here: ROLLING_BACK fails on it and reports why.
        """
        try:
            version = self.versions.load(id_)
        except InstallError:
            return None
        floor = state.floor_of(version.name)
        if version.release_counter >= floor:
            return None
        return BelowSecurityFloorError(
            f"rolling back to {version.name}@{version.version} (release counter "
            f"{version.release_counter}) would run a version below the security floor {floor} "
            f"of {version.name}: install a release at or above the floor instead"
        )


def _is_version(version_id_: str | None, bundle: BundleRef) -> bool:
    """True when the version id (`name@version-digest`) is `bundle`'s name and version."""
    if version_id_ is None:
        return False
    return name_of(version_id_) == bundle.name and version_of(version_id_) == bundle.version
