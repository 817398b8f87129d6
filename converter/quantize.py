"""Turning a candidate's settings into a quantized model file with onnxruntime's tooling.

Calibration ranges are computed once per calibration method and cached, since
they depend on the float model and the data only, not on format or types. A
candidate may take some activation tensors' ranges from other methods than its
own (`Candidate.tensor_calibration`): those ranges come from onnxruntime's
calibrator, run once per method (`activation_ranges`), and reach the quantizer
as its per-tensor overrides.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from edgefleet.converter.candidates import Candidate
from edgefleet.converter.data import Dataset, Feed


class CalibrationReader:
    """onnxruntime's CalibrationDataReader over a dataset, one sample per call."""

    def __init__(self, dataset: Dataset) -> None:
        self._dataset = dataset
        self._samples: Iterator[Feed] = dataset.samples()

    def get_next(self) -> Feed | None:
        return next(self._samples, None)

    def rewind(self) -> None:
        self._samples = self._dataset.samples()

    def __len__(self) -> int:
        return self._dataset.size

    def set_range(self, start_index: int, end_index: int) -> None:
        self._samples = self._dataset.samples(range(start_index, end_index))


@contextlib.contextmanager
def quiet_onnxruntime_tooling() -> Iterator[None]:
    # The quantization tooling logs advice on the root logger and prints its
    # calibration progress; our report says what matters, so keep both off the
    # user's terminal (and off stdout, which --json owns).
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        root.setLevel(level)


def activation_ranges(
    method: str, float_model: Path, calibration: Dataset, cache_dir: Path
) -> dict[str, tuple[float, float]]:
    """Every float tensor's range by calibration `method`, computed once, cached in `cache_dir`."""
    path = cache_dir / f"ranges-{method}.json"
    if not path.exists():
        from onnxruntime.quantization import CalibrationMethod, create_calibrator

        with quiet_onnxruntime_tooling():
            calibrator = create_calibrator(
                float_model,
                augmented_model_path=str(cache_dir / f"augmented-{method}.onnx"),
                calibrate_method=getattr(CalibrationMethod, method),
            )
            calibrator.collect_data(CalibrationReader(calibration))
            ranges = {
                name: [float(np.asarray(value).item()) for value in data.range_value]
                for name, data in calibrator.compute_data().items()
            }
        path.write_text(json.dumps(ranges))
    return {name: (low, high) for name, (low, high) in json.loads(path.read_text()).items()}


def _tensor_overrides(
    candidate: Candidate, float_model: Path, calibration: Dataset, cache_dir: Path
) -> dict[str, list[dict[str, np.float32]]]:
    """onnxruntime's TensorQuantOverrides: each recalibrated tensor's range by its method."""
    overrides = {}
    for tensor, method in candidate.tensor_calibration:
        low, high = activation_ranges(method, float_model, calibration, cache_dir)[tensor]
        overrides[tensor] = [{"rmin": np.float32(low), "rmax": np.float32(high)}]
    return overrides


def _quant_type(code: str) -> object:
    from onnxruntime.quantization import QuantType

    return QuantType.QUInt8 if code == "U8" else QuantType.QInt8


def quantize(
    candidate: Candidate,
    float_model: Path,
    output: Path,
    calibration: Dataset,
    cache_dir: Path,
    nodes_to_quantize: tuple[str, ...] = (),
) -> list[str]:
    """Write `candidate`'s quantized model to `output`; return notes on how.

    `nodes_to_quantize`, when given, are the only nodes quantized (the
    sensitivity analysis quantizes one layer at a time); the others stay float.

    Raises:
        Exception: whatever onnxruntime's tooling raises; the caller records it
            as the candidate's failure.
    """
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        quantize_dynamic,
        quantize_static,
    )

    excluded = list(candidate.nodes_to_exclude) or None
    only = list(nodes_to_quantize) or None
    with quiet_onnxruntime_tooling():
        if candidate.method == "dynamic":
            quantize_dynamic(
                str(float_model),
                str(output),
                per_channel=candidate.per_channel,
                reduce_range=candidate.reduce_range,
                weight_type=_quant_type(candidate.types or "S8"),
                nodes_to_exclude=excluded,
                nodes_to_quantize=only,
            )
            return []
        assert candidate.method == "static" and candidate.types and candidate.calibration
        options: dict[str, object] = {}
        extra_options: dict[str, object] = {}
        if candidate.tensor_calibration:
            extra_options["TensorQuantOverrides"] = _tensor_overrides(
                candidate, float_model, calibration, cache_dir
            )
        if "calibration_cache_path" in inspect.signature(quantize_static).parameters:
            options["calibration_cache_path"] = str(cache_dir / f"{candidate.calibration}.json")
        arguments = dict(
            quant_format=QuantFormat.QDQ
            if candidate.quant_format == "QDQ"
            else QuantFormat.QOperator,
            per_channel=candidate.per_channel,
            reduce_range=candidate.reduce_range,
            activation_type=_quant_type(candidate.types[:2]),
            weight_type=_quant_type(candidate.types[2:]),
            calibrate_method=getattr(CalibrationMethod, candidate.calibration),
            nodes_to_exclude=excluded,
            nodes_to_quantize=only,
            extra_options=extra_options,
            **options,
        )
        try:
            quantize_static(
                str(float_model), str(output), CalibrationReader(calibration), **arguments
            )
        except ValueError as exc:
            # onnxruntime's QDQ quantizer fails on per-channel weights whose bias it
            # rescales for int32 ("truth value of an array ... is ambiguous"); without
            # that adjustment it quantizes, and the evaluation shows the cost, if any.
            if not (candidate.per_channel and "truth value" in str(exc)):
                raise
            extra_options["QDQDisableWeightAdjustForInt32Bias"] = True
            quantize_static(
                str(float_model), str(output), CalibrationReader(calibration), **arguments
            )
            return ["int32 bias weight-scale adjustment disabled (onnxruntime per-channel bug)"]
        return []
