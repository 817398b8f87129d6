"""Shadow mode: a challenger version runs beside the champion on a sampled share of requests.

The challenger runs on its own worker thread, after the champion has answered,
so it adds no latency to any request and nothing it does (errors, NaN,
timeouts, a different schema) reaches the caller: each sampled request ends as
an agreement or a disagreement, counted, and a failure is a disagreement. When
the worker is still busy with earlier requests (at most MAX_PENDING queued),
the sample is skipped and counted as skipped, so a slow challenger never
builds a backlog.

Agreement (`outputs_agree`), per output and for every sample: integer outputs
(class labels) must be equal; float outputs of shape [batch, classes>1] must
have the same top-1 class; other float outputs must be close (relative 1e-2,
absolute 1e-3 of the champion's scale).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from edgefleet.agent.errors import AgentError
from edgefleet.agent.inference.loaded import LoadedVersion
from edgefleet.agent.inference.runtimes import outputs_are_finite
from edgefleet.agent.inference.timing import CallLimit, sample_count

log = logging.getLogger(__name__)

MAX_PENDING = 2
RTOL = 1e-2
ATOL_SCALE = 1e-3


def outputs_agree(champion: Mapping[str, np.ndarray], challenger: Mapping[str, np.ndarray]) -> bool:
    """True when the challenger gives the champion's answer (see the module docstring)."""
    if set(champion) != set(challenger):
        return False
    for name, expected in champion.items():
        found = np.asarray(challenger[name])
        if found.shape != expected.shape:
            return False
        if expected.dtype.kind in "biu" and found.dtype.kind in "biu":
            if not np.array_equal(expected, found):
                return False
        elif expected.ndim == 2 and expected.shape[1] > 1:
            if not np.array_equal(expected.argmax(axis=1), found.argmax(axis=1)):
                return False
        else:
            scale = float(np.abs(expected).max()) if expected.size else 0.0
            if not np.allclose(found, expected, rtol=RTOL, atol=ATOL_SCALE * scale + 1e-9):
                return False
    return True


@dataclass
class ShadowStats:
    sampled: int = 0
    agreements: int = 0
    failures: int = 0  # challenger raised, timed out or refused the inputs
    skipped: int = 0  # the worker was busy


_Job = tuple[dict[str, np.ndarray], dict[str, np.ndarray]]  # inputs, the champion's answer


class Challenger:
    """One challenger version and the thread that runs it."""

    def __init__(
        self,
        version: LoadedVersion,
        limit: CallLimit,
        on_result: Callable[[bool], None] | None = None,
    ) -> None:
        self.version = version
        self._limit = limit
        self._on_result = on_result
        self.stats = ShadowStats()
        self._queue: queue.Queue[_Job | None] = queue.Queue(maxsize=MAX_PENDING)  # None: stop
        self._idle = threading.Condition()
        self._pending = 0
        self._thread = threading.Thread(
            target=self._serve, name=f"edgefleet-shadow-{version.label}", daemon=True
        )
        self._thread.start()

    def submit(self, inputs: Mapping[str, np.ndarray], answer: Mapping[str, np.ndarray]) -> bool:
        """Queue one comparison (copies of the arrays); False when skipped because busy."""
        job: _Job = ({k: np.array(v) for k, v in inputs.items()}, dict(answer))
        with self._idle:
            try:
                self._queue.put_nowait(job)
            except queue.Full:
                self.stats.skipped += 1
                return False
            self._pending += 1
        return True

    def _compare(self, inputs: Mapping[str, np.ndarray], answer: Mapping[str, np.ndarray]) -> bool:
        try:
            feed = self.version.validator.validate(inputs)
            found = self.version.served.runner().run(feed, self._limit.seconds(sample_count(feed)))
        except AgentError as exc:
            self.stats.failures += 1
            log.info("challenger %s failed: %s", self.version.label, exc)
            return False
        if not outputs_are_finite(found):
            self.stats.failures += 1
            return False
        return outputs_agree(answer, found)

    def _serve(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            inputs, answer = job
            try:
                agreed = self._compare(inputs, answer)
            except Exception:  # the challenger must never take the agent down
                log.exception("challenger %s comparison failed", self.version.label)
                self.stats.failures += 1
                agreed = False
            if self._on_result is not None:
                self._on_result(agreed)
            with self._idle:
                self.stats.sampled += 1
                self.stats.agreements += int(agreed)
                self._pending -= 1
                self._idle.notify_all()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until every queued comparison is done; False on timeout."""
        with self._idle:
            return self._idle.wait_for(lambda: self._pending == 0, timeout)

    def close(self) -> None:
        """Stop the worker after the comparisons already queued (a hung one is left behind)."""
        try:
            self._queue.put(None, timeout=1.0)
        except queue.Full:
            log.warning("challenger %s is stuck; its thread is left to end", self.version.label)
