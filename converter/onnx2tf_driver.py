"""Runs inside the onnx2tf tool environment (converter/toolenv.py), never imported by edgefleet.

    python onnx2tf_driver.py MODEL.onnx OUT_DIR CALIBRATION.json

CALIBRATION.json maps each model input to an .npy of calibration samples (samples first,
in the model's own layout). Writes OUT_DIR/float32.tflite and OUT_DIR/int8.tflite
(int8 weights and activations, float inputs and outputs, float kernels where LiteRT has
no int8 one), both keeping the ONNX model's input layout and its input and output names.
Exits non-zero, with the tool's last words on stderr, when the conversion fails.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any


def main(model: str, out_dir: str, calibration_file: str) -> None:
    import onnx2tf  # type: ignore[import-not-found,import-untyped,unused-ignore]

    calibration: dict[str, str] = json.loads(Path(calibration_file).read_text())
    work = Path(out_dir) / "onnx2tf"
    onnx2tf.convert(
        input_onnx_file_path=model,
        output_folder_path=str(work),
        output_signaturedefs=True,
        copy_onnx_input_output_names_to_tflite=True,
        output_integer_quantized_tflite=True,
        quant_type="per-channel",
        # Samples as they are: mean 0, standard deviation 1.
        custom_input_op_name_np_data_path=[
            [name, path, 0.0, 1.0] for name, path in calibration.items()
        ],
        keep_shape_absolutely_input_names=list(calibration),
        not_use_onnxsim=True,
        non_verbose=True,
    )
    stem = Path(model).stem
    float32, int8 = Path(out_dir) / "float32.tflite", Path(out_dir) / "int8.tflite"
    shutil.copyfile(work / f"{stem}_float32.tflite", float32)
    shutil.copyfile(work / f"{stem}_integer_quant.tflite", int8)
    name_signature_as(float32, int8)


def name_signature_as(source: Path, target: Path) -> None:
    """Give `target`'s serving signature the input and output names of `source`'s, in order.

    onnx2tf names the float model's signature after the ONNX model (by the SavedModel)
    but leaves the quantized model's outputs as output_0, output_1...
    """
    import flatbuffers  # type: ignore[import-not-found,import-untyped,unused-ignore]
    from tensorflow.lite.python import (  # type: ignore[import-not-found,import-untyped,unused-ignore]
        schema_py_generated as schema,
    )

    def load(path: Path) -> Any:
        return schema.ModelT.InitFromObj(schema.Model.GetRootAs(path.read_bytes(), 0))

    named, renamed = load(source), load(target)
    for kept, changed in zip(named.signatureDefs, renamed.signatureDefs, strict=True):
        for side in ("inputs", "outputs"):
            for old, new in zip(getattr(kept, side), getattr(changed, side), strict=True):
                new.name = old.name
    builder = flatbuffers.Builder(1024)
    builder.Finish(renamed.Pack(builder), file_identifier=b"TFL3")
    target.write_bytes(bytes(builder.Output()))


if __name__ == "__main__":
    main(*sys.argv[1:4])
