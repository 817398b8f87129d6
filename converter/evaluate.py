"""Measuring a model: its outputs on the validation data, its accuracy or fidelity, its speed.

Metrics are pure functions of arrays; sessions and timing are at the edges.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from edgefleet.converter.choose import PairedTiming
from edgefleet.converter.data import Dataset, Feed
from edgefleet.converter.errors import (
    CorruptModelError,
    LabelMismatchError,
    UnsupportedOperatorError,
    summarize,
)
from edgefleet.profiles import Profile

Outputs = dict[str, np.ndarray]

PAIRED_ROUNDS = 15
ROUND_SECONDS = 0.01  # per model per round
MAX_RUNS_PER_ROUND = 50


@dataclass(frozen=True)
class Budget:
    """How much worse than the float model a candidate may be."""

    accuracy_drop: float = 1.0  # percentage points, with integer labels
    regression_error_increase: float = 0.05  # relative RMSE increase, with float labels
    min_cosine: float = 0.99  # per float output, without labels
    min_top1_agreement: float = 0.98  # per class-score output, without labels
    # 99th percentile of |candidate - float| over the float output's standard deviation,
    # for outputs with one value per sample (regressors), where RMSE alone hides a model
    # that clips its range and cosine similarity is meaningless.
    max_deviation: float = 0.1


def session_threads(profile: Profile) -> int:
    return max(1, min(profile.threads, os.cpu_count() or 1))


def open_session(path: Path, profile: Profile) -> object:
    """An onnxruntime session as the target would run it (threads and providers from the profile).

    Raises:
        UnsupportedOperatorError: onnxruntime lacks an operator of the model.
        CorruptModelError: onnxruntime cannot load the model for another reason.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = session_threads(profile)
    options.inter_op_num_threads = 1
    # Fatal only: a failed run raises with onnxruntime's message, which the converter
    # reports in one line; its log would print the same message again, in colour.
    options.log_severity_level = 4
    # Idle worker threads would otherwise spin for a while after each run, taking the
    # cores from the other model of an interleaved timing (measure_paired).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    available = set(ort.get_available_providers())
    providers = [p for p in profile.execution_providers if p in available] or [
        "CPUExecutionProvider"
    ]
    try:
        return ort.InferenceSession(str(path), options, providers=providers)
    except Exception as exc:
        message = str(exc)
        if "NOT_IMPLEMENTED" in message or "Could not find an implementation" in message:
            raise UnsupportedOperatorError(
                f"onnxruntime cannot run {path.name}: {summarize(exc)}"
            ) from exc
        raise CorruptModelError(f"onnxruntime cannot load {path.name}: {summarize(exc)}") from exc


class RunFailedError(Exception):
    """The runtime failed on a sample of `source` (e.g. an index out of a Gather's range)."""

    def __init__(self, source: Path, cause: BaseException) -> None:
        self.source = source
        self.cause = summarize(cause)
        super().__init__(f"on {source.name}: {self.cause}")


def run_outputs(session: object, dataset: Dataset, names: Sequence[str]) -> Outputs:
    """Every output for every sample, samples along the first axis.

    Raises:
        RunFailedError: the runtime failed on a sample.
    """
    batched = not all(dataset.whole_entries.values())
    collected: dict[str, list[np.ndarray]] = {name: [] for name in names}
    for feed in dataset.samples():
        try:
            values = session.run(list(names), feed)  # type: ignore[attr-defined]
        except Exception as exc:
            raise RunFailedError(dataset.source, exc) from exc
        for name, value in zip(names, values, strict=True):
            collected[name].append(np.asarray(value))
    return {
        name: np.concatenate(values) if batched else np.stack(values)
        for name, values in collected.items()
    }


def measure_latency_ms(
    session: object, feed: Feed, min_runs: int = 30, min_seconds: float = 0.3
) -> float:
    """Median wall time of one inference, after a warm-up."""
    run = session.run  # type: ignore[attr-defined]
    for _ in range(3):
        run(None, feed)
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < min_runs or (
        time.perf_counter() - started < min_seconds and len(times) < 2000
    ):
        begin = time.perf_counter()
        run(None, feed)
        times.append(time.perf_counter() - begin)
    return statistics.median(times) * 1000


def _run_ms(run: object, feed: Feed) -> float:
    begin = time.perf_counter()
    run(None, feed)  # type: ignore[operator]
    return (time.perf_counter() - begin) * 1000


def measure_paired(
    candidate: object, baseline: object, feed: Feed, float_ms: float, rounds: int = PAIRED_ROUNDS
) -> PairedTiming:
    """Time a candidate session against the float model's in interleaved rounds.

    A round runs the two models in turn, candidate and float, run after run (the
    first of each pair alternating), for about ROUND_SECONDS of the float model,
    and keeps each model's fastest run. Runs side by side see the same load;
    and other work on a shared machine slows a run down, never speeds it up, so
    the fastest run is the steadiest figure.
    """
    pairs = max(1, min(MAX_RUNS_PER_ROUND, round(ROUND_SECONDS * 1000 / max(float_ms, 1e-6))))
    candidate_run, float_run = (s.run for s in (candidate, baseline))  # type: ignore[attr-defined]
    for run in (candidate_run, float_run):
        for _ in range(3):
            run(None, feed)
    candidate_ms: list[float] = []
    float_ms_rounds: list[float] = []
    for index in range(rounds):
        candidate_best = float_best = math.inf
        for pair in range(pairs):
            if (index + pair) % 2:
                float_best = min(float_best, _run_ms(float_run, feed))
                candidate_best = min(candidate_best, _run_ms(candidate_run, feed))
            else:
                candidate_best = min(candidate_best, _run_ms(candidate_run, feed))
                float_best = min(float_best, _run_ms(float_run, feed))
        candidate_ms.append(candidate_best)
        float_ms_rounds.append(float_best)
    return PairedTiming(tuple(candidate_ms), tuple(float_ms_rounds))


# --- metrics: pure functions of arrays ---------------------------------------------------


def _flat(array: np.ndarray) -> np.ndarray:
    return array.reshape(len(array), -1).astype(np.float64)


def cosine_similarity(reference: np.ndarray, candidate: np.ndarray) -> float:
    """Mean over samples of the cosine between flattened outputs (1.0 when both are zero)."""
    a, b = _flat(reference), _flat(candidate)
    dot = (a * b).sum(axis=1)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    both_zero = norms == 0
    cos = np.where(both_zero, 1.0, dot / np.where(both_zero, 1.0, norms))
    return float(cos.mean())


def is_class_scores(array: np.ndarray) -> bool:
    return array.dtype.kind == "f" and array.ndim == 2 and array.shape[1] > 1


def predicted_classes(outputs: Outputs) -> np.ndarray | None:
    """Class predictions: an integer label output if there is one, else argmax of class scores."""
    for array in outputs.values():
        if array.dtype.kind in "iu" and array.ndim == 1:
            return array
    for array in outputs.values():
        if is_class_scores(array):
            return np.asarray(array.argmax(axis=1))
    return None


def fidelity(reference: Outputs, candidate: Outputs) -> dict[str, dict[str, float]]:
    """Per output: cosine similarity, max abs error, top-1 agreement (class scores), match rate."""
    result: dict[str, dict[str, float]] = {}
    for name, ref in reference.items():
        cand = candidate[name]
        if ref.dtype.kind in "iub":
            result[name] = {"match_rate": float((ref == cand).mean())}
            continue
        difference = np.abs(ref.astype(np.float64) - cand)
        metrics = {
            "cosine": cosine_similarity(ref, cand),
            "max_abs_error": float(difference.max()),
        }
        if _flat(ref).shape[1] == 1:
            scale = max(float(ref.std()), 1e-12)
            metrics["deviation_p99"] = float(np.percentile(difference, 99) / scale)
        if is_class_scores(ref):
            metrics["top1_agreement"] = float((ref.argmax(1) == cand.argmax(1)).mean())
        result[name] = metrics
    return result


@dataclass(frozen=True)
class Task:
    """What the labels measure, decided once from the float model's outputs and the labels.

    `classes`: integer labels against the model's integer label output, or the argmax of
    its class scores; `binary`: integer labels 0/1 against one score per sample, class 1
    above `threshold` (0.5 for probabilities, 0 for logits); `regression`: float labels
    against one value per sample.
    """

    kind: Literal["classes", "binary", "regression"]
    output: str
    threshold: float | None = None

    def describe(self) -> str:
        if self.kind == "regression":
            return f"regressor: RMSE of output {self.output!r} against the labels"
        if self.kind == "classes":
            return f"classifier: accuracy of output {self.output!r} against the labels"
        scores = "probabilities" if self.threshold == 0.5 else "logits"
        return (
            f"binary classifier on the one score of output {self.output!r}: class 1 where it "
            f"is > {self.threshold:g} (the float model's scores are {scores}: "
            + ("every one lies in [0, 1])" if self.threshold == 0.5 else "some lie outside [0, 1])")
        )


def _single_values(outputs: Outputs) -> str | None:
    """The float output with one value per sample ([N], [N, 1]), if there is one."""
    for name, array in outputs.items():
        if array.dtype.kind == "f" and array.reshape(len(array), -1).shape[1] == 1:
            return name
    return None


def _first_bad(labels: np.ndarray, bad: np.ndarray) -> str:
    """E.g. "label 12 at index 3, 4 such labels in all"."""
    index, count = int(np.argmax(bad)), int(bad.sum())
    more = f", {count} such labels in all" if count > 1 else ""
    return f"label {labels[index]} at index {index}{more}"


def decide_task(float_outputs: Outputs, labels: np.ndarray, source: str) -> Task:
    """The task the labels measure, from the float model's outputs; refuse a mismatch.

    Raises:
        LabelMismatchError: the labels' kind does not fit the model's outputs, or
            integer labels name a class the model does not have.
    """
    single = _single_values(float_outputs)
    if labels.dtype.kind == "f":
        if single is None:
            raise LabelMismatchError(
                f"{source} holds floats, which are regression targets, but the model gives "
                "no single value per sample (its outputs: "
                f"{_shapes(float_outputs)}): for a classifier give integer class labels"
            )
        return Task("regression", single)
    for name, array in float_outputs.items():
        if array.dtype.kind in "iu" and array.ndim == 1:
            scores = next((a for a in float_outputs.values() if is_class_scores(a)), None)
            if scores is not None and ((array >= 0) & (array < scores.shape[1])).all():
                _check_class_range(labels, scores.shape[1], source)
            return Task("classes", name)
    for name, array in float_outputs.items():
        if is_class_scores(array):
            _check_class_range(labels, array.shape[1], source)
            return Task("classes", name)
    if single is not None:
        bad = (labels != 0) & (labels != 1)
        if bad.any():
            raise LabelMismatchError(
                f"{source} holds integers other than 0 and 1 ({_first_bad(labels, bad)}), but "
                f"the model's only output to judge is one float value per sample ({single!r}): "
                "integers make it a classifier, and one score tells only 0 from 1; for a "
                "regressor, "
                "save the labels as floats (e.g. labels.astype(np.float32))"
            )
        scores = float_outputs[single]
        probability = bool(((scores >= 0) & (scores <= 1)).all())
        return Task("binary", single, 0.5 if probability else 0.0)
    raise LabelMismatchError(
        f"{source} holds integer class labels, but the model gives no classes (no integer "
        f"label output, no class scores, no single score; its outputs: "
        f"{_shapes(float_outputs)}): convert without --labels to judge it by fidelity"
    )


def _shapes(outputs: Outputs) -> str:
    return ", ".join(f"{name} {a.dtype}{list(a.shape[1:])}" for name, a in outputs.items())


def _check_class_range(labels: np.ndarray, classes: int, source: str) -> None:
    bad = (labels < 0) | (labels >= classes)
    if bad.any():
        raise LabelMismatchError(
            f"{source}: {_first_bad(labels, bad)}: not one of the model's {classes} classes "
            f"(0 to {classes - 1}, its class-score columns): give each sample's class index"
        )


def task_metrics(outputs: Outputs, labels: np.ndarray, task: Task) -> dict[str, float]:
    """Accuracy (classifiers) or RMSE (regressors) of one model's outputs, as `task` says."""
    values = outputs[task.output]
    if task.kind == "regression":
        predictions = values.reshape(-1).astype(np.float64)
        return {"rmse": float(np.sqrt(((predictions - labels) ** 2).mean()))}
    if task.kind == "binary":
        assert task.threshold is not None
        predicted = (values.reshape(-1) > task.threshold).astype(np.int64)
    elif values.dtype.kind in "iu":
        predicted = values.astype(np.int64)
    else:
        predicted = values.argmax(axis=1)
    return {"accuracy": float((predicted == labels).mean() * 100)}


def label_metrics(
    outputs: Outputs, labels: np.ndarray | None, source: Path | None, notes: list[str]
) -> tuple[Task | None, dict[str, float]]:
    """The float model's task and metrics on `labels` (read from `source`), if given; a
    binary classifier's threshold, which the converter chose, is said in `notes`.

    Raises:
        LabelMismatchError: as `decide_task`.
    """
    if labels is None:
        return None, {}
    task = decide_task(outputs, labels, str(source))
    if task.kind == "binary":
        notes.append(f"labels: {task.describe()}")
    return task, task_metrics(outputs, labels, task)


def has_non_finite(outputs: Outputs) -> bool:
    return any(a.dtype.kind == "f" and not np.isfinite(a).all() for a in outputs.values())


def budget_failures(
    metrics: dict[str, float],
    float_metrics: dict[str, float],
    per_output: dict[str, dict[str, float]],
    budget: Budget,
) -> list[str]:
    """Why a candidate misses the budget; empty when it meets it."""
    failures = [
        f"{name}: 99th-percentile deviation {values['deviation_p99']:.3f} of the output's "
        f"spread > {budget.max_deviation}"
        for name, values in per_output.items()
        if values.get("deviation_p99", 0.0) > budget.max_deviation
    ]
    if "accuracy" in metrics and "accuracy" in float_metrics:
        drop = float_metrics["accuracy"] - metrics["accuracy"]
        if drop > budget.accuracy_drop:
            failures.append(f"accuracy drop {drop:.2f} points > {budget.accuracy_drop}")
        return failures
    if "rmse" in metrics and "rmse" in float_metrics:
        base = max(float_metrics["rmse"], 1e-12)
        increase = metrics["rmse"] / base - 1
        if increase > budget.regression_error_increase:
            failures.append(f"RMSE +{increase:.1%} > +{budget.regression_error_increase:.0%}")
        return failures
    for name, values in per_output.items():
        if values.get("cosine", 1.0) < budget.min_cosine:
            failures.append(f"{name}: cosine {values['cosine']:.4f} < {budget.min_cosine}")
        if values.get("match_rate", 1.0) < budget.min_top1_agreement:
            failures.append(
                f"{name}: matches float {values['match_rate']:.3f} < {budget.min_top1_agreement}"
            )
        if values.get("top1_agreement", 1.0) < budget.min_top1_agreement:
            failures.append(
                f"{name}: top-1 agreement {values['top1_agreement']:.3f} < "
                f"{budget.min_top1_agreement}"
            )
    return failures
