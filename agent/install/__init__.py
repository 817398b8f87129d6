"""Crash-safe installs: a persisted state machine that the agent resumes after any power cut.

    installer = Installer(config, layout, trust, fetcher, reporter, probe, on_activated,
                          on_shadow=predictor_set_challenger)
    installer.resume()                     # prepare_resume() + finish_resume()
    installer.prepare_resume()             # at startup, BEFORE the predictor loads `current`
    installer.finish_resume()              # once the predictor serves: the install goes on
    installer.challenger()                 # after the predictor opened: the version in shadow
    installer.install_directive(payload)   # a directive from MQTT (bytes as received)
    installer.install_file(path)           # `agent install BUNDLE_FILE` (no agent running)
    installer.install_upload(path)         # the same, for a bundle the local API received
    installer.rollback()                   # `agent rollback`
    installer.status()                     # `agent status`

Built by composition, as the Mender client is: states and transitions are
tables in `states.py` (one row per transition) with the resume table beside
them; `handlers.py` holds the table of handlers, one function per working state
(context, record) -> (event, record); `context.py` is the install context they
all take (configuration, layout, versions, trust, fetcher, reporter, probe,
callbacks, clock, host); `engine.py` steps the tables over a context (persist,
report, handle, transition); `machine.py` is `Installer`, the public entry
points; `record.py` is the state.json format; `versions.py`
(edgefleet.agent.versions) owns versions/ and the current/previous links.

Shadow installs (a directive with `shadow: true`): DOWNLOADING .. SMOKE_TESTING
as an install, then SHADOWING instead of ACTIVATING, then COMMITTED with a
reason saying the bundle runs in shadow. `current` and `previous` never move;
the staged version becomes the challenger, persisted in state.json (so pruning
spares it and a restart hands it over again) and handed to `on_shadow`. A
challenger is replaced by the next shadow install, and cleared by a normal
install of the same bundle (a promotion: it is served from then on) or by a
rollback (directive or `agent rollback`); an install or shadow install that
fails after changing it rolls it back to what it was. A normal install of
another bundle leaves it running beside the new `current`. A shadow directive
on a device that serves nothing is refused (nothing to compare with).

Interfaces for the parts others build (all in `interfaces.py`, all Protocols):

- `Fetcher.fetch(directive: Directive, destination: Path) -> Path`: a
  transport. Writes the bundle the directive names at `destination`
  (`downloads/<sha256>`) only once its length and SHA-256 are the directive's;
  resumes `<sha256>.part`/`.blocks`; raises DownloadError (transient: retried
  with jittered exponential backoff, MAX_DOWNLOAD_ATTEMPTS in all, the partial
  file kept) or an UntrustedInputError (fatal). Pass one Fetcher (the
  transports' SourcesFetcher) or a mapping {transport: Fetcher}. `agent install`
  uses `LocalFileFetcher`. A fetcher that checks the length and SHA-256 itself
  says so (`checks_digest = True`, as the transports do): the installer then
  does not hash the file again; from any other it checks the file in VERIFYING.
- `Reporter.report(status: StatusReport) -> None`: the MQTT outbox. One report
  per transition, after the state is persisted and before its handler runs,
  numbered by a per-device `sequence` kept in state.json. At-least-once: after
  a restart the last report is sent again with the same sequence (deduplicate
  by sequence). `install_state` is the State's value: idle, downloading,
  verifying, checking, staging, smoke_testing, activating, health_checking,
  shadowing, committed, rolling_back, failed; or `refused` for the report of
  a refusal, after which the machine rests as before (see engine.py).
  `reason` explains FAILED, a refusal, ROLLING_BACK, a retry, the health note
  of COMMITTED, or that it runs in shadow; it starts with the error's code as
  the CLI prints it (`tampered-file: ...`).
- `HealthProbe.mark() -> object`, `HealthProbe.since(mark) -> HealthSnapshot(
  requests, errors, fallbacks, latency_p95_ms)`: the predictor's counters. The
  installer marks at the start of a run; the traffic until the end of the smoke
  test is the previous version's baseline; after activation it marks again and
  waits up to `health.duration_seconds` for `health.min_requests` requests.
  Without a probe (no predictor running, e.g. `agent install` on an idle
  device) the install commits with a note saying it was not checked; with a
  probe but no traffic at all it commits too, with a note (see health.py).
- `on_activated(version: InstalledVersion | None) -> None`: called after
  `current` changed (activation, rollback) so the predictor reloads; None when
  a rollback of the very first install left nothing installed.
- `on_shadow(version: InstalledVersion | None) -> None`: called after the
  challenger changed (SHADOWING, a promotion, a rollback), and by `resume()`
  for the persisted one, so the predictor runs it beside `current`
  (`Predictor.set_challenger(version.directory)`); None stops it. When it
  raises in SHADOWING the shadow install fails and the previous challenger is
  handed back.
- `Clock` (now, monotonic, sleep) and `Host` (free disk, available memory,
  importable runtimes): injected by tests; the defaults ask the system.

Errors: directive refusals and bundle refusals are the core's (edgefleet.errors)
unchanged; the agent's own are CompatibilityError, SmokeTestError,
HealthCheckError, DownloadError, InstallInProgressError, RollbackError. An
install that fails raises its error to the caller of install_* after the
machine has rolled back, persisted FAILED and reported why; a refused one
(a bundle the core refuses, a version below its security floor) after the
machine persisted the refusal, resting as before, and reported it `refused`.
resume() never raises an install's error (it is in the status and the reports).

Security floors (state.json `security_floors`, one per model name): nothing
below its name's floor is installed or rolled back to; a release stating a
floor in its signed manifest raises its name's floor when it commits.
"""

from edgefleet.agent.install.fetch import LocalFileFetcher, TransportFetchers
from edgefleet.agent.install.health import judge_health
from edgefleet.agent.install.interfaces import (
    Clock,
    Fetcher,
    HealthProbe,
    HealthSnapshot,
    Host,
    OnActivated,
    OnShadow,
    Reporter,
    SystemClock,
)
from edgefleet.agent.install.machine import Installer, InstallStatus
from edgefleet.agent.install.record import InstallRecord, StateFile, load_state
from edgefleet.agent.install.smoke import run_smoke_test
from edgefleet.agent.install.states import RESUME, TERMINAL, TRANSITIONS, Event, State

__all__ = [
    "RESUME",
    "TERMINAL",
    "TRANSITIONS",
    "Clock",
    "Event",
    "Fetcher",
    "HealthProbe",
    "HealthSnapshot",
    "Host",
    "InstallRecord",
    "InstallStatus",
    "Installer",
    "LocalFileFetcher",
    "OnActivated",
    "OnShadow",
    "Reporter",
    "State",
    "StateFile",
    "SystemClock",
    "TransportFetchers",
    "judge_health",
    "load_state",
    "run_smoke_test",
]
