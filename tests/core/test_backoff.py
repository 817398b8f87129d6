"""The one retry helper: exponential, capped, jittered, repeatable with a seeded random source."""

from __future__ import annotations

import random

from edgefleet.backoff import Backoff


def test_backoff_is_jittered_exponential_and_bounded() -> None:
    backoff = Backoff(initial=1.0, maximum=60.0)
    rng = random.Random(4)
    for retry in range(40):
        cap = min(60.0, 2.0**retry)
        delays = [backoff.delay(retry, rng) for _ in range(50)]
        assert all(cap / 2 <= d <= cap for d in delays)
        assert len(set(delays)) > 1  # jittered


def test_a_seeded_random_source_gives_the_same_delays() -> None:
    backoff = Backoff(initial=0.5, maximum=30.0, factor=3.0)
    first = [backoff.delay(retry, random.Random(9)) for retry in range(10)]
    again = [backoff.delay(retry, random.Random(9)) for retry in range(10)]
    assert first == again
    assert 0.25 <= first[0] <= 0.5 and 0.75 <= first[1] <= 1.5 and 15.0 <= first[-1] <= 30.0
