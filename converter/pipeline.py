"""`convert`: from a float model to a directory ready to be signed into a bundle.

Steps: load and check the model and data for the target; measure the float
model; preprocess; quantize and measure every valid candidate (structures
first, then other calibrations for the fastest), each timed against the float
model in interleaved rounds; when none meets the budget, keep the layers most
sensitive to quantization in float and retry; choose; write the output. With
a pinned candidate, only that one is quantized and measured. Everything is built in a temporary
directory beside OUT_DIR and renamed into place at the end, so OUT_DIR is
never half-written.
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
from pathlib import Path

import numpy as np
import onnx

from edgefleet.converter import candidates as cand
from edgefleet.converter.choose import Evaluation, accuracy_score, choose
from edgefleet.converter.context import ConversionContext, ConversionResult, ConvertOptions
from edgefleet.converter.data import Dataset, load_dataset, load_labels
from edgefleet.converter.errors import (
    DataError,
    UnsupportedOperatorError,
    summarize,
)
from edgefleet.converter.evaluate import (
    budget_failures,
    fidelity,
    has_non_finite,
    measure_latency_ms,
    measure_paired,
    open_session,
    run_outputs,
    task_metrics,
)
from edgefleet.converter.modelinfo import (
    SUPPORTED_DOMAINS,
    ModelInfo,
    is_tflite,
    load_onnx,
    require_runtime,
)
from edgefleet.converter.output import write_output
from edgefleet.converter.preprocess import preprocess
from edgefleet.converter.progress import NO_PROGRESS, Progress
from edgefleet.converter.quantize import quantize
from edgefleet.converter.sensitivity import SENSITIVITY_SAMPLES, model_layers, rank_layers
from edgefleet.errors import UsageError
from edgefleet.profiles import Profile, load_profile

CALIBRATION_SAMPLES = 200
VALIDATION_SAMPLES = 500
TOP_STRUCTURES = 2  # structures tried with other calibration methods
FLOAT_LAYER_STEPS = (1, 2, 4, 8, 16)  # layers kept in float, per retry


def _check_target(info: ModelInfo, profile: Profile) -> None:
    require_runtime(profile, "onnx")
    foreign = sorted(info.domains - SUPPORTED_DOMAINS)
    if foreign:
        raise UnsupportedOperatorError(
            f"{info.path.name} uses operators of domain(s) {', '.join(foreign)}, which "
            f"onnxruntime on {profile.name} does not implement"
        )


def _load_data(
    model_info: ModelInfo, options: ConvertOptions
) -> tuple[Dataset, Dataset, np.ndarray | None, list[str]]:
    notes = []
    calibration = load_dataset(options.calibration, model_info.inputs).subset(CALIBRATION_SAMPLES)
    if options.validation is None:
        if options.labels is not None:
            raise UsageError("--labels needs --validation: labels belong to validation samples")
        notes.append("no validation data: fidelity measured on the calibration data")
        validation = calibration
    else:
        validation = load_dataset(options.validation, model_info.inputs)
    labels = None
    if options.labels is not None:
        labels = load_labels(options.labels, validation.size)
    if validation.size > VALIDATION_SAMPLES:
        validation = validation.subset(VALIDATION_SAMPLES)
        labels = labels[:VALIDATION_SAMPLES] if labels is not None else None
    return calibration, validation, labels, notes


def _evaluate(context: ConversionContext, candidate: cand.Candidate, path: Path) -> Evaluation:
    evaluation = Evaluation(candidate=candidate, path=path, size_bytes=path.stat().st_size)
    try:
        session = open_session(path, context.profile)
        names = [spec.name for spec in context.info.outputs]
        outputs = run_outputs(session, context.validation, names)
        if has_non_finite(outputs):
            evaluation.error = "NaN or infinite outputs"
            return evaluation
        evaluation.per_output = fidelity(context.float_outputs, outputs)
        if context.labels is not None:
            evaluation.metrics = task_metrics(outputs, context.labels)
        evaluation.failures = budget_failures(
            evaluation.metrics,
            context.float_metrics,
            evaluation.per_output,
            context.options.budget,
        )
        evaluation.timing = measure_paired(
            session, context.float_session, context.validation.sample(0), context.float_ms
        )
        evaluation.latency_ms = statistics.median(evaluation.timing.candidate_ms)
    except Exception as exc:
        evaluation.error = summarize(exc)
    return evaluation


def _quantize_and_evaluate(
    context: ConversionContext, candidate: cand.Candidate, float_model: Path
) -> Evaluation:
    path = context.workdir / f"{candidate.name}.onnx"
    try:
        notes = quantize(candidate, float_model, path, context.calibration, context.workdir)
    except Exception as exc:
        return Evaluation(candidate=candidate, error=f"quantization failed: {summarize(exc)}")
    finally:
        context.progress.advance()
    evaluation = _evaluate(context, candidate, path)
    evaluation.notes = notes
    return evaluation


def _search(context: ConversionContext, float_model: Path) -> list[Evaluation]:
    structures = cand.structural_candidates(context.profile, context.info.kind)
    context.progress.start("quantizing and measuring candidates", len(structures))
    evaluations = [_quantize_and_evaluate(context, c, float_model) for c in structures]
    context.progress.finish()

    bases = _calibration_bases(evaluations, context.options.optimize)
    variants = [v for e in bases for v in cand.calibration_variants(e.candidate, context.profile)]
    if variants:
        context.progress.start("trying other calibration methods", len(variants))
        evaluations += [_quantize_and_evaluate(context, c, float_model) for c in variants]
        context.progress.finish()

    if not any(e.usable for e in evaluations):
        evaluations += _recover(context, evaluations, float_model)
    return evaluations


def _calibration_bases(evaluations: list[Evaluation], optimize: str) -> list[Evaluation]:
    """The static structures worth other calibration methods, chosen without timing noise.

    Those that ran and (optimizing latency) are clearly faster than float, the most
    accurate first, then the smallest: which of them measured fastest varies from run
    to run, and would make the candidates tried, and so the choice, vary with it.
    """
    eligible = [
        e
        for e in evaluations
        if e.error is None
        and e.candidate.method == "static"
        and (optimize != "latency" or (e.timing is not None and e.timing.clearly_faster))
    ]
    eligible.sort(key=lambda e: (-accuracy_score(e), e.size_bytes, e.candidate.name))
    return eligible[:TOP_STRUCTURES]


def _recover(
    context: ConversionContext, evaluations: list[Evaluation], float_model: Path
) -> list[Evaluation]:
    """Keep the layers most sensitive to quantization in float, more each time, until one fits.

    The candidate recovered is the most accurate static QDQ one (accuracy, then size,
    then name: never timing, which varies from run to run); its layers are ranked by
    `sensitivity.rank_layers`, and the top 1, 2, 4, ... (FLOAT_LAYER_STEPS, always
    fewer than all) are kept in float with the nodes without weights that follow them.
    """
    qdq = sorted(
        (
            e
            for e in evaluations
            if e.error is None
            and e.candidate.method == "static"
            and e.candidate.quant_format == "QDQ"
        ),
        key=lambda e: (-accuracy_score(e), e.size_bytes, e.candidate.name),
    )
    layers = model_layers(onnx.load(str(float_model), load_external_data=False))
    steps = [count for count in FLOAT_LAYER_STEPS if count < len(layers)]
    if not qdq or not steps:
        context.notes.append(
            "no recovery: it needs a static QDQ candidate and at least two named layers"
        )
        return []
    base = qdq[0].candidate
    ranked = rank_layers(
        base,
        float_model,
        layers,
        context.calibration,
        context.profile,
        context.workdir,
        context.progress,
    )
    context.notes.append(
        f"sensitivity of {base.name} (one layer quantized at a time, output error on "
        f"{min(SENSITIVITY_SAMPLES, context.calibration.size)} calibration samples): "
        + ", ".join(
            f"{s.layer.name} {s.error:.4f}" + (f" (failed: {s.failure})" if s.failure else "")
            for s in ranked
        )
    )
    retries: list[Evaluation] = []
    context.progress.start("keeping the most sensitive layers in float", len(steps))
    for count in steps:
        kept = [s.layer for s in ranked[:count]]
        candidate = base.excluding(tuple(node for layer in kept for node in layer.nodes))
        evaluation = _quantize_and_evaluate(context, candidate, float_model)
        evaluation.notes.append(
            "layers kept in float, most sensitive first: "
            + ", ".join(f"{layer.name} ({', '.join(layer.nodes)})" for layer in kept)
        )
        retries.append(evaluation)
        if evaluation.usable:
            break
    context.progress.finish()
    return retries


def convert(
    model: Path,
    out_dir: Path,
    options: ConvertOptions,
    progress: Progress = NO_PROGRESS,
) -> ConversionResult:
    """Convert `model` for `options.target` into `out_dir` (which must not exist or be empty).

    Raises:
        UnknownProfileError: no such target.
        ModelError, DataError: the model or data is unusable (see converter.errors).
        UsageError: `out_dir` exists and is not empty; inconsistent options; a pinned
            candidate that is not valid for the model and target.
        ConversionFailedError: the pinned candidate fails or misses the budget.
    """
    model, out_dir = Path(model), Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise UsageError(f"{out_dir} exists and is not empty: choose a new output directory")
    profile = load_profile(options.target)
    if is_tflite(model):
        from edgefleet.converter.tflite import convert_tflite

        if options.candidate not in (None, cand.FLOAT.name):
            raise UsageError("a TFLite model is packed unchanged: the only candidate is float")
        return convert_tflite(model, out_dir, profile, options, progress)
    onnx_model, info = load_onnx(model)
    _check_target(info, profile)
    pinned = None
    if options.candidate is not None:
        pinned = cand.pinned_candidate(options.candidate, profile, info.kind)
    calibration, validation, labels, notes = _load_data(info, options)

    with tempfile.TemporaryDirectory(prefix="edgefleet-convert-") as scratch:
        workdir = Path(scratch)
        float_path = workdir / "float.onnx"
        shutil.copyfile(model, float_path)
        session = open_session(float_path, profile)
        names = [spec.name for spec in info.outputs]
        progress.start("measuring the float model", 1)
        float_outputs = run_outputs(session, validation, names)
        progress.finish()
        if has_non_finite(float_outputs):
            raise DataError("the float model gives NaN or infinite outputs on the validation data")
        float_metrics = task_metrics(float_outputs, labels) if labels is not None else {}
        float_ms = measure_latency_ms(session, validation.sample(0))
        baseline = Evaluation(
            candidate=cand.FLOAT,
            path=float_path,
            size_bytes=float_path.stat().st_size,
            metrics=float_metrics,
            per_output=fidelity(float_outputs, float_outputs),
            latency_ms=float_ms,
        )
        context = ConversionContext(
            model=model,
            options=options,
            profile=profile,
            info=info,
            calibration=calibration,
            validation=validation,
            labels=labels,
            workdir=workdir,
            float_outputs=float_outputs,
            float_session=session,
            float_ms=float_ms,
            float_metrics=float_metrics,
            progress=progress,
            notes=notes,
        )
        evaluations = [baseline]
        if pinned != cand.FLOAT:
            prepared = preprocess(onnx_model, info, workdir)
            notes += prepared.notes
            if pinned is None:
                evaluations += _search(context, prepared.path)
            else:
                progress.start("quantizing and measuring the pinned candidate", 1)
                evaluations.append(_quantize_and_evaluate(context, pinned, prepared.path))
                progress.finish()
        del onnx_model
        chosen = choose(evaluations, options.optimize, options.candidate)
        return write_output(out_dir, context, chosen, evaluations)
