"""The conversion report: every candidate with its numbers and verdict, as JSON and as a table."""

from __future__ import annotations

import dataclasses
import platform
from typing import Any

from edgefleet.converter.choose import CONFIDENCE, Evaluation, latency_ratio
from edgefleet.converter.context import ConversionContext
from edgefleet.converter.evaluate import session_threads
from edgefleet.converter.reference import FALSE_ALARM, WINDOW_SIZES
from edgefleet.driftfeatures import FEATURES_FILE, TensorPlan
from edgefleet.tables import format_columns

REPORT_FILE = "report.json"
TABLE_FILE = "report.txt"


def build_machine_label() -> str:
    """Where latency is measured without --measure-on: here, whatever the target."""
    return f"build machine ({platform.machine()}, not the target)"


def _headline(metrics: dict[str, float], per_output: dict[str, dict[str, float]]) -> str:
    """The one accuracy figure a reader compares first."""
    if "accuracy" in metrics:
        return f"acc {metrics['accuracy']:.2f}%"
    if "rmse" in metrics:
        return f"rmse {metrics['rmse']:.4g}"
    cosines = [v["cosine"] for v in per_output.values() if "cosine" in v]
    return f"cos {min(cosines):.4f}" if cosines else "-"


def _paired_rounds(evaluation: Evaluation) -> dict[str, Any] | None:
    timing = evaluation.timing
    if timing is None:
        return None
    return {
        "rounds": timing.rounds,
        "faster_rounds": timing.rounds_faster,
        "median_ratio": timing.ratio,
        # The candidate's fastest run over all rounds: what the choice ranks by (choose.py).
        "best_ms": timing.best_ms,
        "interval": list(timing.interval),
        "confidence": CONFIDENCE,
        "candidate_ms": list(timing.candidate_ms),
        "float_ms": list(timing.float_ms),
    }


def candidate_rows(evaluations: list[Evaluation]) -> list[dict[str, Any]]:
    baseline = next(e for e in evaluations if e.is_float)
    rows = []
    for evaluation in evaluations:
        rows.append(
            {
                "name": evaluation.candidate.name,
                "settings": evaluation.candidate.settings(),
                "size_bytes": evaluation.size_bytes,
                "size_ratio": evaluation.size_bytes / baseline.size_bytes
                if evaluation.size_bytes
                else None,
                "latency_ms": evaluation.latency_ms,
                "latency_ratio": latency_ratio(evaluation),
                "paired_rounds": _paired_rounds(evaluation),
                "metrics": evaluation.metrics,
                "per_output": evaluation.per_output,
                "budget_failures": evaluation.failures,
                "error": evaluation.error,
                "notes": evaluation.notes,
                "verdict": evaluation.verdict,
                "latency_measured_on": evaluation.measured_on or build_machine_label(),
                "device_figures": evaluation.device_figures,
            }
        )
    return rows


def build_report(
    context: ConversionContext, chosen: Evaluation, evaluations: list[Evaluation]
) -> dict[str, Any]:
    budget = context.options.budget
    return {
        "schema_version": 1,
        "model": context.model.name,
        "kind": context.info.kind,
        "target": context.profile.name,
        "optimize": context.options.optimize,
        "budget": {
            "accuracy_drop_points": budget.accuracy_drop,
            "regression_error_increase": budget.regression_error_increase,
            "min_cosine": budget.min_cosine,
            "min_top1_agreement": budget.min_top1_agreement,
            "max_deviation": budget.max_deviation,
        },
        "measured_on": {
            "machine": platform.machine(),
            "processor": platform.processor() or platform.machine(),
            "threads": session_threads(context.profile),
            "validation_samples": context.validation.size,
            "calibration_samples": context.calibration.size,
            "labels": context.labels is not None,
        },
        # What the labels measure: kind (classes, binary, regression), output, threshold.
        "task": None if context.task is None else dataclasses.asdict(context.task),
        "chosen": chosen.candidate.name,
        "pinned": context.options.candidate is not None,
        "decision": f"{chosen.candidate.name} {chosen.verdict}",
        "candidates": candidate_rows(evaluations),
        "notes": context.notes,
    }


def drift_feature_rows(described: list[tuple[TensorPlan, list[str]]]) -> list[dict[str, Any]]:
    """The report's drift features: per tensor, its features in drift-features.json and why."""
    return [
        {"tensor": plan.layout.tensor, "features": names, "why": plan.why}
        for plan, names in described
    ]


def _feature_list(names: list[str]) -> str:
    if len(names) <= 4:
        return ", ".join(names)
    return f"{names[0]} .. {names[-1]} ({len(names)} features)"


def _size(size_bytes: int) -> str:
    """1.23 MB, 70.7 KB, 812 B: a small model's size is not 0.00 MB."""
    if size_bytes >= 1e6:
        return f"{size_bytes / 1e6:.2f} MB"
    if size_bytes >= 1e3:
        return f"{size_bytes / 1e3:.1f} KB"
    return f"{size_bytes} B"


def format_table(report: dict[str, Any]) -> str:
    """A readable table of every candidate, widest columns first trimmed."""
    header = ("candidate", "size", "latency", "accuracy", "verdict")
    lines = []
    for row in report["candidates"]:
        size = _size(row["size_bytes"]) if row["size_bytes"] else "-"
        if row["size_ratio"]:
            size += f" ({row['size_ratio']:.2f}x)"
        latency = "-"
        if row["latency_ms"] is not None:
            latency = f"{row['latency_ms']:.3f} ms ({row['latency_ratio']:.2f}x"
            paired = row["paired_rounds"]
            if paired is not None:
                latency += (
                    f", faster in {paired['faster_rounds']}/{paired['rounds']}; "
                    f"fastest {paired['best_ms']:.3f} ms"
                )
            latency += ")"
        accuracy = _headline(row["metrics"], row["per_output"])
        lines.append((row["name"], size, latency, accuracy, row["verdict"]))
    out = [
        f"{report['model']} ({report['kind']}) for {report['target']}, optimizing "
        f"{report['optimize']}: chose {report['chosen']}",
        f"decision: {report['decision']}",
        "latency measured on: "
        + "; ".join(dict.fromkeys(row["latency_measured_on"] for row in report["candidates"])),
        "",
        format_columns([header, *lines]),
    ]
    if report.get("drift_features"):
        out += [
            "",
            f"drift features ({FEATURES_FILE}; thresholds for windows of "
            f"{WINDOW_SIZES[0]} to {WINDOW_SIZES[-1]} samples at {FALSE_ALARM:.0%} false alarms):",
            *(
                f"  {row['tensor']}: {_feature_list(row['features'])}: {row['why']}"
                for row in report["drift_features"]
            ),
        ]
    if report["notes"]:
        out += ["", "notes:", *(f"  - {note}" for note in report["notes"])]
    return "\n".join(out) + "\n"
