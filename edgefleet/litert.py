"""LiteRT (TFLite) models, run the one way the converter and the agent both use.

Inputs and outputs go by the model's serving-signature names (`features`)
when it has a signature, else by tensor names. LiteRT comes from
`ai-edge-litert`, or `tflite-runtime` where that is what is installed (32-bit
ARM); neither is a core dependency, so this module imports them on first use.
LiteRT's own exceptions pass through: each caller translates them into its
own errors.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgefleet.extras import install_hint

if TYPE_CHECKING:
    from collections.abc import Mapping

    import numpy as np

MISSING = "TFLite models need LiteRT: " + install_hint("tflite")


def interpreter_class() -> tuple[Any, str]:
    """LiteRT's Interpreter class and a name with version for reports.

    Raises:
        ImportError: neither ai-edge-litert nor tflite-runtime is installed (message: MISSING).
    """
    try:
        from ai_edge_litert import __version__ as version
        from ai_edge_litert.interpreter import Interpreter

        return Interpreter, f"ai-edge-litert {version}"
    except ImportError:
        pass
    try:
        from tflite_runtime import __version__ as version
        from tflite_runtime.interpreter import Interpreter

        return Interpreter, f"tflite-runtime {version}"
    except ImportError:
        raise ImportError(MISSING) from None


class LiteRTModel:
    """One loaded model; not thread-safe (LiteRT interpreters are not)."""

    def __init__(self, path: Path, threads: int) -> None:
        """Raises: ImportError (MISSING), or LiteRT's own error when it cannot load `path`."""
        interpreter, self.runtime = interpreter_class()
        self._interpreter = interpreter(model_path=str(path), num_threads=threads)
        self._interpreter.allocate_tensors()
        signatures = self._interpreter.get_signature_list()
        self._runner = self._interpreter.get_signature_runner() if signatures else None

    def details(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """Input and output details by name."""
        if self._runner is not None:
            return self._runner.get_input_details(), self._runner.get_output_details()
        return (
            {d["name"]: d for d in self._interpreter.get_input_details()},
            {d["name"]: d for d in self._interpreter.get_output_details()},
        )

    def invoke(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Every output for `feed`, as arrays the caller owns (LiteRT's signature runner
        hands out copies; tensors read directly are copied here)."""
        import numpy as np

        if self._runner is not None:
            return dict(self._runner(**feed))
        interpreter = self._interpreter
        inputs, outputs = self.details()
        for name, value in feed.items():
            if tuple(inputs[name]["shape"]) != value.shape:
                interpreter.resize_tensor_input(inputs[name]["index"], value.shape)
                interpreter.allocate_tensors()
                inputs, outputs = self.details()
            interpreter.set_tensor(inputs[name]["index"], value)
        interpreter.invoke()
        return {name: np.array(interpreter.get_tensor(d["index"])) for name, d in outputs.items()}
