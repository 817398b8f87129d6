"""NNCF's default post-training quantization of an ONNX model, run in NNCF's own venv.

    PYTHON bench/nncf_peer.py MODEL CALIBRATION_NPZ OUT

`nncf.quantize` with every default, calibrated on the .npz's samples one at a
time (every input by its name), saved to OUT; prints the seconds the
quantization took. bench/convert_models.py runs it with the python of a venv
that has nncf, apart from the project's dependencies.
"""

import sys
import time

import nncf
import numpy as np
import onnx


def main(model_path: str, calibration_path: str, out_path: str) -> None:
    arrays = np.load(calibration_path)
    count = len(arrays[arrays.files[0]])
    samples = [{name: arrays[name][i : i + 1] for name in arrays.files} for i in range(count)]
    model = onnx.load(model_path)
    started = time.perf_counter()
    quantized = nncf.quantize(model, nncf.Dataset(samples))
    seconds = time.perf_counter() - started
    onnx.save(quantized, out_path)
    print(f"{seconds:.3f}")


if __name__ == "__main__":
    main(*sys.argv[1:4])
