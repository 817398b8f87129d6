"""Local inference: runners, input checks, the fallback chain, shadow mode.

`Predictor` is what applications use (also as `edgefleet.agent.Predictor`);
the rest is exposed for the agent's other parts and for tests.
"""

from edgefleet.agent.inference.breaker import BreakerState, CircuitBreaker
from edgefleet.agent.inference.chain import Prediction, StepName
from edgefleet.agent.inference.info import ModelInfo, StepInfo, VersionInfo
from edgefleet.agent.inference.predictor import Predictor
from edgefleet.agent.inference.runtimes import (
    InferenceTimeoutError,
    ModelRunner,
    OnnxRunner,
    TFLiteRunner,
    model_path,
    open_runner,
)
from edgefleet.agent.inference.schema import InputValidator, validate_inputs
from edgefleet.agent.inference.shadow import outputs_agree

__all__ = [
    "BreakerState",
    "CircuitBreaker",
    "InferenceTimeoutError",
    "InputValidator",
    "ModelInfo",
    "ModelRunner",
    "OnnxRunner",
    "Prediction",
    "Predictor",
    "StepInfo",
    "StepName",
    "TFLiteRunner",
    "VersionInfo",
    "model_path",
    "open_runner",
    "outputs_agree",
    "validate_inputs",
]
