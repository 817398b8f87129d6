"""Errors of the converter.

    ConverterError (an edgefleet LocalError: the data scientist's input is wrong)
    ├── ModelError
    │   ├── NotAModelError           not an ONNX or TFLite model at all
    │   ├── CorruptModelError        truncated or damaged, or fails to load
    │   ├── UnsupportedOperatorError uses operators the target's runtime lacks
    │   └── RuntimeNotOnTargetError  needs a runtime the target's profile does not list
    ├── DataError                    calibration, validation or label data unusable
    │   ├── MissingInputError        the data lacks one of the model's inputs
    │   ├── ExtraInputError          the data has arrays the model does not take
    │   ├── InputShapeError          an array's shape does not fit the input
    │   ├── InputDtypeError          an array's dtype does not fit the input
    │   ├── NonFiniteDataError       NaN or infinity in the data
    │   ├── LabelMismatchError       labels that do not fit the model's outputs or classes
    │   └── EmptyDataError           no samples
    ├── RuntimeMissingError          the model's runtime is not installed on this machine
    ├── ConversionFailedError        a step of the conversion failed on a valid model
    └── DeviceMeasurementError       --measure-on: the server refused the benchmark, or no
                                     device answered in time

Every error names the file and the problem, and nothing is written to OUT_DIR.
"""

from __future__ import annotations

from edgefleet.errors import LocalError


class ConverterError(LocalError):
    """The conversion cannot proceed; nothing was written."""


class ModelError(ConverterError):
    """The model file is unusable for this target."""


class NotAModelError(ModelError):
    """The file is not an ONNX or TFLite model."""


class CorruptModelError(ModelError):
    """The model is truncated or damaged, or its runtime cannot load it."""


class ModelTooLargeError(ModelError):
    """The model with its external weights is larger than one ONNX file holds."""


class UnsupportedOperatorError(ModelError):
    """The model uses operators that the target's runtime does not have."""


class RuntimeNotOnTargetError(ModelError):
    """The model needs a runtime (onnxruntime, LiteRT) that the target does not run."""


class DataError(ConverterError):
    """Calibration, validation or label data that cannot be used."""


class MissingInputError(DataError):
    """The data lacks one of the model's inputs."""


class ExtraInputError(DataError):
    """The data holds arrays for inputs the model does not have."""


class InputShapeError(DataError):
    """An array's shape does not fit the model input."""


class InputDtypeError(DataError):
    """An array's dtype does not fit the model input."""


class NonFiniteDataError(DataError):
    """NaN or infinity in the data."""


class LabelMismatchError(DataError):
    """Labels whose kind does not fit the model's outputs, or classes the model lacks."""


class EmptyDataError(DataError):
    """The data holds no samples."""


class RuntimeMissingError(ConverterError):
    """The runtime the model needs is not installed here: its extra names the fix."""


class ConversionFailedError(ConverterError):
    """A conversion step failed on a model that loads."""


class DeviceMeasurementError(ConverterError):
    """The candidates could not be measured on a device of the target (--measure-on)."""


def summarize(exc: BaseException, limit: int = 300) -> str:
    """The first line of a foreign error's message, for reports (its type when empty)."""
    text = str(exc).strip()
    return text.splitlines()[0][:limit] if text else type(exc).__name__
