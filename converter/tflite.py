"""TFLite models: validated, described and packed unchanged.

A `.tflite` model is loaded with LiteRT (`ai-edge-litert`), or `tflite-runtime`
where that is what is installed, run on the calibration and validation samples,
and shipped as it is, with the same schema, smoke test and drift reference as
an ONNX model, for any target whose profile lists `tflite` (x86-64, aarch64,
armv7). Outputs and latency are this machine's, and the report says so.
ONNX models are converted to TFLite in converter/onnx_to_tflite.py.
"""

from __future__ import annotations

import json
import platform
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgefleet.bundlefiles import SERVED_TFLITE
from edgefleet.converter import candidates as cand
from edgefleet.converter.choose import Evaluation
from edgefleet.converter.context import ConversionContext, ConversionResult, ConvertOptions
from edgefleet.converter.data import Feed, load_conversion_data
from edgefleet.converter.errors import (
    ConverterError,
    CorruptModelError,
    DataError,
    RuntimeMissingError,
    UnsupportedOperatorError,
    summarize,
)
from edgefleet.converter.evaluate import (
    RunFailedError,
    fidelity,
    has_non_finite,
    label_metrics,
    measure_latency_ms,
    run_outputs,
)
from edgefleet.converter.modelinfo import ModelInfo, TensorSpec, require_runtime
from edgefleet.converter.output import reference_data, staged_directory, write_bundle_metadata
from edgefleet.converter.progress import Progress
from edgefleet.converter.reference import (
    smoke_samples,
    write_drift_features,
    write_drift_reference,
    write_schema,
    write_smoke_test,
)
from edgefleet.converter.report import (
    REPORT_FILE,
    TABLE_FILE,
    build_report,
    drift_feature_rows,
    format_table,
)
from edgefleet.litert import LiteRTModel
from edgefleet.profiles import Profile


class TFLiteSession:
    """A LiteRT model behind onnxruntime's `run(names, feed)` interface (edgefleet.litert)."""

    def __init__(self, path: Path, threads: int) -> None:
        try:
            self._model = LiteRTModel(path, threads)
        except ImportError as exc:
            raise RuntimeMissingError(str(exc)) from None
        except (ValueError, RuntimeError) as exc:
            message = summarize(exc)
            if "custom" in message.lower() or "op" in message.lower().split():
                raise UnsupportedOperatorError(f"LiteRT cannot run {path.name}: {message}") from exc
            raise CorruptModelError(f"LiteRT cannot load {path.name}: {message}") from exc
        self.runtime = self._model.runtime

    def specs(self) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
        def spec(name: str, detail: dict[str, Any]) -> TensorSpec:
            signature = detail.get("shape_signature", detail["shape"])
            shape = tuple(
                "batch" if i == 0 and d == -1 else (None if d == -1 else int(d))
                for i, d in enumerate(signature)
            )
            return TensorSpec(name, np.dtype(detail["dtype"]).name, shape)

        inputs, outputs = self._model.details()
        return (
            tuple(spec(name, d) for name, d in inputs.items()),
            tuple(spec(name, d) for name, d in outputs.items()),
        )

    def run(self, names: Sequence[str] | None, feed: Feed) -> list[np.ndarray]:
        results = self._model.invoke(feed)
        return [results[name] for name in (list(names) if names else list(results))]


def convert_tflite(
    model: Path, out_dir: Path, profile: Profile, options: ConvertOptions, progress: Progress
) -> ConversionResult:
    """Validate a TFLite model and write it with its schema, smoke test and drift reference."""
    require_runtime(profile, "tflite")
    session = TFLiteSession(model, profile.threads)
    inputs, outputs = session.specs()
    info = ModelInfo(
        path=model,
        format="tflite",
        inputs=inputs,
        outputs=outputs,
        op_counts={},
        domains=frozenset(),
        opset=0,
    )
    data = load_conversion_data(inputs, options.calibration, options.validation, options.labels)
    calibration, validation, labels = data.calibration, data.validation, data.labels
    names = [spec.name for spec in outputs]
    progress.start("running the TFLite model", 1)
    try:
        validation_outputs = run_outputs(session, validation, names)
    except RunFailedError as exc:
        raise DataError(
            f"LiteRT cannot run {model.name} on the data in {exc.source}: {exc.cause}; give "
            "data the model accepts"
        ) from exc
    progress.finish()
    if has_non_finite(validation_outputs):
        raise ConverterError(
            "the TFLite model gives NaN or infinite outputs on the validation data"
        )
    notes = data.notes
    task, metrics = label_metrics(validation_outputs, labels, options.labels, notes)
    latency_ms = measure_latency_ms(session, validation.sample(0))
    evaluation = Evaluation(
        candidate=cand.FLOAT,
        path=model,
        size_bytes=model.stat().st_size,
        latency_ms=latency_ms,
        metrics=metrics,
        per_output=fidelity(validation_outputs, validation_outputs),
        verdict="chosen: TFLite models are packed unchanged",
    )
    context = ConversionContext(
        model=model,
        options=options,
        profile=profile,
        info=info,
        calibration=calibration,
        validation=validation,
        labels=labels,
        workdir=model.parent,
        float_outputs=validation_outputs,
        float_session=session,
        float_ms=latency_ms,
        float_metrics=metrics,
        progress=progress,
        notes=[
            f"outputs and latency measured with {session.runtime} on this machine "
            f"({platform.machine()}), not on a device of target {profile.name}; packed unchanged",
            *notes,
        ],
        task=task,
        same_samples=data.same_samples,
    )
    reference = reference_data(context)  # before the report: it may add a note
    report = build_report(context, evaluation, [evaluation])
    with staged_directory(out_dir) as staging:
        shutil.copyfile(model, staging / SERVED_TFLITE)
        reference_outputs = run_outputs(session, reference, names)
        write_schema(staging, info, reference.arrays, reference_outputs)
        write_drift_reference(staging, info, reference.arrays, reference_outputs, reference.size)
        _, described = write_drift_features(staging, info, reference, reference_outputs)
        report["drift_features"] = drift_feature_rows(described)
        smoke = smoke_samples(validation)
        write_smoke_test(staging, smoke, run_outputs(session, smoke, names), None, names)
        (staging / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
        (staging / TABLE_FILE).write_text(format_table(report))
        write_bundle_metadata(staging, context, evaluation, session.runtime)
    return ConversionResult(
        out_dir=out_dir,
        profile=profile,
        info=info,
        chosen=evaluation,
        evaluations=[evaluation],
        notes=context.notes,
        report=report,
    )
