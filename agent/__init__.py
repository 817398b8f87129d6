"""The on-device agent (imported as edgefleet.agent).

For applications on the device, the in-process API:

    from edgefleet.agent import Predictor
    predictor = Predictor.open("/var/lib/edgefleet", settings, "aarch64")
    prediction = predictor.predict({"features": batch})

`Predictor` is imported on first use, so that `edgefleet agent --help` and the
configuration tools do not load onnxruntime.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from edgefleet.agent.inference import Prediction, Predictor

__all__ = ["Prediction", "Predictor"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from edgefleet.agent import inference

        return getattr(inference, name)
    raise AttributeError(f"module 'edgefleet.agent' has no attribute {name!r}")
