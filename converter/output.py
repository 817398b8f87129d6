"""Writing OUT_DIR: the chosen model, the float fallback, and everything the device and server need.

Files (see docs/converter.md):
    model.onnx | model.tflite   the model to serve
    model.float.onnx            the float model, the on-device fallback (ONNX only; absent
                                when the float model is the one served)
    schema.json                 inputs and outputs, with observed ranges
    smoke.npz, smoke.json       sample inputs, expected outputs, tolerance
    drift-reference.json        quantile bins and reference counts per feature (first format)
    drift-features.json         per-sample features, their bins and calibrated thresholds
    report.json, report.txt     every candidate, its numbers and verdict
    edgefleet-bundle.json       profiles, lineage, minimum agent version (for `bundle build`)

All are written into a temporary directory beside OUT_DIR, which is renamed
into place only when everything is written.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from edgefleet import __version__
from edgefleet.bundle import METADATA_NAME
from edgefleet.bundlefiles import FALLBACK_ONNX, SERVED_ONNX, SERVED_TFLITE
from edgefleet.converter.choose import Evaluation
from edgefleet.converter.context import FLOAT_ONNX, ConversionContext, ConversionResult
from edgefleet.converter.data import Dataset
from edgefleet.converter.evaluate import Outputs, open_session, run_outputs, session_threads
from edgefleet.converter.reference import (
    small_reference_note,
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
from edgefleet.fileio import file_sha256, fsync_directory
from edgefleet.profiles import Profile

# The oldest agent that understands this output's files.
MIN_AGENT_VERSION = "0.1.0"


@contextlib.contextmanager
def staged_directory(out_dir: Path) -> Iterator[Path]:
    """A temporary directory beside `out_dir` that becomes `out_dir` on success."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        yield staging
        staging.chmod(0o755)
        if out_dir.is_dir():
            out_dir.rmdir()  # empty, checked by the caller
        staging.rename(out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    fsync_directory(out_dir.parent)


def reference_data(context: ConversionContext) -> Dataset:
    """Calibration and validation inputs together (once, when they are the same samples:
    the validation samples then hold the calibration ones): the bundle's schema and drift
    reference. Too few for a drift reference: a note says so."""
    if context.validation is context.calibration or context.same_samples:
        reference = context.validation
    else:
        arrays = {
            name: np.concatenate(
                [context.calibration.arrays[name], context.validation.arrays[name]]
            )
            for name in context.calibration.arrays
        }
        size = context.calibration.size + context.validation.size
        reference = Dataset(
            context.calibration.source, arrays, context.calibration.whole_entries, size
        )
    note = small_reference_note(reference.size)
    if note is not None:
        context.notes.append(note)
    return reference


def write_bundle_metadata(
    directory: Path, context: ConversionContext, chosen: Evaluation, runtime: str
) -> None:
    """edgefleet-bundle.json: profiles, minimum agent version and lineage for `bundle build`.

    The lineage goes into the signed manifest: strings, integers and booleans only.
    """
    options = context.options
    lineage: dict[str, Any] = {
        "source_model_sha256": file_sha256(context.model)[1],
        "calibration_sha256": file_sha256(options.calibration)[1],
        "converter": f"edgefleet {__version__}",
        "runtime": runtime,
        "target": context.profile.name,
        "chosen": chosen.candidate.name,
        "settings": {k: v for k, v in chosen.candidate.settings().items() if v is not None},
        "optimize": options.optimize,
        "pinned": options.candidate is not None,
    }
    if options.validation is not None:
        lineage["validation_sha256"] = file_sha256(options.validation)[1]
    if options.labels is not None:
        lineage["labels_sha256"] = file_sha256(options.labels)[1]
    metadata = {
        "profiles": [context.profile.name],
        "min_agent_version": MIN_AGENT_VERSION,
        "lineage": lineage,
    }
    (directory / METADATA_NAME).write_text(json.dumps(metadata, indent=2) + "\n")


def open_model_session(path: Path, profile: Profile) -> Any:
    """An onnxruntime session for an ONNX model, a LiteRT one for a TFLite model (a model
    converted from ONNX, whose signature names its tensors as the ONNX model does): both
    `run(names, feed)`."""
    if path.suffix != ".tflite":
        return open_session(path, profile)
    from edgefleet.converter.tflite import TFLiteSession

    return TFLiteSession(path, session_threads(profile))


def write_output(
    out_dir: Path, context: ConversionContext, chosen: Evaluation, evaluations: list[Evaluation]
) -> ConversionResult:
    names = [spec.name for spec in context.info.outputs]
    assert chosen.path is not None
    reference = reference_data(context)  # before the report: it may add a note
    report = build_report(context, chosen, evaluations)
    served = SERVED_TFLITE if chosen.path.suffix == ".tflite" else SERVED_ONNX
    with staged_directory(out_dir) as staging:
        shutil.copyfile(chosen.path, staging / served)
        # A float model served needs no second copy as its fallback; where onnxruntime does
        # not run, the ONNX model is no fallback.
        if not chosen.is_float and "onnxruntime" in context.profile.runtimes:
            shutil.copyfile(context.workdir / FLOAT_ONNX, staging / FALLBACK_ONNX)
        session = open_model_session(staging / served, context.profile)
        reference_outputs: Outputs = run_outputs(session, reference, names)
        write_schema(staging, context.info, reference.arrays, reference_outputs)
        write_drift_reference(
            staging, context.info, reference.arrays, reference_outputs, reference.size
        )
        _, described = write_drift_features(staging, context.info, reference, reference_outputs)
        report["drift_features"] = drift_feature_rows(described)
        smoke = smoke_samples(context.validation)
        smoke_outputs = run_outputs(session, smoke, names)
        float_smoke = run_outputs(context.float_session, smoke, names)
        write_smoke_test(staging, smoke, smoke_outputs, float_smoke, names)
        (staging / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
        (staging / TABLE_FILE).write_text(format_table(report))
        import onnxruntime

        runtime = (
            session.runtime if served == SERVED_TFLITE else f"onnxruntime {onnxruntime.__version__}"
        )
        write_bundle_metadata(staging, context, chosen, runtime)
    return ConversionResult(
        out_dir=out_dir,
        profile=context.profile,
        info=context.info,
        chosen=chosen,
        evaluations=evaluations,
        notes=context.notes,
        report=report,
    )
