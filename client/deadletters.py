"""`edgefleet dead-letters`: device messages the fleet server's database refused to store."""

from __future__ import annotations

import click

from edgefleet.cli.options import echo_json, echo_table, json_option
from edgefleet.client.api import ApiClient, JsonObject
from edgefleet.client.options import ROW_ID, client_command, limit_option


@click.group("dead-letters")
def dead_letters() -> None:
    """Device messages the database refused: list, show, replay, discard.

    \b
    When the database refuses what one device sent (a value it cannot store,
    a constraint), the server sets those messages aside so that the rest of
    the fleet's are still stored, and keeps them as they arrived, signed, as a
    dead letter. Fix the cause (the server's log and `show` give the
    database's error), then replay them: they go through every check again,
    the device's signature included. Or discard them.
    """


@dead_letters.command("list")
@click.option("--device", metavar="DEVICE_ID", help="Only this device's dead letters.")
@limit_option
@json_option
@client_command
def list_command(client: ApiClient, device: str | None, limit: int, as_json: bool) -> None:
    """Dead letters, newest first: the device, what was set aside, and why."""
    rows = client.list_dead_letters(device=device, limit=limit)
    if as_json:
        echo_json(rows)
        return
    if not rows:
        click.echo("no dead letters: the database stored everything devices sent")
        return
    echo_table(
        ["ID", "DEVICE", "AT", "MESSAGES", "ERROR"],
        [
            [row.get("id"), row.get("device_id"), row.get("at"), _kinds(row), row.get("error")]
            for row in rows
        ],
    )
    click.echo(
        "see one with: edgefleet dead-letters show ID; once the cause is fixed: "
        "edgefleet dead-letters replay ID",
        err=True,
    )


@dead_letters.command("show")
@click.argument("letter_id", metavar="ID", type=ROW_ID)
@json_option
@client_command
def show_command(client: ApiClient, letter_id: int, as_json: bool) -> None:
    """Dead letter ID with each message as the device sent it (operator role)."""
    letter = client.get_dead_letter(letter_id)
    if as_json:
        echo_json(letter)
        return
    click.echo(f"dead letter {letter.get('id')} of device {letter.get('device_id')}")
    click.echo(f"set aside at {letter.get('at')}: {_kinds(letter)}")
    click.echo(f"the database refused it: {letter.get('error')}")
    for message in letter.get("messages") or []:
        click.echo(f"\n{message.get('received_at')} {message.get('topic')}")
        text = message.get("message")
        click.echo(text if text is not None else "(not text)")


@dead_letters.command("replay")
@click.argument("letter_id", metavar="ID", type=ROW_ID)
@json_option
@client_command
def replay_command(client: ApiClient, letter_id: int, as_json: bool) -> None:
    """Take dead letter ID's messages again and store them (operator role, audited).

    Each message goes through every check again (the device's signature by its
    enrolled key included). A status report older than one stored since is a
    duplicate: the device has moved on. What the database still refuses is set
    aside again, as a new dead letter.
    """
    result = client.replay_dead_letter(letter_id)
    if as_json:
        echo_json(result)
        return
    outcomes = result.get("outcomes") or {}
    click.echo(
        f"dead letter {letter_id}: "
        + ", ".join(f"{count} {outcome}" for outcome, count in sorted(outcomes.items()))
    )
    again = result.get("again")
    if again is not None:
        raise click.ClickException(
            f"the database refused them again, kept as dead letter {again}: "
            f"see edgefleet dead-letters show {again}"
        )
    if result.get("settled"):
        click.echo("stored; the dead letter is deleted")
    else:
        click.echo(
            "waiting: the database takes no writes now; they are stored, and the dead letter "
            "deleted, once it does"
        )


@dead_letters.command("discard")
@click.argument("letter_id", metavar="ID", type=ROW_ID)
@client_command
def discard_command(client: ApiClient, letter_id: int) -> None:
    """Delete dead letter ID: its messages are never stored (operator role, audited)."""
    client.discard_dead_letter(letter_id)
    click.echo(f"dead letter {letter_id} discarded")


def _kinds(letter: JsonObject) -> str:
    dropped = letter.get("dropped") or {}
    return ", ".join(f"{count} {kind}" for kind, count in dropped.items() if count) or "-"
