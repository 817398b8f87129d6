"""`convert`: from a float model to a directory ready to be signed into a bundle.

Steps: load and check the model and data for the target; measure the float
model; preprocess; quantize and measure every valid candidate (structures
first, then other calibrations for the fastest), each timed against the float
model in interleaved rounds; when none meets the budget, choose the calibration
of the tensors most sensitive to quantization, else keep the most sensitive
layers in float, and retry; with --measure-on, time the float
model and the candidates within budget on a device of the target instead
(`converter/remote.py`); choose; write the output. With
a pinned candidate, only that one is quantized and measured. Where the target runs TFLite,
the model converted by onnx2tf adds TFLite candidates (always where only TFLite runs, then
the only ones; with --tflite elsewhere). Everything is built in a temporary
directory beside OUT_DIR and renamed into place at the end, so OUT_DIR is
never half-written.
"""

from __future__ import annotations

import platform
import statistics
import tempfile
from pathlib import Path

import onnx

from edgefleet.converter import candidates as cand
from edgefleet.converter.choose import Evaluation, accuracy_score, choose
from edgefleet.converter.context import (
    FLOAT_ONNX,
    ConversionContext,
    ConversionResult,
    ConvertOptions,
)
from edgefleet.converter.data import ConversionData, load_conversion_data, samples_word
from edgefleet.converter.errors import (
    ConversionFailedError,
    DataError,
    UnsupportedOperatorError,
    summarize,
)
from edgefleet.converter.evaluate import (
    Outputs,
    RunFailedError,
    budget_failures,
    fidelity,
    has_non_finite,
    label_metrics,
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
from edgefleet.converter.onnx_to_tflite import convert_to_tflite
from edgefleet.converter.output import open_model_session, write_output
from edgefleet.converter.preprocess import preprocess
from edgefleet.converter.progress import NO_PROGRESS, Progress
from edgefleet.converter.quantize import quantize
from edgefleet.converter.remote import measure_on_devices
from edgefleet.converter.report import build_machine_label
from edgefleet.converter.sensitivity import (
    SENSITIVITY_SAMPLES,
    model_layers,
    rank_layers,
    tune_tensor_calibration,
)
from edgefleet.errors import UsageError
from edgefleet.fileio import check_output_directory
from edgefleet.profiles import Profile, load_profile

TOP_STRUCTURES = 2  # structures tried with other calibration methods
FLOAT_LAYER_STEPS = (1, 2, 4, 8, 16)  # layers kept in float, per retry
ONNX2TF_DOMAINS = frozenset({"", "ai.onnx"})  # operator domains onnx2tf converts


def _float_outputs(session: object, model: Path, data: ConversionData, names: list[str]) -> Outputs:
    """The float model's outputs on the validation samples, once it has run on every sample.

    Raises:
        DataError: onnxruntime cannot run the float model on a sample (of either file:
            the calibration samples feed the quantizer and the drift reference).
    """
    try:
        outputs = run_outputs(session, data.validation, names)
        if not data.same_samples:
            run_outputs(session, data.calibration, names)
    except RunFailedError as exc:
        raise DataError(
            f"onnxruntime cannot run {model.name} on the data in {exc.source}: {exc.cause}; "
            "give data the model accepts (values in the ranges it was built for)"
        ) from exc
    return outputs


def _check_target(info: ModelInfo, profile: Profile) -> None:
    if "tflite" not in profile.runtimes:  # else converted to TFLite where ONNX does not run
        require_runtime(profile, "onnx")
    foreign = sorted(info.domains - SUPPORTED_DOMAINS)
    if foreign:
        raise UnsupportedOperatorError(
            f"{info.path.name} uses operators of domain(s) {', '.join(foreign)}, which "
            f"onnxruntime on {profile.name} does not implement"
        )


def _evaluate(context: ConversionContext, candidate: cand.Candidate, path: Path) -> Evaluation:
    evaluation = Evaluation(candidate=candidate, path=path, size_bytes=path.stat().st_size)
    try:
        names = [spec.name for spec in context.info.outputs]
        session = open_model_session(path, context.profile)
        outputs = run_outputs(session, context.validation, names)
        if has_non_finite(outputs):
            evaluation.error = "NaN or infinite outputs"
            return evaluation
        evaluation.per_output = fidelity(context.float_outputs, outputs)
        if context.labels is not None and context.task is not None:
            evaluation.metrics = task_metrics(outputs, context.labels, context.task)
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
    if not structures:
        context.notes.append(
            f"nothing in {context.model.name} can be quantized (operators: "
            f"{', '.join(sorted(context.info.op_counts))}; none has weights that onnxruntime "
            "quantizes): the float model is shipped"
        )
        return []
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
    `sensitivity.rank_layers`. First the tensors of the most sensitive layers get a
    calibration of their own (`sensitivity.tune_tensor_calibration`); if that candidate
    misses the budget, the top 1, 2, 4, ... layers (FLOAT_LAYER_STEPS, always fewer than
    all) are kept in float with the nodes without weights that follow them, the tensors'
    own calibrations kept.
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
        f"{samples_word(min(SENSITIVITY_SAMPLES, context.calibration.size))} of the "
        "calibration data): "
        + ", ".join(
            f"{s.layer.name} {s.error:.4f}" + (f" (failed: {s.failure})" if s.failure else "")
            for s in ranked
        )
    )
    tuning = tune_tensor_calibration(
        base,
        float_model,
        ranked,
        context.calibration,
        context.profile,
        context.workdir,
        context.progress,
    )
    retries: list[Evaluation] = []
    if tuning.candidate.tensor_calibration:
        evaluation = _quantize_and_evaluate(context, tuning.candidate, float_model)
        evaluation.notes.append(
            "calibration per tensor (output error "
            f"{tuning.error_before:.4f} -> {tuning.error_after:.4f}): "
            + ", ".join(f"{t} {m}" for t, m in tuning.candidate.tensor_calibration)
            + f", every other tensor {base.calibration}"
        )
        retries.append(evaluation)
        if evaluation.usable:
            return retries
    context.progress.start("keeping the most sensitive layers in float", len(steps))
    for count in steps:
        kept = [s.layer for s in ranked[:count]]
        nodes = tuple(node for layer in kept for node in layer.nodes)
        candidate = tuning.candidate.excluding(nodes)
        evaluation = _quantize_and_evaluate(context, candidate, float_model)
        evaluation.notes.append(
            "layers kept in float, most sensitive first: "
            + ", ".join(f"{layer.name} ({', '.join(layer.nodes)})" for layer in kept)
            + "".join(
                f"; {tensor} calibrated by {method}"
                for tensor, method in candidate.tensor_calibration
            )
        )
        retries.append(evaluation)
        if evaluation.usable:
            break
    context.progress.finish()
    return retries


def _tflite_search(context: ConversionContext, pinned: cand.Candidate | None) -> list[Evaluation]:
    """The TFLite candidates converted by onnx2tf, measured here with LiteRT.

    Where the profile runs TFLite only, the TFLite float32 model is the float model: it
    must match the ONNX model within the budget, and becomes what int8 is timed against.
    Elsewhere a model onnx2tf cannot take gets no TFLite candidates, and a note says why.
    """
    foreign = sorted(context.info.domains - ONNX2TF_DOMAINS)
    if foreign:
        why = (
            f"{context.model.name} uses operators of domain(s) {', '.join(foreign)}, which "
            "onnx2tf does not convert to TFLite"
        )
        if "onnxruntime" in context.profile.runtimes and (
            pinned is None or pinned.method != "tflite"
        ):
            context.notes.append(f"no TFLite candidates: {why}")
            return []
        raise UnsupportedOperatorError(
            f"{why}, and target {context.profile.name} runs TFLite only: export the model "
            "with standard ONNX operators only"
        )
    converted = convert_to_tflite(
        context.model, context.calibration, context.workdir, context.progress
    )
    if context.options.measure_on is None:
        where = (
            f"converted by onnx2tf; outputs and latency measured with LiteRT on this machine "
            f"({platform.machine()}), not on a device of target {context.profile.name}"
        )
    else:
        where = (
            f"converted by onnx2tf; outputs measured with LiteRT on this machine "
            f"({platform.machine()}), latency with LiteRT on a device of target "
            f"{context.profile.name} (--measure-on)"
        )
    wanted = [c for c in cand.TFLITE_CANDIDATES if pinned in (None, c)]
    if "onnxruntime" not in context.profile.runtimes:
        float32_path = converted[cand.TFLITE_FLOAT32]
        float32 = _evaluate(context, cand.FLOAT, float32_path)
        if not float32.usable:
            raise ConversionFailedError(
                f"onnx2tf's float32 TFLite model does not match {context.model.name} on the "
                f"validation data: {float32.error or '; '.join(float32.failures)}"
            )
        context.float_session = open_model_session(float32_path, context.profile)
        context.float_ms = measure_latency_ms(context.float_session, context.validation.sample(0))
        float32.timing, float32.latency_ms = None, context.float_ms
        float32.notes = [f"the ONNX model as TFLite float32, {where}"]
        wanted = [cand.TFLITE_INT8] if pinned in (None, cand.TFLITE_INT8) else []
        evaluations = [float32]
    else:
        evaluations = []
    context.progress.start("measuring the TFLite candidates", len(wanted))
    for candidate in wanted:
        evaluation = _evaluate(context, candidate, converted[candidate])
        evaluation.notes.append(where)
        evaluations.append(evaluation)
        context.progress.advance()
    context.progress.finish()
    return evaluations


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
        UsageError: `out_dir` is a file, exists and is not empty, or lies under a file;
            inconsistent options; a pinned
            candidate that is not valid for the model and target.
        ConversionFailedError: the pinned candidate fails or misses the budget.
    """
    model, out_dir = Path(model), Path(out_dir)
    check_output_directory(out_dir)
    profile = load_profile(options.target)
    if is_tflite(model):
        from edgefleet.converter.tflite import convert_tflite

        if options.candidate not in (None, cand.FLOAT.name):
            raise UsageError("a TFLite model is packed unchanged: the only candidate is float")
        if options.measure_on is not None:
            raise UsageError(
                "a TFLite model is packed unchanged: there are no candidates to measure on a "
                "device; leave out --measure-on"
            )
        return convert_tflite(model, out_dir, profile, options, progress)
    onnx_model, info = load_onnx(model)
    _check_target(info, profile)
    pinned = None
    if options.candidate is not None:
        pinned = cand.pinned_candidate(options.candidate, profile, info.kind)
    data = load_conversion_data(
        info.inputs, options.calibration, options.validation, options.labels
    )
    calibration, validation, labels, notes = (
        data.calibration,
        data.validation,
        data.labels,
        data.notes,
    )

    with tempfile.TemporaryDirectory(prefix="edgefleet-convert-") as scratch:
        workdir = Path(scratch)
        float_path = workdir / FLOAT_ONNX
        onnx.save_model(onnx_model, float_path)  # one file, external weights read in
        session = open_session(float_path, profile)
        names = [spec.name for spec in info.outputs]
        progress.start("measuring the float model", 1)
        float_outputs = _float_outputs(session, model, data, names)
        progress.finish()
        if has_non_finite(float_outputs):
            raise DataError("the float model gives NaN or infinite outputs on the validation data")
        task, float_metrics = label_metrics(float_outputs, labels, options.labels, notes)
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
            task=task,
            same_samples=data.same_samples,
        )
        evaluations = [baseline]
        if "onnxruntime" not in profile.runtimes:
            context.notes.append(
                f"{profile.name} runs TFLite only: the float model is {model.name} converted "
                "to TFLite float32; fidelity is measured against the ONNX model run with "
                "onnxruntime on this machine"
            )
            evaluations = _tflite_search(context, pinned)
        else:
            if pinned is None or pinned.method != "tflite":
                evaluations += _onnx_search(context, onnx_model, info, pinned)
            if options.tflite or (pinned is not None and pinned.method == "tflite"):
                evaluations += _tflite_search(context, pinned)
        del onnx_model
        if options.measure_on is not None:
            notes += measure_on_devices(context, evaluations, options.measure_on, progress)
        for evaluation in evaluations:
            evaluation.measured_on = evaluation.measured_on or build_machine_label()
        chosen = choose(evaluations, options.optimize, options.candidate)
        if "onnxruntime" not in profile.runtimes and not chosen.is_float:
            evaluations[0].verdict = "not shipped: no fallback where only TFLite runs"
        return write_output(out_dir, context, chosen, evaluations)


def _onnx_search(
    context: ConversionContext,
    onnx_model: onnx.ModelProto,
    info: ModelInfo,
    pinned: cand.Candidate | None,
) -> list[Evaluation]:
    """The onnxruntime candidates: every valid one, or the pinned one (none for float)."""
    evaluations: list[Evaluation] = []
    progress, notes = context.progress, context.notes
    if pinned != cand.FLOAT:
        prepared = preprocess(onnx_model, info, context.workdir)
        notes += prepared.notes
        if pinned is None:
            evaluations += _search(context, prepared.path)
        else:
            progress.start("quantizing and measuring the pinned candidate", 1)
            evaluations.append(_quantize_and_evaluate(context, pinned, prepared.path))
            progress.finish()
    return evaluations
