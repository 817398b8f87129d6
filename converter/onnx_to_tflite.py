"""ONNX to TFLite: onnx2tf, run in its own tool environment (converter/toolenv.py).

The ONNX model and the calibration samples go to onnx2tf in files
(converter/onnx2tf_driver.py runs in the tool environment as a subprocess); it
writes two TFLite models that keep the ONNX model's input layout and tensor names:

- `tflite-float32`: the model as it is;
- `tflite-int8`: int8 weights and activations calibrated on the calibration data,
  per-channel weights, float inputs and outputs, and float kernels where LiteRT
  has no int8 one (TensorFlow Lite's integer quantization with float fallback).

A fully integer model with int8 inputs and outputs is not made: its inputs would
not be those of the ONNX model, its schema, smoke test and drift reference.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np

from edgefleet.converter.candidates import TFLITE_FLOAT32, TFLITE_INT8, Candidate
from edgefleet.converter.data import Dataset
from edgefleet.converter.errors import ConversionFailedError
from edgefleet.converter.progress import Progress
from edgefleet.converter.toolenv import ONNX2TF_VERSION, prepare_onnx2tf

DRIVER = Path(__file__).with_name("onnx2tf_driver.py")
OUTPUT_FILES = {TFLITE_FLOAT32: "float32.tflite", TFLITE_INT8: "int8.tflite"}


def convert_to_tflite(
    model: Path, calibration: Dataset, workdir: Path, progress: Progress
) -> dict[Candidate, Path]:
    """The TFLite candidates of `model`, written under `workdir`.

    Raises:
        ToolMissingError: the tool environment is missing and could not be built.
        ConversionFailedError: a model input has no batch axis, or onnx2tf failed.
    """
    if any(calibration.whole_entries.values()):
        raise ConversionFailedError(
            f"{model.name}: onnx2tf calibrates inputs fed in batches of one; "
            "inputs without a batch axis are not converted to TFLite"
        )
    python = prepare_onnx2tf(progress)
    out = workdir / "tflite"
    out.mkdir()
    # onnx2tf writes its shape-inferred graph back over the model file it is given:
    # it gets a copy, never the user's model.
    source = out / "model.onnx"
    shutil.copyfile(model, source)
    files = {}
    for index, (name, array) in enumerate(calibration.arrays.items()):
        path = out / f"calibration-{index}.npy"
        np.save(path, array)
        files[name] = str(path)
    spec = out / "calibration.json"
    spec.write_text(json.dumps(files))
    progress.start(f"converting to TFLite with onnx2tf {ONNX2TF_VERSION}", 1)
    try:
        result = subprocess.run(
            [str(python), str(DRIVER), str(source), str(out), str(spec)],
            capture_output=True,
            text=True,
            check=False,
            cwd=out,
        )
    finally:
        progress.finish()
    if result.returncode != 0:
        last = [line for line in result.stderr.splitlines() if line.strip()][-1:] or ["no message"]
        raise ConversionFailedError(
            f"onnx2tf {ONNX2TF_VERSION} could not convert {model.name}: {last[0][:300]}"
        )
    return {candidate: out / name for candidate, name in OUTPUT_FILES.items()}
