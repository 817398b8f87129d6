"""`edgefleet webhooks`: alert events the fleet server has not delivered to its webhook."""

from __future__ import annotations

import click

from edgefleet.cli.options import echo_json, echo_table, json_option
from edgefleet.client.api import ApiClient
from edgefleet.client.options import ROW_ID, cell, client_command, limit_option


@click.group()
def webhooks() -> None:
    """Alert events sent to the server's webhook: list undelivered ones, retry.

    \b
    A server run with --webhook-url POSTs each alert event (opened, resolved,
    acknowledged) there, signed, retrying with backoff; after its last attempt
    an event is failed until someone retries it.
    """


@webhooks.command("deliveries")
@click.option("--failed", is_flag=True, help="Only events given up after every attempt failed.")
@limit_option
@json_option
@client_command
def deliveries_command(client: ApiClient, failed: bool, limit: int, as_json: bool) -> None:
    """Events not delivered yet, oldest first, with their attempts and last error."""
    rows = client.list_webhook_deliveries(failed=failed, limit=limit)
    if as_json:
        echo_json(rows)
        return
    if not rows:
        click.echo("no failed deliveries" if failed else "every event was delivered")
        return
    echo_table(
        ["ID", "EVENT", "ALERT", "STATE", "ATTEMPTS", "NEXT", "LAST ERROR"],
        [
            [
                row.get("id"),
                row.get("event"),
                cell(row.get("alert_id")),
                row.get("state"),
                f"{row.get('attempts')}/{row.get('max_attempts')}",
                cell(row.get("next_attempt_at")),
                cell(row.get("last_error")),
            ]
            for row in rows
        ],
    )
    if any(row.get("state") == "failed" for row in rows):
        click.echo("retry a failed one with: edgefleet webhooks retry ID", err=True)


@webhooks.command("retry")
@click.argument("delivery_id", metavar="ID", type=ROW_ID)
@client_command
def retry_command(client: ApiClient, delivery_id: int) -> None:
    """Send undelivered event ID again now, with a full set of attempts (operator role)."""
    client.retry_webhook_delivery(delivery_id)
    click.echo(f"delivery {delivery_id} will be sent again at the next delivery tick")
