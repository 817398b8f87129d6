"""The cache of large stages' telemetry readings (server/rollouts/stagetelemetry.py)."""

from __future__ import annotations

import datetime as dt

from edgefleet.server.drift.accuracy import Labelled
from edgefleet.server.rollouts.stagetelemetry import (
    ROWS_PER_SECOND,
    StageTelemetry,
    StageTelemetryCache,
)

T = dt.datetime(2026, 12, 7, 12, 0, tzinfo=dt.timezone.utc)
STAGE = (1, 0, T, False)  # rollout 1, its first stage started at T, not a shadow stage


class Reader:
    """Readings of `rows` rows that count themselves (in `requests`)."""

    def __init__(self, rows: int) -> None:
        self.rows = rows
        self.reads = 0

    def __call__(self) -> StageTelemetry:
        self.reads += 1
        nothing = Labelled(0, 0, 0.0, 0.0)
        return StageTelemetry(
            1, self.reads, 0, 0, None, None, 10, 0, 0, nothing, nothing, self.rows, T
        )


def at(seconds: float) -> dt.datetime:
    return T + dt.timedelta(seconds=seconds)


def test_a_large_reading_is_kept_a_second_per_rows_per_second() -> None:
    cache, reader = StageTelemetryCache(), Reader(5 * ROWS_PER_SECOND)
    assert cache.read(STAGE, T, reader).requests == 1
    assert cache.read(STAGE, at(4.9), reader).requests == 1  # kept 5 s
    assert cache.read(STAGE, at(5), reader).requests == 2  # then read afresh
    assert cache.read(STAGE, at(9.9), reader).requests == 2  # and that reading kept
    assert reader.reads == 2


def test_a_small_reading_is_not_kept() -> None:
    cache, reader = StageTelemetryCache(), Reader(ROWS_PER_SECOND - 1)  # under a second
    cache.read(STAGE, T, reader)
    cache.read(STAGE, T, reader)
    assert reader.reads == 2


def test_each_stage_keeps_its_own_reading() -> None:
    cache, reader = StageTelemetryCache(), Reader(10 * ROWS_PER_SECOND)
    cache.read(STAGE, T, reader)
    next_stage = (1, 1, at(1), False)  # the rollout advanced: another stage, another start
    assert cache.read(next_stage, at(1), reader).requests == 2
    assert cache.read((2, 0, T, False), at(1), reader).requests == 3  # another rollout
    assert cache.read(STAGE, at(1), reader).requests == 1  # still kept
    assert cache.read(STAGE, at(-1), reader).requests == 4  # a clock moved back reads afresh
