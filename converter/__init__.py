"""The model converter (imported as edgefleet.converter).

`convert()` quantizes an ONNX model for a hardware target, proves the result
against the float model on validation data and on this machine's clock, and
writes a directory that `edgefleet bundle build` signs into a bundle.
"""

from edgefleet.converter.context import ConversionResult, ConvertOptions
from edgefleet.converter.evaluate import Budget
from edgefleet.converter.pipeline import convert

__all__ = ["Budget", "ConversionResult", "ConvertOptions", "convert"]
