"""Per-caller token buckets: `api_rate_per_minute` requests a minute, bursts up to that.

A bucket is kept per API token (keyed by a digest of the secret, never the
secret itself), and per client address two: one for enrollment (the route
without a token) and one for failed authentications, so guessing tokens from
an address never throttles enrollment from it (`deps.py`). State is in
memory, per process: with several replicas each applies the limit on its own,
which is enough to stop a runaway script without a shared store.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from edgefleet.server.errors import RateLimitedError

# Full buckets are forgotten once this many are kept (a full bucket equals a new one).
MAX_BUCKETS = 10_000


@dataclass
class _Bucket:
    tokens: float
    updated: float


class RateLimiter:
    """Token buckets keyed by caller.

    `rate_per_minute` tokens are added per minute, up to `rate_per_minute`;
    each request takes one.
    """

    def __init__(self, rate_per_minute: int, clock: Callable[[], float] = time.monotonic) -> None:
        if rate_per_minute < 1:
            raise ValueError(f"rate_per_minute must be >= 1, not {rate_per_minute}")
        self.capacity = float(rate_per_minute)
        self.per_second = rate_per_minute / 60.0
        self._clock = clock
        self._buckets: dict[str, _Bucket] = {}
        self._lock = threading.Lock()

    def check(self, key: str) -> None:
        """Take one token from `key`'s bucket.

        Raises:
            RateLimitedError: the bucket is empty; nothing was taken.
        """
        now = self._clock()
        with self._lock:
            bucket = self._buckets.get(key)
            if bucket is None:
                if len(self._buckets) >= MAX_BUCKETS:
                    self._forget_full(now)
                bucket = self._buckets[key] = _Bucket(self.capacity, now)
            else:
                elapsed = max(0.0, now - bucket.updated)
                bucket.tokens = min(self.capacity, bucket.tokens + elapsed * self.per_second)
                bucket.updated = now
            if bucket.tokens >= 1.0:
                bucket.tokens -= 1.0
                return
            wait = math.ceil((1.0 - bucket.tokens) / self.per_second)
        raise RateLimitedError(
            f"too many requests: the limit is {int(self.capacity)} a minute; retry after {wait} s",
            retry_after=max(1, wait),
        )

    def _forget_full(self, now: float) -> None:
        full = [
            key
            for key, bucket in self._buckets.items()
            if bucket.tokens + (now - bucket.updated) * self.per_second >= self.capacity
        ]
        for key in full:
            del self._buckets[key]
        if len(self._buckets) >= MAX_BUCKETS:  # all busy: drop the oldest half
            oldest = sorted(self._buckets, key=lambda k: self._buckets[k].updated)
            for key in oldest[: len(oldest) // 2]:
                del self._buckets[key]


__all__ = ["RateLimiter"]
