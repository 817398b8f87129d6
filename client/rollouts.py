"""`edgefleet rollout`: start a staged rollout, watch it, pause, resume or abort it."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import IO, Any

import click

from edgefleet.cli.errors import EXIT_REFUSED
from edgefleet.cli.options import echo_json, echo_table, json_option
from edgefleet.client.api import ApiClient, JsonObject
from edgefleet.client.errors import ServerUnreachableError
from edgefleet.client.options import cell, client_command, parse_bundle_ref
from edgefleet.errors import UsageError
from edgefleet.plantext import MAX_PLAN_BYTES, parse_plan_text
from edgefleet.timefmt import format_time, utcnow
from edgefleet.wire import RateLimitedError

# A rollout in one of these states changes no more.
FINAL_STATES = frozenset({"completed", "aborted"})

reason_option = click.option(
    "--reason", help="Why: kept in the rollout's history and the audit log."
)


@click.group()
def rollout() -> None:
    """Roll a bundle out to the fleet in stages, each judged by gates.

    \b
    edgefleet rollout start --bundle demo@1.2.0 --select 'site=berlin' --plan plan.yaml
    edgefleet rollout status 3 --watch
    The plan's format, the gates and their defaults: docs/rollouts.md.
    """


@rollout.command("start")
@click.option(
    "--bundle", "bundle_ref", required=True, metavar="NAME@VERSION", help="A pushed bundle."
)
@click.option(
    "--select",
    "selector",
    metavar="TAG=VALUE,...",
    help="Devices whose tags all match; default every device the bundle supports.",
)
@click.option(
    "--plan",
    "plan_path",
    required=True,
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="The plan: stages and gates, in YAML or JSON (docs/rollouts.md).",
)
@json_option
@client_command
def start_command(
    client: ApiClient, bundle_ref: str, selector: str | None, plan_path: Path, as_json: bool
) -> None:
    """Start a rollout; prints its id alone on stdout, what started on stderr.

    \b
      id=$(edgefleet rollout start --bundle demo@1.2.0 --plan plan.yaml)
      edgefleet rollout status "$id" --watch

    The plan file is read here and sent as data; the server validates it
    (an impossible plan is refused with the field named) and picks the
    devices: enrolled, tags matching --select, hardware profile supported by
    the bundle.
    """
    parse_bundle_ref(bundle_ref)
    plan = load_plan_file(plan_path)
    status = client.start_rollout(bundle_ref, selector, plan)
    if as_json:
        echo_json(status)
        return
    click.echo(status.get("id"))
    click.echo(f"started rollout {status.get('id')}: {summary_line(status)}", err=True)
    click.echo(f"watch it: edgefleet rollout status {status.get('id')} --watch", err=True)


def load_plan_file(path: Path) -> Any:
    """The plan file's content as data (YAML is a superset of JSON), read as the
    server reads plan text (`edgefleet.plantext`: size, aliases, depth and
    non-finite numbers refused).

    Raises: UsageError when it is not such YAML, or not a mapping.
    """
    with path.open("rb") as handle:
        data = handle.read(MAX_PLAN_BYTES + 1)
    if len(data) > MAX_PLAN_BYTES:
        raise UsageError(f"plan {path}: longer than {MAX_PLAN_BYTES} bytes")
    try:
        plan = parse_plan_text(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise UsageError(f"plan {path}: not UTF-8 text") from None
    except ValueError as exc:
        raise UsageError(f"plan {path}: {exc}") from None
    if not isinstance(plan, dict):
        raise UsageError(
            f"plan {path}: expected a mapping with 'stages', e.g. "
            "stages: [{percent: 10}, {percent: 100}]"
        )
    return plan


@rollout.command("list")
@click.option("--state", help="Only rollouts in this state (running, paused, completed, ...).")
@json_option
@client_command
def list_command(client: ApiClient, state: str | None, as_json: bool) -> None:
    """Rollouts, newest first."""
    rows = client.list_rollouts(state)
    if as_json:
        echo_json(rows)
        return
    if not rows:
        click.echo("no rollouts" + (f" in state {state}" if state else ""))
        return
    echo_table(
        ["ID", "BUNDLE", "STATE", "STAGE", "BY", "UPDATED", "REASON"],
        [
            [
                row.get("id"),
                cell(row.get("bundle")),
                cell(row.get("state")),
                _stage_text(row),
                cell(row.get("created_by")),
                cell(row.get("updated_at") or row.get("created_at")),
                cell(row.get("reason")),
            ]
            for row in rows
        ],
    )


@rollout.command("status")
@click.argument("rollout_id", type=int, metavar="ID")
@click.option("--watch", is_flag=True, help="Keep showing it until it completes or is aborted.")
@click.option(
    "--interval",
    type=click.FloatRange(min=0.01),
    default=2.0,
    show_default=True,
    metavar="SECONDS",
    help="How often --watch asks the server.",
)
@json_option
@client_command
def status_command(
    client: ApiClient, rollout_id: int, watch: bool, interval: float, as_json: bool
) -> None:
    """A rollout's state, current stage, gate verdict and history.

    With --watch: redrawn every --interval seconds on a terminal, one line per
    change otherwise (one JSON document per line with --json), until a final
    state; exit status 1 when the rollout ends other than completed. A server
    that stops answering after it answered once (a restart) is asked again for
    up to 120 s. Ctrl-C stops watching, not the rollout.
    """
    if not watch:
        status = client.rollout_status(rollout_id)
        echo_json(status) if as_json else echo_status(status)
        return
    status = _watch(client, rollout_id, interval, as_json)
    if status.get("state") != "completed":
        raise RolloutEndedError(
            f"rollout {rollout_id} ended {status.get('state')}: "
            f"{status.get('reason') or 'no reason given'}"
        )


class RolloutEndedError(click.ClickException):
    """A watched rollout ended other than completed: its reason, exit status 1."""

    # A ClickException, not click's Exit: run_with_error_handling keeps its exit code.
    exit_code = EXIT_REFUSED

    def show(self, file: IO[Any] | None = None) -> None:
        click.echo(self.message, err=True)


# How long --watch keeps asking a server that answered once and then stopped answering
# (a restart, an upgrade), before it gives up as any command does.
UNREACHABLE_PATIENCE_S = 120.0


def _watch(client: ApiClient, rollout_id: int, interval: float, as_json: bool) -> JsonObject:
    live = sys.stdout.isatty() and not as_json
    last = None
    answered = False
    away_since: float | None = None
    while True:
        try:
            status = client.rollout_status(rollout_id)
        except RateLimitedError as exc:
            time.sleep(max(interval, exc.retry_after or interval))
            continue
        except ServerUnreachableError as exc:
            now = time.monotonic()
            if not answered or (away_since and now - away_since > UNREACHABLE_PATIENCE_S):
                raise
            if away_since is None:
                away_since = now
                click.echo(f"{exc}; asking again for up to {UNREACHABLE_PATIENCE_S:g} s", err=True)
            time.sleep(interval)
            continue
        if away_since is not None:
            click.echo("the server answers again", err=True)
            away_since = None
        answered = True
        if live:
            click.clear()
            echo_status(status)
            click.echo(f"\n{format_time(utcnow())}: every {interval:g} s; Ctrl-C stops watching")
        else:
            line = json.dumps(status, sort_keys=True) if as_json else summary_line(status)
            if line != last:
                click.echo(line if as_json else f"{format_time(utcnow())} {line}")
                last = line
        if status.get("state") in FINAL_STATES:
            return status
        time.sleep(interval)


def _action(name: str, past: str, doc: str) -> None:
    @rollout.command(name, help=doc)
    @click.argument("rollout_id", type=int, metavar="ID")
    @reason_option
    @json_option
    @client_command
    def command(client: ApiClient, rollout_id: int, reason: str | None, as_json: bool) -> None:
        status = client.rollout_action(rollout_id, name, reason)
        if as_json:
            echo_json(status)
            return
        click.echo(f"rollout {rollout_id} {past}: {summary_line(status)}")


_action(
    "pause",
    "paused",
    "Pause a running rollout: no new devices are told to install; those installing finish.",
)
_action("resume", "resumed", "Resume a paused rollout where it stopped.")
_action(
    "abort",
    "aborting",
    "Abort a rollout: devices that installed its bundle are rolled back to their previous "
    "version; `rollout status ID --watch` shows the rollback finish.",
)


# -- rendering: the API's rollout status ---------------------------------------------------------


def _stage_text(status: JsonObject) -> str:
    index, count = status.get("stage_index"), status.get("stage_count")
    if not isinstance(index, int):
        return "-"
    return f"{index + 1}/{count}" if count else str(index + 1)


def current_stage(status: JsonObject) -> JsonObject:
    """The current stage's entry of `stages` (empty in a summary, which has none)."""
    stages = status.get("stages")
    index = status.get("stage_index")
    if isinstance(stages, list) and isinstance(index, int) and 0 <= index < len(stages):
        found = stages[index]
        return found if isinstance(found, dict) else {}
    return {}


def _states_text(states: object, unchecked: object = 0) -> str:
    """`2 succeeded (1 unchecked), 1 installing`: the devices per state."""
    if not isinstance(states, dict):
        return "-"
    parts = []
    for state, n in states.items():
        if n:
            note = f" ({unchecked} unchecked)" if state == "succeeded" and unchecked else ""
            parts.append(f"{n} {state}{note}")
    return ", ".join(parts) or "no devices yet"


def _unchecked(status: JsonObject) -> int:
    """Devices of every stage whose install committed unchecked (no live traffic judged it)."""
    stages = status.get("stages") or []
    return sum(int(s.get("unchecked") or 0) for s in stages if isinstance(s, dict))


def summary_line(status: JsonObject) -> str:
    """One line: bundle, state, stage, the stage's devices, the gate's decision."""
    stage = current_stage(status)
    text = f"{status.get('bundle')} {status.get('state')}, stage {_stage_text(status)}"
    if stage.get("name"):
        text += f" ({stage['name']}{', shadow' if stage.get('shadow') else ''})"
    if stage:
        text += f": {_states_text(stage.get('states'), stage.get('unchecked'))}"
    if stage.get("decision"):
        reasons = "; ".join(stage.get("reasons") or [])
        text += f"; gate {stage['decision']}" + (f" ({reasons})" if reasons else "")
    if status.get("state") in FINAL_STATES | {"paused", "aborting"} and status.get("reason"):
        text += f"; reason: {status['reason']}"
    return text


def echo_status(status: JsonObject) -> None:
    """The whole status: header, every stage, the current gate's checks, the history."""
    stage = current_stage(status)
    reason = f"  ({status['reason']})" if status.get("reason") else ""
    selector = cell(status.get("selector")) if status.get("selector") else "every device"
    click.echo(f"rollout:   {status.get('id')}  {status.get('bundle')}")
    click.echo(f"state:     {status.get('state')}{reason}")
    click.echo(f"stage:     {_stage_text(status)}  since {cell(status.get('stage_started_at'))}")
    click.echo(f"selection: {selector}")
    click.echo(f"devices:   {_states_text(status.get('devices'), _unchecked(status))}")
    click.echo(f"started:   {cell(status.get('created_at'))} by {cell(status.get('created_by'))}")
    stages = status.get("stages") or []
    if stages:
        click.echo("")
        echo_table(
            ["STAGE", "NAME", "SHADOW", "ASSIGNED", "DEVICES"],
            [
                [
                    ("> " if s is stage else "  ") + str(int(s.get("index", 0)) + 1),
                    cell(s.get("name")),
                    cell(s.get("shadow")),
                    cell(s.get("assigned")),
                    _states_text(s.get("states"), s.get("unchecked")) if s.get("assigned") else "-",
                ]
                for s in stages
            ],
        )
    if _unchecked(status):
        click.echo(
            "unchecked: installed, but its health check judged no live request (no traffic, "
            "or no predictor running); the gates count it as installed"
        )
    if stage.get("decision"):
        age = stage.get("telemetry_age_s")
        kept = isinstance(age, (int, float)) and age >= 1
        judged_on = f" (on telemetry read {age:.0f} s ago)" if kept else ""
        click.echo(f"\ngate:      {stage['decision']}{judged_on}")
        for line in stage.get("reasons") or []:
            click.echo(f"  - {line}")
        checks = stage.get("checks") or []
        if checks:
            echo_table(
                ["  CHECK", "RESULT", "DETAIL"],
                [
                    [f"  {c.get('name')}", _check_result(c.get("passed")), cell(c.get("detail"))]
                    for c in checks
                ],
            )
    transitions = status.get("transitions") or []
    if transitions:
        click.echo("\nhistory:")
        echo_table(
            ["  AT", "FROM", "TO", "STAGE", "BY", "REASON"],
            [
                [
                    f"  {cell(t.get('at'))}",
                    cell(t.get("from_state")),
                    cell(t.get("to_state")),
                    cell(t["stage_index"] + 1 if isinstance(t.get("stage_index"), int) else None),
                    cell(t.get("actor")),
                    cell(t.get("reason")),
                ]
                for t in transitions
            ],
        )


def _check_result(passed: object) -> str:
    if passed is None:
        return "not judged yet"
    return "pass" if passed else "FAIL"
