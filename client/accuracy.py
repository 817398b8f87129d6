"""Labelled accuracy as `bundles show` and `devices show` print it (GET /accuracy)."""

from __future__ import annotations

import click

from edgefleet.cli.options import echo_table
from edgefleet.client.api import JsonObject
from edgefleet.client.options import cell


def echo_accuracy(answer: JsonObject) -> None:
    """The labelled figures of each subject of `answer`; nothing when there are no labels."""
    subjects: list[JsonObject] = [s for s in answer.get("subjects") or [] if s.get("labelled")]
    if not subjects:
        return
    metric, reference = answer.get("reference_metric"), answer.get("reference")
    shown = "-" if reference is None else _figure(metric, reference)
    click.echo(
        f"\nlabelled feedback since {cell(answer.get('start'))} "
        f"(reference {metric or 'figure'}: {shown}):"
    )
    echo_table(
        ["WHERE", "LABELLED", "CORRECT", "ACCURACY", "MAE", "RMSE"],
        [
            [
                cell(s.get("device_id") or "every device"),
                cell(s.get("labelled")),
                cell(s.get("correct")),
                _figure("accuracy", s.get("accuracy")),
                _figure("mae", s.get("mae")),
                _figure("rmse", s.get("rmse")),
            ]
            for s in subjects
        ],
    )


def _figure(metric: object, value: object) -> str:
    if not isinstance(value, (int, float)):
        return "-"
    return f"{100 * value:.1f}%" if metric == "accuracy" else f"{value:.4g}"
