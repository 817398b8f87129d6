"""`edgefleet devices`: the enrolled fleet, one device in detail, its health verdict,
enrollment tokens."""

from __future__ import annotations

import contextlib
import os
import sys

import click

from edgefleet.cli.options import (
    echo_json,
    echo_table,
    human_bytes,
    json_option,
    parse_duration,
)
from edgefleet.client.accuracy import echo_accuracy
from edgefleet.client.api import ApiClient, JsonObject
from edgefleet.client.diagnostics import diagnose_command
from edgefleet.client.options import cell, client_command, empty_page, page_footer, parse_tags
from edgefleet.client.provision import provision_command
from edgefleet.errors import LocalError, UsageError
from edgefleet.wire import NotFoundError


class NotEnrolledError(LocalError):
    """`devices health` named ids the server does not know: exit 2, apart from 1 (not ok)."""


PAGE = 1000  # devices per request when `devices health` reads the whole fleet
# The verdict's colour on a terminal; the state word is printed either way.
STATE_COLOURS = {
    "ok": "green",
    "degraded": "yellow",
    "no-model": "red",
    "failing": "red",
    "offline": "magenta",
    "unknown": "white",
}


@click.group()
def devices() -> None:
    """Enrolled devices: list, show, health, diagnose, remove; tokens and images for new ones.

    \b
    A device enrolls once (`edgefleet agent enroll`) with a one-time token
    from `edgefleet devices enroll-token`; from then on it reports over MQTT.
    A new key for an enrolled id (a re-flashed device) is refused until an
    operator runs `edgefleet devices remove ID`. `edgefleet devices provision`
    writes what to copy into a device's image (also as `edgefleet device`).
    """


@devices.command("list")
@click.option("--online", "only_online", is_flag=True, help="Only devices online.")
@click.option("--offline", "only_offline", is_flag=True, help="Only devices offline.")
@click.option("--tag", "tags", multiple=True, metavar="KEY=VALUE", help="Only devices tagged so.")
@click.option(
    "--model", help="Only devices serving this model: NAME, or NAME@VERSION for one version."
)
@click.option(
    "--limit", type=click.IntRange(1, 1000), default=100, show_default=True, help="Page size."
)
@click.option("--offset", type=click.IntRange(min=0), default=0, help="Skip this many devices.")
@json_option
@client_command
def list_command(
    client: ApiClient,
    only_online: bool,
    only_offline: bool,
    tags: tuple[str, ...],
    model: str | None,
    limit: int,
    offset: int,
    as_json: bool,
) -> None:
    """Devices by id, with what they serve and how healthy they are.

    \b
    VERDICT is the server's verdict (as `devices health` gives it: ok,
    degraded, no-model, failing, offline or unknown); HEALTH the model's
    health over the last hour of telemetry.
    """
    if only_online and only_offline:
        raise UsageError("--online and --offline exclude each other: give one, or neither for all")
    online = True if only_online else False if only_offline else None
    if model is not None and "@" in model:
        name, _, version = model.partition("@")
        if not name or not version:
            raise UsageError(f"--model {model!r}: give NAME or NAME@VERSION, e.g. demo@1.2.0")
    page = client.list_devices(
        online=online, tags=parse_tags(tags), model=model, limit=limit, offset=offset
    )
    if as_json:
        echo_json(page)
        return
    items: list[JsonObject] = page.get("items", [])
    total = int(page.get("total", len(items)))
    if not items:
        click.echo(empty_page("devices", offset, total, "no devices match"))
        return
    echo_table(
        [
            "DEVICE",
            "ONLINE",
            "VERDICT",
            "MODEL",
            "STATE",
            "HEALTH",
            "LAST SEEN (UTC)",
            "PROFILE",
            "TAGS",
        ],
        [
            [
                row.get("id"),
                cell(row.get("online")),
                cell((row.get("verdict") or {}).get("state")),
                _model(row),
                cell(row.get("install_state")),
                cell(row.get("health")),
                cell(row.get("last_seen")),
                cell(row.get("profile")),
                cell(row.get("tags")),
            ]
            for row in items
        ],
    )
    footer = page_footer("devices", offset, len(items), total)
    if footer is not None:
        click.echo(footer)


@devices.command("show")
@click.argument("device_id", metavar="DEVICE_ID")
@json_option
@client_command
def show_command(client: ApiClient, device_id: str, as_json: bool) -> None:
    """One device: inventory, what it serves, its last status reports and telemetry."""
    answer = client.get_device(device_id)
    if as_json:
        echo_json(answer)
        return
    device = answer  # the device's fields, its status_reports and telemetry beside them
    for label, key in [
        ("device", "id"),
        ("online", "online"),
        ("last seen", "last_seen"),
        ("health", "health"),
        ("install state", "install_state"),
        ("previous version", "previous_version"),
        ("profile", "profile"),
        ("arch", "arch"),
        ("runtimes", "runtimes"),
        ("agent version", "agent_version"),
        ("security floors", "security_floors"),
        ("tags", "tags"),
        ("enrolled", "enrolled_at"),
    ]:
        click.echo(f"{label + ':':<18}{cell(device.get(key))}")
    click.echo(f"{'serving:':<18}{_model(device)}")
    verdict: JsonObject = device.get("verdict") or {}
    if verdict:
        click.echo(f"{'verdict:':<18}{_verdict_text(verdict, colour=_colour_wanted())}")
    beat: JsonObject | None = device.get("heartbeat")
    if beat:
        click.echo("\nlast heartbeat:")
        for label, text in _heartbeat_lines(beat):
            click.echo(f"  {label + ':':<16}{text}")
    reports: list[JsonObject] = answer.get("status_reports") or []
    if reports:
        click.echo("\nlast status reports:")
        echo_table(
            ["SEQ", "RECEIVED", "STATE", "BUNDLE", "DIRECTIVE", "REASON"],
            [
                [
                    cell(r.get("sequence")),
                    cell(r.get("received_at")),
                    cell(r.get("install_state")),
                    _bundle_of(r),
                    cell(r.get("directive_sequence")),
                    cell(_report_reason(r)),
                ]
                for r in reports
            ],
        )
    telemetry: list[JsonObject] = answer.get("telemetry") or []
    if telemetry:
        click.echo(f"\ntelemetry since {cell(telemetry[0].get('since'))}:")
        echo_table(
            ["BUNDLE", "REQUESTS", "ERRORS", "FALLBACKS", "SCHEMA VIOLATIONS", "WINDOWS"],
            [
                [
                    _bundle_of(t),
                    cell(t.get("requests")),
                    _with_rate(t.get("errors"), t.get("error_rate")),
                    _with_rate(t.get("fallbacks"), t.get("fallback_rate")),
                    cell(t.get("schema_violations")),
                    cell(t.get("windows")),
                ]
                for t in telemetry
            ],
        )
    name, version = device.get("model_name"), device.get("model_version")
    if isinstance(name, str) and isinstance(version, str):
        with contextlib.suppress(NotFoundError):  # a bundle the server does not hold
            echo_accuracy(client.get_accuracy(name, version, device=device_id))


@devices.command("health")
@click.argument("device_ids", nargs=-1, metavar="[DEVICE_ID]...")
@click.option(
    "--tag", "tags", multiple=True, metavar="KEY=VALUE", help="Only devices tagged so (no ids)."
)
@json_option
@client_command
def health_command(
    client: ApiClient, device_ids: tuple[str, ...], tags: tuple[str, ...], as_json: bool
) -> None:
    """Is each device all right, and if not, why: one line per device.

    \b
    The verdict is the server's: ok, degraded, no-model (no model installed:
    it refuses predictions), failing, offline or unknown, with its reasons
    (offline for how long, model errors or fallbacks, frozen
    out, breakers open, disk almost full, hot, a failed install, open alerts).
    Names given: those devices; none: every device (or those with --tag).
    Exit status 0 when every device shown is ok, 1 when one is not, so a
    script can ask `edgefleet devices health cam-017 || page-someone`; 2 when
    a named id is not enrolled (the others' lines are printed first).
    Coloured on a terminal, unless NO_COLOR is set.
    """
    if device_ids and tags:
        raise UsageError("give device ids or --tag, not both")
    unknown: list[str] = []  # named ids the server does not know
    if device_ids:
        rows = []
        for device_id in device_ids:
            try:
                rows.append(client.get_device(device_id))
            except NotFoundError:
                unknown.append(device_id)
    else:
        rows = _every_device(client, parse_tags(tags))
    verdicts = [(str(row.get("id")), row.get("verdict") or {}) for row in rows]
    if as_json:
        echo_json([{"id": device_id, **verdict} for device_id, verdict in verdicts])
    elif not verdicts and not unknown:
        click.echo("no devices match")
    elif verdicts:
        colour = _colour_wanted()
        width = max(len(device_id) for device_id, _ in verdicts)
        for device_id, verdict in verdicts:
            click.echo(f"{device_id:<{width}}  {_verdict_text(verdict, colour=colour)}")
    if unknown:
        # what is known is printed above; the unknown ids after it, and exit 2
        names = ", ".join(unknown)
        raise NotEnrolledError(
            f"no enrolled device {names} (`edgefleet devices list` shows the enrolled ids)"
            if len(unknown) == 1
            else f"no enrolled devices {names} (`edgefleet devices list` shows the enrolled ids)"
        )
    if any(verdict.get("state") != "ok" for _, verdict in verdicts):
        click.get_current_context().exit(1)


def _every_device(client: ApiClient, tags: dict[str, str]) -> list[JsonObject]:
    rows: list[JsonObject] = []
    while True:
        page = client.list_devices(tags=tags, limit=PAGE, offset=len(rows))
        items: list[JsonObject] = page.get("items") or []
        rows.extend(items)
        if not items or len(rows) >= int(page.get("total", 0)):
            return rows


def _colour_wanted() -> bool:
    """Colour on a terminal, unless NO_COLOR is set (https://no-color.org)."""
    return sys.stdout.isatty() and not os.environ.get("NO_COLOR")


def _verdict_text(verdict: JsonObject, *, colour: bool) -> str:
    """`degraded  disk almost full: 3.1% free; hot: 87.0 °C (limit 85 °C)`."""
    state = str(verdict.get("state", "unknown"))
    word = f"{state:<8}"
    if colour:
        word = click.style(word, fg=STATE_COLOURS.get(state), bold=state != "ok")
    reasons: list[str] = verdict.get("reasons") or []
    return f"{word}  {'; '.join(reasons)}".rstrip()


def _heartbeat_lines(beat: JsonObject) -> list[tuple[str, str]]:
    """The last heartbeat's figures, in words (what the agent did not report: '-')."""
    lines = [
        ("sent", cell(beat.get("sent_at"))),
        ("CPU", _percent(beat.get("cpu_percent"))),
        ("memory", _used_of(beat.get("memory_used_bytes"), beat.get("memory_total_bytes"))),
        ("disk free", _used_of(beat.get("disk_free_bytes"), beat.get("disk_total_bytes"))),
        ("temperature", _celsius(beat.get("temperature_c"))),
    ]
    link: JsonObject | None = beat.get("link")
    if link:
        text = (
            f"{link.get('connects')} connects, {link.get('disconnects')} connections lost, "
            f"{link.get('publish_failures')} publish failures, "
            f"{link.get('outbox_depth')} queued"
        )
        if link.get("last_problem"):
            text += f"; last problem: {link['last_problem']}"
        lines.append(("link", text))
    breakers: list[JsonObject] | None = beat.get("breakers")
    if breakers:
        lines.append(("breakers", ", ".join(f"{b.get('step')} {b.get('state')}" for b in breakers)))
    lines.append(("trust root", cell(beat.get("trust_root_version"))))
    frozen = beat.get("frozen_out")
    if frozen is not None:
        lines.append(("frozen out", f"yes: {beat.get('frozen_reason')}" if frozen else "no"))
    return lines


def _percent(value: object) -> str:
    return f"{value:.1f}%" if isinstance(value, (int, float)) else "-"


def _used_of(part: object, total: object) -> str:
    if not isinstance(part, int) or not isinstance(total, int) or total <= 0:
        return "-"
    return f"{human_bytes(part)} of {human_bytes(total)} ({part / total:.0%})"


def _celsius(value: object) -> str:
    return f"{value:.1f} °C" if isinstance(value, (int, float)) else "- (no sensor)"


devices.add_command(diagnose_command)
devices.add_command(provision_command)


@devices.command("remove")
@click.argument("device_id", metavar="DEVICE_ID")
@client_command
def remove_command(client: ApiClient, device_id: str) -> None:
    """Remove a device: the server forgets its key, state, reports and telemetry.

    \b
    Asks no confirmation (scripts call it; the audit log records who did it).
    From then on the device's messages are refused until it enrolls again.
    Use it when a device is retired, or re-flashed with a new key: the server
    refuses a new key for an enrolled id, so remove the old enrollment first,
    then enroll the device again with a new token:
      edgefleet devices remove cam-017
      edgefleet agent enroll --config agent.toml --token "$(edgefleet devices enroll-token)"
    Refused while the device is part of a running, paused or aborting rollout.
    Needs the operator role.
    """
    client.remove_device(device_id)
    click.echo(f"removed device {device_id}")


@devices.command("enroll-token")
@click.option(
    "--tag",
    "tags",
    multiple=True,
    metavar="KEY=VALUE",
    help="Tag given to the device that enrolls with the token (repeatable).",
)
@click.option(
    "--ttl",
    default="24h",
    show_default=True,
    metavar="DURATION",
    help="How long the token stays valid: 90s, 30m, 24h, 7d.",
)
@click.option(
    "--uses",
    type=click.IntRange(1, 100_000),
    default=1,
    show_default=True,
    metavar="N",
    help="How many devices may enroll with it (a claim for a golden image: many).",
)
@json_option
@client_command
def enroll_token_command(
    client: ApiClient, tags: tuple[str, ...], ttl: str, uses: int, as_json: bool
) -> None:
    """Create an enrollment token; prints only the token.

    \b
    Give it to one device:
      edgefleet agent enroll --config agent.toml --token "$(edgefleet devices enroll-token)"
    or, with --uses N, bake it into an image that N devices enroll from.
    The server keeps only its hash; it cannot be shown again.
    """
    answer = client.create_enroll_token(parse_tags(tags), parse_duration(ttl), uses)
    if as_json:
        echo_json(answer)
        return
    click.echo(answer["token"])
    expires = answer.get("expires_at")
    if expires:
        devices = "one device" if uses == 1 else f"{uses} devices"
        click.echo(f"valid until {cell(expires)} UTC, for {devices}", err=True)


def _model(row: JsonObject) -> str:
    name, version = row.get("model_name"), row.get("model_version")
    if not name:
        return "-"
    return f"{name}@{version}" if version else str(name)


def _report_reason(report: JsonObject) -> str:
    """A status report's reason, and that the device may be frozen out when it said so."""
    frozen = report.get("frozen_reason")
    reason = cell(report.get("reason"))
    return reason if not frozen else f"{reason} (frozen out: {frozen})"


def _bundle_of(report: JsonObject) -> str:
    name, version = report.get("bundle_name"), report.get("bundle_version")
    return f"{name}@{version}" if name else "-"


def _with_rate(count: object, rate: object) -> str:
    if isinstance(rate, (int, float)):
        return f"{count} ({rate:.1%})"
    return cell(count)
