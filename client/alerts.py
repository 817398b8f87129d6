"""`edgefleet alerts`: the drift alerts the fleet server opened; acknowledging them."""

from __future__ import annotations

import click

from edgefleet.cli.options import echo_json, echo_table, json_option
from edgefleet.client.api import ApiClient, JsonObject
from edgefleet.client.options import (
    ROW_ID,
    cell,
    client_command,
    empty_page,
    limit_option,
    page_footer,
)


@click.group()
def alerts() -> None:
    """Drift alerts: list them, acknowledge them.

    \b
    The server's drift evaluator opens an alert when a feature of a device's
    (or a whole cohort's) telemetry drifts from the bundle's reference for
    several windows in a row, and resolves it when the feature is back for as
    many. Acknowledging says someone has seen it; it stays open until it resolves.
    """


@alerts.command("list")
@click.option("--device", metavar="DEVICE_ID", help="Only this device's alerts.")
@click.option(
    "--cohort",
    metavar="COHORT",
    help="Only this cohort's alerts: version, tag:KEY=VALUE, profile:PROFILE or "
    "stage:ROLLOUT_ID/STAGE_INDEX.",
)
@click.option("--kind", metavar="KIND", help="Only alerts of this kind (e.g. feature-drift).")
@click.option("--open", "open_only", is_flag=True, help="Only alerts not resolved yet.")
@limit_option
@click.option("--offset", type=click.IntRange(min=0), default=0, help="Skip this many alerts.")
@json_option
@client_command
def list_command(
    client: ApiClient,
    device: str | None,
    cohort: str | None,
    kind: str | None,
    open_only: bool,
    limit: int,
    offset: int,
    as_json: bool,
) -> None:
    """Alerts, newest first, with the evidence that opened them.

    A device alert names its DEVICE, a cohort alert its COHORT: version (every
    device on the bundle version), tag:KEY=VALUE, profile:PROFILE, or
    stage:ROLLOUT_ID/STAGE_INDEX (the devices of a stage of an active rollout).
    A page of --limit alerts after --offset; the line under it says how many
    there are in all. KIND: feature-drift, prediction-drift, dataset-drift,
    accuracy-drop (another is refused).
    """
    rows, total = client.list_alerts(
        device=device, cohort=cohort, kind=kind, open_only=open_only, limit=limit, offset=offset
    )
    if as_json:
        echo_json(rows)
        return
    if not rows:
        nothing = "no open alerts" if open_only else "no alerts"
        click.echo(empty_page("alerts", offset, total, nothing))
        return
    echo_table(
        [
            "ID",
            "KIND",
            "DEVICE",
            "COHORT",
            "BUNDLE",
            "FEATURE",
            "EVIDENCE",
            "OPENED",
            "RESOLVED",
            "ACK",
        ],
        [
            [
                row.get("id"),
                row.get("kind"),
                cell(row.get("device_id")),
                cell(row.get("cohort")),
                f"{row.get('bundle_name')}@{row.get('bundle_version')}",
                cell(row.get("feature")),
                _evidence(row.get("evidence") or {}),
                cell(row.get("opened_at")),
                cell(row.get("resolved_at")),
                cell(row.get("acknowledged_by")),
            ]
            for row in rows
        ],
    )
    footer = page_footer("alerts", offset, len(rows), total)
    if footer is not None:
        click.echo(footer)


@alerts.command("ack")
@click.argument("alert_id", metavar="ID", type=ROW_ID)
@client_command
def ack_command(client: ApiClient, alert_id: int) -> None:
    """Acknowledge alert ID (it stays open until the evaluator resolves it).

    Needs the operator role; the audit log records who acknowledged it.
    """
    alert = client.ack_alert(alert_id)
    click.echo(f"alert {alert_id} acknowledged by {alert.get('acknowledged_by')}")


def _evidence(evidence: JsonObject) -> str:
    """What drifted (statistic > threshold, values outside the range) over n samples."""
    if "drifted" in evidence:
        drifted = evidence.get("drifted") or []
        return f"{len(drifted)} of {evidence.get('features_judged')} features drifted"
    statistic, threshold = evidence.get("statistic"), evidence.get("threshold")
    if not isinstance(statistic, (int, float)) or not isinstance(threshold, (int, float)):
        return "-"
    found = [f"{statistic:.1f} > {threshold:.1f}"] if statistic > threshold else []
    outside = evidence.get("outside")
    if isinstance(outside, dict) and outside.get("chance", 1) <= outside.get("cut", 0):
        found.append(
            f"{outside.get('below')} below the reference's range, {outside.get('above')} above, "
            f"{outside.get('nan')} NaN (chance {outside.get('chance', 0):.1e})"
        )
    return (
        f"{'; '.join(found) or f'{statistic:.1f} <= {threshold:.1f}'} "
        f"over {evidence.get('samples')} samples "
        f"(PSI {evidence.get('psi', 0):.2f}, JS {evidence.get('js', 0):.2f})"
    )
