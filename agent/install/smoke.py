"""The smoke test: the bundle's own sample inputs must give its expected outputs here.

A deliberately small runner of its own (onnxruntime or LiteRT, directly), so the
install path does not depend on the predictor. Samples are run one at a time,
as the converter ran them: with `batched`, sample i is `array[i:i+1]`, else
`array[i]`. Each output must have the expected shape, no NaN where a number is
expected, and lie within the output's `atol` (0 for integer outputs: exact).
Each run is timed: the median time of one sample (the first run left out as
warm-up when there are others) is this device's measurement of the model,
which scales the predictor's call limit (edgefleet.agent.inference.timing).

Foreign errors (onnxruntime's and LiteRT's own classes, numpy's) are translated
into SmokeTestError here, so callers see only the agent's errors.
"""

from __future__ import annotations

import statistics
import time
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from pydantic import ValidationError

from edgefleet.agent.errors import SmokeTestError
from edgefleet.bundlefiles import (
    SERVED_ONNX,
    SERVED_TFLITE,
    SMOKE_EXPECTED_PREFIX,
    SMOKE_FILE,
    SMOKE_INPUT_PREFIX,
    SMOKE_SPEC_FILE,
    SmokeSpec,
)
from edgefleet.litert import LiteRTModel


class _Runner(Protocol):
    def run(self, names: Sequence[str], feed: Mapping[str, np.ndarray]) -> list[np.ndarray]: ...


class _OnnxRunner:
    def __init__(self, path: Path, providers: Sequence[str], threads: int) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        available = set(ort.get_available_providers())
        chosen = [p for p in providers if p in available] or ["CPUExecutionProvider"]
        self._session = ort.InferenceSession(str(path), options, providers=chosen)

    def run(self, names: Sequence[str], feed: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        return [np.asarray(v) for v in self._session.run(list(names), dict(feed))]


class _TFLiteRunner:
    def __init__(self, path: Path, threads: int) -> None:
        self._model = LiteRTModel(path, threads)

    def run(self, names: Sequence[str], feed: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        results = self._model.invoke(feed)
        return [results[name] for name in names]


def _load_samples(directory: Path) -> tuple[SmokeSpec, dict[str, np.ndarray], dict[str, Any]]:
    try:
        spec = SmokeSpec.model_validate_json((directory / SMOKE_SPEC_FILE).read_bytes())
        with np.load(directory / SMOKE_FILE, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
    except FileNotFoundError as exc:
        raise SmokeTestError(
            f"the bundle has no {Path(exc.filename or '').name}: a bundle must carry its smoke "
            "test (the converter writes it) to be installed"
        ) from exc
    except (OSError, ValueError, ValidationError, zipfile.BadZipFile) as exc:
        raise SmokeTestError(f"the bundle's smoke test cannot be read: {exc}") from exc
    inputs = {
        k.removeprefix(SMOKE_INPUT_PREFIX): v
        for k, v in arrays.items()
        if k.startswith(SMOKE_INPUT_PREFIX)
    }
    expected = {
        k.removeprefix(SMOKE_EXPECTED_PREFIX): v
        for k, v in arrays.items()
        if k.startswith(SMOKE_EXPECTED_PREFIX)
    }
    if not inputs or not expected:
        raise SmokeTestError(f"{SMOKE_FILE} holds no inputs or no expected outputs")
    for name, array in [*inputs.items(), *expected.items()]:
        if len(array) < spec.samples:
            raise SmokeTestError(f"{SMOKE_FILE}: {name!r} has fewer than {spec.samples} samples")
    return spec, inputs, expected


def compare_output(name: str, got: np.ndarray, want: np.ndarray, atol: float) -> str | None:
    """Why `got` is not `want` within `atol`, or None when it is."""
    if got.shape != want.shape:
        return f"output {name!r} has shape {list(got.shape)}, expected {list(want.shape)}"
    if want.dtype.kind in "fc":
        wanted = want.astype(np.float64)
        found = got.astype(np.float64)
        if np.any(np.isnan(found) & ~np.isnan(wanted)):
            return f"output {name!r} is NaN where a number is expected"
        difference = np.abs(np.nan_to_num(found - wanted, nan=0.0))
        worst = float(difference.max()) if difference.size else 0.0
        if worst > atol:
            return f"output {name!r} differs by {worst:.6g}, above its tolerance {atol:.6g}"
        return None
    if not np.array_equal(got, want):
        return f"output {name!r} differs from the expected values (compared exactly)"
    return None


@dataclass(frozen=True)
class SmokeResult:
    summary: str  # one line
    sample_ms: float  # the median time of one sample's run on this device


def run_smoke_test(
    directory: Path, providers: Sequence[str] = ("CPUExecutionProvider",), threads: int = 1
) -> SmokeResult:
    """Run the staged version in `directory` on its smoke samples, timing each run.

    Raises:
        SmokeTestError: missing or unreadable samples, a model that does not load
            or run, or an output outside its tolerance (the first such, named).
    """
    spec, inputs, expected = _load_samples(directory)
    runner: _Runner
    try:
        if (directory / SERVED_ONNX).is_file():
            runner = _OnnxRunner(directory / SERVED_ONNX, providers, threads)
        elif (directory / SERVED_TFLITE).is_file():
            runner = _TFLiteRunner(directory / SERVED_TFLITE, threads)
        else:
            raise SmokeTestError(f"the version holds neither {SERVED_ONNX} nor {SERVED_TFLITE}")
    except SmokeTestError:
        raise
    except Exception as exc:  # the runtimes raise their own classes, not a common base
        raise SmokeTestError(f"the model does not load: {_first_line(exc)}") from exc
    names = sorted(expected)
    times_ms = []
    for index in range(spec.samples):
        pick = slice(index, index + 1) if spec.batched else index
        feed = {name: np.asarray(array[pick]) for name, array in inputs.items()}
        try:
            started = time.perf_counter()
            outputs = runner.run(names, feed)
            times_ms.append((time.perf_counter() - started) * 1000.0)
        except Exception as exc:  # as above: onnxruntime/LiteRT errors have no common base
            raise SmokeTestError(f"sample {index}: the model fails: {_first_line(exc)}") from exc
        for name, got in zip(names, outputs, strict=True):
            reason = compare_output(
                name, got, np.asarray(expected[name][pick]), spec.atol.get(name, 0.0)
            )
            if reason:
                raise SmokeTestError(f"sample {index}: {reason}")
    sample_ms = statistics.median(times_ms[1:] or times_ms)
    return SmokeResult(
        f"{spec.samples} smoke samples match their expected outputs ({sample_ms:.3g} ms each)",
        sample_ms,
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]
