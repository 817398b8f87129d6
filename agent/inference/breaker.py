"""A circuit breaker per step of the fallback chain: stop hammering a failing model.

    CLOSED --(`failures` consecutive failures)--> OPEN
    OPEN --(`reset_seconds` later, on the next request)--> HALF_OPEN: one trial call
    HALF_OPEN --success--> CLOSED;   HALF_OPEN --failure--> OPEN (for another reset_seconds)

While OPEN, and while a trial is in flight, `allow()` is False and the chain
skips the step. The clock is injected so tests can move time by hand.

Hot path: `allow()` in CLOSED is one attribute read, `succeeded()` one compare;
the lock is taken only on failures and state changes.
"""

from __future__ import annotations

import enum
import threading
import time
from collections.abc import Callable

Clock = Callable[[], float]


class BreakerState(str, enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half-open"


class CircuitBreaker:
    def __init__(self, failures: int, reset_seconds: float, clock: Clock = time.monotonic) -> None:
        if failures < 1 or reset_seconds <= 0:
            raise ValueError("failures must be >= 1 and reset_seconds > 0")
        self.failures = failures
        self.reset_seconds = reset_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self.state = BreakerState.CLOSED
        self.consecutive = 0  # failures in a row
        self._opened_at = 0.0
        self.opened = 0  # times it opened, for the chain's counters

    def allow(self) -> bool:
        """True when the step may be tried now (in HALF_OPEN: only the one trial)."""
        if self.state is BreakerState.CLOSED:
            return True
        with self._lock:
            if (
                self.state is BreakerState.OPEN
                and self._clock() - self._opened_at >= self.reset_seconds
            ):
                self.state = BreakerState.HALF_OPEN  # this caller makes the trial
                return True
            return False

    def succeeded(self) -> None:
        if self.consecutive == 0 and self.state is BreakerState.CLOSED:
            return
        with self._lock:
            self.consecutive = 0
            self.state = BreakerState.CLOSED

    def failed(self) -> None:
        with self._lock:
            self.consecutive += 1
            if self.state is BreakerState.HALF_OPEN or self.consecutive >= self.failures:
                if self.state is not BreakerState.OPEN:
                    self.opened += 1
                self.state = BreakerState.OPEN
                self._opened_at = self._clock()
