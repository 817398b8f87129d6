"""Deadlines for onnxruntime calls that run on the caller's thread.

Why not a worker thread per call, or one persistent worker: handing a call to
another thread and waiting for its answer costs 20-30 us on the 2-core test
machine (a queue put, an Event and two GIL hand-overs), 11-15% of a 0.2 ms
model, against a 5% budget for all of `Predictor.predict`. onnxruntime offers
a cheaper and better way: a call made with `RunOptions` stops, raising, soon
after another thread sets `run_options.terminate = True` (checked between
operators). So the call runs inline, and this one daemon thread sets the flag
on calls that pass their deadline. Arming is a dict insert and disarming a dict
pop (~0.3 us together); the work of a timed-out call really stops, where an
abandoned worker thread would keep the CPU busy and the session locked.

Limit: the flag is read between operators, so one operator that runs far past
the deadline is not cut short; edge models are chains of short operators.

The thread polls only while calls are in flight, at a tick of a tenth of the
shortest deadline seen (2-50 ms), so a timeout fires within one tick of it; when
idle it sleeps on an Event until the next call arms it.
"""

from __future__ import annotations

import threading
import time
from typing import Any

MIN_TICK_S = 0.002
MAX_TICK_S = 0.05
IDLE_WAIT_S = 1.0


class Watchdog:
    """Sets `terminate` on the RunOptions of calls that outlive their deadline."""

    def __init__(self) -> None:
        self._calls: dict[int, tuple[float, Any]] = {}
        self._tick = MAX_TICK_S
        self._wake = threading.Event()
        self._sleeping = False
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()

    def arm(self, run_options: Any, timeout_s: float) -> float:
        """Watch `run_options` until `disarm`; returns the deadline (time.monotonic)."""
        if self._thread is None:
            self._start()
        deadline = time.monotonic() + timeout_s
        self._calls[id(run_options)] = (deadline, run_options)
        if timeout_s < self._tick * 10:
            self._tick = max(MIN_TICK_S, timeout_s / 10)
        if self._sleeping:
            self._wake.set()
        return deadline

    def disarm(self, run_options: Any) -> None:
        self._calls.pop(id(run_options), None)

    def _start(self) -> None:
        with self._start_lock:
            if self._thread is None:
                thread = threading.Thread(
                    target=self._loop, name="edgefleet-inference-watchdog", daemon=True
                )
                thread.start()
                self._thread = thread

    def _loop(self) -> None:
        while True:
            if not self._calls:
                # Announce the sleep, then look again: an `arm` that ran before this
                # flag was set is seen by the second look, one after it sets the event.
                self._sleeping = True
                if not self._calls:
                    self._wake.wait(IDLE_WAIT_S)
                self._wake.clear()
                self._sleeping = False
                continue
            time.sleep(self._tick)
            now = time.monotonic()
            for deadline, run_options in list(self._calls.values()):
                if now >= deadline:
                    run_options.terminate = True


_WATCHDOG: Watchdog | None = None
_WATCHDOG_LOCK = threading.Lock()


def shared_watchdog() -> Watchdog:
    """The process's one watchdog (its thread starts on the first armed call)."""
    global _WATCHDOG
    if _WATCHDOG is None:
        with _WATCHDOG_LOCK:
            if _WATCHDOG is None:
                _WATCHDOG = Watchdog()
    return _WATCHDOG
