"""Model runners: onnxruntime and LiteRT behind one small interface.

This is where foreign exceptions stop. Whatever onnxruntime or LiteRT raises
while loading or running a model leaves here as an edgefleet error:
`InferenceError` (loading or running failed), or its subclass
`InferenceTimeoutError` (the call passed its deadline). The fallback chain of
`Predictor` counts each kind.

Deadlines: onnxruntime calls run on the caller's thread and are stopped by the
shared `Watchdog` (see watchdog.py for why). A LiteRT interpreter cannot be
stopped, nor used by two threads at once, so each `TFLiteRunner` owns one
worker thread that makes every timed call in turn; the caller stops waiting
at the deadline, and until the abandoned call ends the runner refuses new calls
at once rather than queueing them behind it.

LiteRT models load and run through `edgefleet.litert` (serving signature,
else tensors), as the converter's and the smoke test's do.
"""

from __future__ import annotations

import math
import os
import queue
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np

from edgefleet.agent.errors import InferenceError
from edgefleet.agent.inference.watchdog import Watchdog, shared_watchdog
from edgefleet.bundlefiles import FALLBACK_ONNX, SERVED_ONNX, SERVED_TFLITE
from edgefleet.extras import install_hint
from edgefleet.litert import LiteRTModel

Which = Literal["served", "fallback"]
_squares = np.vdot
Feed = Mapping[str, np.ndarray]


class InferenceTimeoutError(InferenceError):
    """A model call passed its deadline (counted apart from other failures)."""


class ModelRunner(Protocol):
    """One loaded model. `run` is safe to call from several threads."""

    @property
    def input_names(self) -> tuple[str, ...]: ...

    @property
    def output_names(self) -> tuple[str, ...]: ...

    def run(self, feed: Feed, timeout_s: float | None = None) -> dict[str, np.ndarray]:
        """Outputs by name.

        Raises:
            InferenceTimeoutError: past `timeout_s` (None: no deadline).
            InferenceError: the runtime failed.
        """
        ...


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


def runtime_threads(threads: int) -> int:
    """The profile's thread count, never more than this machine's CPUs."""
    return max(1, min(threads, os.cpu_count() or 1))


class OnnxRunner:
    """An onnxruntime session with the profile's execution providers, CPU last."""

    runtime = "onnxruntime"

    def __init__(
        self,
        path: Path,
        threads: int = 1,
        providers: Sequence[str] = (),
        watchdog: Watchdog | None = None,
    ) -> None:
        """Raises: InferenceError when onnxruntime is missing or cannot load the model."""
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise InferenceError("ONNX models need onnxruntime: " + install_hint("agent")) from exc
        self.path = Path(path)
        options = ort.SessionOptions()
        options.intra_op_num_threads = runtime_threads(threads)
        options.inter_op_num_threads = 1
        options.log_severity_level = 4  # failures reach the log as InferenceError, once
        available = set(ort.get_available_providers())
        chosen = [p for p in providers if p in available]
        if "CPUExecutionProvider" not in chosen:
            chosen.append("CPUExecutionProvider")
        try:
            self._session = ort.InferenceSession(str(self.path), options, providers=chosen)
        except Exception as exc:  # onnxruntime's own exception types; translated here
            raise InferenceError(
                f"onnxruntime cannot load {self.path.name}: {_first_line(exc)}"
            ) from exc
        self.providers = tuple(self._session.get_providers())
        self._inputs = tuple(i.name for i in self._session.get_inputs())
        self._outputs = tuple(o.name for o in self._session.get_outputs())
        self._run_options = ort.RunOptions
        self._watchdog = watchdog or shared_watchdog()
        self._local = threading.local()

    @property
    def input_names(self) -> tuple[str, ...]:
        return self._inputs

    @property
    def output_names(self) -> tuple[str, ...]:
        return self._outputs

    @property
    def session(self) -> Any:
        """The onnxruntime.InferenceSession itself (benchmarks compare against it)."""
        return self._session

    def run(self, feed: Feed, timeout_s: float | None = None) -> dict[str, np.ndarray]:
        # One RunOptions per thread, armed with the watchdog for the call.
        try:
            options = self._local.options
        except AttributeError:
            options = self._local.options = self._run_options()
        deadline = None if timeout_s is None else self._watchdog.arm(options, timeout_s)
        try:
            results = self._session.run(self._outputs, feed, options)
        except Exception as exc:  # onnxruntime's own exception types; translated here
            if deadline is None or not options.terminate:
                raise InferenceError(f"{self.path.name} failed: {_first_line(exc)}") from exc
            return self._terminated(feed, options, deadline, timeout_s, exc)
        finally:
            if deadline is not None:
                self._watchdog.disarm(options)
        return dict(zip(self._outputs, results, strict=True))

    def _terminated(
        self,
        feed: Feed,
        options: Any,
        deadline: float,
        timeout_s: float | None,
        exc: Exception,
    ) -> dict[str, np.ndarray]:
        # The watchdog may set the flag just as a call ends, after its last look; the
        # next call on this thread then stops at once. Told from a real timeout by the
        # time taken, that call runs again.
        assert timeout_s is not None
        self._watchdog.disarm(options)
        options.terminate = False
        if time.monotonic() < deadline - timeout_s / 2:
            return self.run(feed, timeout_s)
        raise InferenceTimeoutError(
            f"{self.path.name} took longer than {timeout_s:g} s and was stopped"
        ) from exc


class _Call:
    __slots__ = ("done", "error", "feed", "result")

    def __init__(self, feed: Feed) -> None:
        self.feed = feed
        self.done = threading.Event()
        self.result: dict[str, np.ndarray] | None = None
        self.error: BaseException | None = None


class TFLiteRunner:
    """A LiteRT interpreter (serving signature, else tensors), one call at a time."""

    runtime = "litert"

    def __init__(self, path: Path, threads: int = 1) -> None:
        """Raises: InferenceError when LiteRT is missing or cannot load the model."""
        self.path = Path(path)
        try:
            self._model = LiteRTModel(self.path, runtime_threads(threads))
            inputs, outputs = self._model.details()
        except ImportError as exc:
            raise InferenceError(str(exc)) from None
        except Exception as exc:  # LiteRT's own errors (mostly ValueError); translated here
            raise InferenceError(
                f"LiteRT cannot load {self.path.name}: {_first_line(exc)}"
            ) from exc
        self._inputs = tuple(inputs)
        self._outputs = tuple(outputs)
        self._lock = threading.Lock()  # inline calls (no deadline) and the worker's calls
        self._queue: queue.SimpleQueue[_Call] = queue.SimpleQueue()
        self._worker: threading.Thread | None = None
        self._abandoned: _Call | None = None

    @property
    def input_names(self) -> tuple[str, ...]:
        return self._inputs

    @property
    def output_names(self) -> tuple[str, ...]:
        return self._outputs

    def _invoke(self, feed: Feed) -> dict[str, np.ndarray]:
        feed = {name: np.ascontiguousarray(value) for name, value in feed.items()}
        with self._lock:
            try:
                results = self._model.invoke(feed)
            except Exception as exc:  # LiteRT's own errors; translated here
                raise InferenceError(f"{self.path.name} failed: {_first_line(exc)}") from exc
        # LiteRT hands out copies (GetTensor owns its data), so they outlive the next call.
        return {name: results[name] for name in self._outputs}

    def _serve(self) -> None:
        while True:
            call = self._queue.get()
            try:
                call.result = self._invoke(call.feed)
            except BaseException as exc:  # handed to the waiting caller, never lost
                call.error = exc
            call.done.set()

    def run(self, feed: Feed, timeout_s: float | None = None) -> dict[str, np.ndarray]:
        if timeout_s is None:
            return self._invoke(feed)
        abandoned = self._abandoned
        if abandoned is not None:
            if not abandoned.done.is_set():
                raise InferenceError(f"{self.path.name} is still busy with a call that timed out")
            self._abandoned = None
        if self._worker is None:
            with self._lock:
                if self._worker is None:
                    self._worker = threading.Thread(
                        target=self._serve, name=f"edgefleet-litert-{self.path.name}", daemon=True
                    )
                    self._worker.start()
        call = _Call(feed)
        self._queue.put(call)
        if not call.done.wait(timeout_s):
            self._abandoned = call
            raise InferenceTimeoutError(
                f"{self.path.name} took longer than {timeout_s:g} s; its answer will be ignored"
            )
        if call.error is not None:
            raise call.error
        assert call.result is not None
        return call.result


def outputs_are_finite(outputs: Mapping[str, np.ndarray]) -> bool:
    """False when a float output holds NaN or infinity (the chain counts that as a failure)."""
    for array in outputs.values():
        # A sum of squares is NaN or infinite when any term is (it may also overflow: then
        # look closer). vdot is the cheapest numpy call for it (see schema.py).
        if (
            array.dtype.kind == "f"
            and not math.isfinite(_squares(array, array))
            and not np.isfinite(array).all()
        ):
            return False
    return True


def model_path(version_dir: Path, which: Which = "served") -> Path | None:
    """The model file a version directory serves (or falls back to), or None when absent."""
    version_dir = Path(version_dir)
    if which == "fallback":
        candidates: tuple[str, ...] = (FALLBACK_ONNX,)
    else:
        candidates = (SERVED_ONNX, SERVED_TFLITE)
    return next((version_dir / n for n in candidates if (version_dir / n).is_file()), None)


def open_runner(
    version_dir: Path,
    which: Which = "served",
    *,
    threads: int = 1,
    providers: Sequence[str] = (),
) -> ModelRunner:
    """Load the served (model.onnx | model.tflite) or fallback (model.float.onnx) model.

    Raises:
        InferenceError: the file is absent, its runtime is missing, or it does not load.
    """
    path = model_path(version_dir, which)
    if path is None:
        what = "float fallback model" if which == "fallback" else "model to serve"
        raise InferenceError(f"{version_dir} has no {what}")
    if path.suffix == ".tflite":
        return TFLiteRunner(path, threads)
    return OnnxRunner(path, threads, providers)
