"""Waits between retries: exponential, capped, jittered.

One helper for everything that retries against a peer that may be away (a
download, enrollment, the agent's and the server's MQTT links). The random
source is passed in, so a test seeds it and gets the same delays every run.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Backoff:
    """Retry `n` (from 0) waits uniform(cap/2, cap), cap = min(maximum, initial * factor**n).

    Half-jitter keeps a fleet that lost its peer at the same moment from coming
    back in step, while never retrying sooner than half the cap.
    """

    initial: float = 1.0
    maximum: float = 120.0
    factor: float = 2.0

    def delay(self, retry: int, rng: random.Random) -> float:
        cap = min(self.maximum, self.initial * self.factor ** min(max(retry, 0), 64))
        return rng.uniform(cap / 2, cap)


__all__ = ["Backoff"]
