"""`edgefleet devices diagnose`: ask a device for its recent log lines and status, wait for
the answer, print it."""

from __future__ import annotations

import time
from typing import Any

import click

from edgefleet.cli.options import echo_json, human_bytes, json_option
from edgefleet.client.api import ApiClient, JsonObject
from edgefleet.client.options import cell, client_command, short_time
from edgefleet.errors import PublishError

POLL_SECONDS = 1.0
MAX_WAIT_SECONDS = 600


@click.command("diagnose")
@click.argument("device_id", metavar="DEVICE_ID")
@click.option(
    "--wait",
    type=click.IntRange(0, MAX_WAIT_SECONDS),
    default=30,
    show_default=True,
    metavar="S",
    help="Seconds to wait for the answer (0: ask and return).",
)
@click.option("--last", is_flag=True, help="Show the latest request and its answer; ask nothing.")
@json_option
@client_command
def diagnose_command(
    client: ApiClient, device_id: str, wait: int, last: bool, as_json: bool
) -> None:
    """Ask a device for its recent log lines and full status, and print them.

    \b
    The server sends the device a signed directive; the device answers over
    MQTT with its last log lines (at most 200) and what `agent status --json`
    shows, plus its link counters and system figures. A device that is offline
    gets the request from its broker session when it connects, until the
    request expires (5 minutes): read the answer then with --last.
    Asking needs the operator role (and is audited); --last needs viewer.
    """
    device = client.get_device(device_id)  # an unknown device: refused here, one line
    if last:
        requests = client.list_diagnostics(device_id, limit=1)
        if not requests:
            click.echo(f"no diagnostics requests for {device_id} yet")
            return
        request = requests[0]
    else:
        request = client.request_diagnostics(device_id)
        if not device.get("online") and not as_json:
            click.echo(
                f"{device_id} is offline: the request waits in its broker session until "
                f"{short_time(str(request['expires_at']))} UTC; read the answer then with "
                f"`edgefleet devices diagnose {device_id} --last`",
                err=True,
            )
        request = _wait_for_answer(client, device_id, request, wait)
    if request.get("state") == "failed":
        raise PublishError(
            f"diagnostics request {request['id']} to {device_id}: {request['error']}"
        )
    if as_json:
        echo_json(request)
        return
    _echo_request(request)


def _wait_for_answer(
    client: ApiClient, device_id: str, request: JsonObject, wait: int
) -> JsonObject:
    """The request as the server has it once answered (or no longer pending), or at `wait`."""
    deadline = time.monotonic() + wait
    while request.get("state") == "pending" and time.monotonic() < deadline:
        time.sleep(POLL_SECONDS)
        for listed in client.list_diagnostics(device_id):
            if listed.get("id") == request.get("id"):
                request = listed
    return request


def _echo_request(request: JsonObject) -> None:
    state = request.get("state")
    click.echo(
        f"{'request:':<17}{request.get('id')} for {request.get('device_id')}, asked by "
        f"{request.get('requested_by')} at {cell(request.get('requested_at'))}"
    )
    answer: JsonObject | None = request.get("answer")
    if state == "pending":
        click.echo(f"{'state:':<17}no answer yet (waits until {cell(request.get('expires_at'))})")
        return
    if state == "expired" or answer is None:
        click.echo(f"{'state:':<17}expired at {cell(request.get('expires_at'))}, unanswered")
        return
    click.echo(f"{'state:':<17}answered at {cell(request.get('answered_at'))}")
    status: dict[str, Any] = answer.get("status") or {}
    click.echo("\nstatus:")
    for label, text in _status_lines(status):
        click.echo(f"  {label + ':':<20}{text}")
    lines: list[JsonObject] = answer.get("log_lines") or []
    click.echo(f"\nlog ({len(lines)} lines, oldest first):")
    for line in lines:
        click.echo(
            f"  {cell(line.get('at'))} {line.get('level')!s:<8} {line.get('logger')}: "
            f"{line.get('message')}"
        )


def _status_lines(status: dict[str, Any]) -> list[tuple[str, str]]:
    rows = [
        ("install state", cell(status.get("state"))),
        ("serving", cell(status.get("current")) if status.get("current") else "nothing"),
        ("previous", cell(status.get("previous"))),
        ("in shadow", cell(status.get("challenger"))),
        ("last reason", cell(status.get("reason"))),
        ("drift", cell(status.get("drift"))),
        ("enrolled with", cell(status.get("enrolled_with"))),
        ("trust root", f"version {cell(status.get('trust_root_version'))}"),
        ("frozen out", cell(status.get("frozen_reason")) if status.get("frozen_reason") else "no"),
    ]
    link: dict[str, Any] | None = status.get("link")
    if link:
        rows.append(
            (
                "link",
                f"{link.get('connects')} connects, {link.get('connection_losses')} lost, "
                f"{link.get('outbox_depth')} waiting, "
                f"last problem {cell(link.get('last_problem'))}",
            )
        )
    model: dict[str, Any] = status.get("model") or {}
    for step in model.get("steps") or []:
        rows.append(
            (
                f"fallback {step.get('step')}",
                f"{step.get('model')}, breaker {step.get('breaker')}, "
                f"{step.get('answered')} answered",
            )
        )
    system: dict[str, Any] = status.get("system") or {}
    if system:
        rows.append(("memory", _used_of(system, "memory_used_bytes", "memory_total_bytes")))
        rows.append(("disk free", _used_of(system, "disk_free_bytes", "disk_total_bytes")))
        temperature = system.get("temperature_c")
        rows.append(
            ("temperature", f"{temperature:.1f} °C" if temperature is not None else "no sensor")
        )
    return rows


def _used_of(system: dict[str, Any], part: str, total: str) -> str:
    value, whole = system.get(part), system.get(total)
    if not isinstance(value, int) or not isinstance(whole, int):
        return "-"
    return f"{human_bytes(value)} of {human_bytes(whole)}"


__all__ = ["diagnose_command"]
