"""Benchmarks: where each device's part stands and, once answered, what it measured."""

from __future__ import annotations

import datetime as dt
from typing import Any

from pydantic import BaseModel

from edgefleet.server.benchmarks import DeviceState, device_state
from edgefleet.server.db.models import Benchmark, BenchmarkResult


class BenchmarkDevicePublic(BaseModel):
    """One device's part: pending until it answers; `results` as the device sent them
    (`edgefleet.benchwire.BenchmarkResults`), `refused` when it refused the request."""

    device_id: str
    state: DeviceState
    directive_sequence: int | None
    answered_at: dt.datetime | None
    error: str | None  # why the directive was not sent
    results: dict[str, Any] | None


class BenchmarkPublic(BaseModel):
    id: int
    requested_by: str
    requested_at: dt.datetime
    expires_at: dt.datetime
    profile: str
    target: str  # `device ID` or `tag K=V`
    sha256: str
    candidates: list[str]
    complete: bool  # no device's part is pending any more
    devices: list[BenchmarkDevicePublic]

    @classmethod
    def of(
        cls, benchmark: Benchmark, results: list[BenchmarkResult], now: dt.datetime
    ) -> BenchmarkPublic:
        devices = [
            BenchmarkDevicePublic(
                device_id=result.device_id,
                state=device_state(result, benchmark.expires_at, now),
                directive_sequence=result.directive_sequence,
                answered_at=result.answered_at,
                error=result.error,
                results=result.result,
            )
            for result in results
        ]
        return cls(
            id=benchmark.id,
            requested_by=benchmark.requested_by,
            requested_at=benchmark.requested_at,
            expires_at=benchmark.expires_at,
            profile=benchmark.profile,
            target=benchmark.selector,
            sha256=benchmark.sha256,
            candidates=list(benchmark.candidates),
            complete=all(device.state != "pending" for device in devices),
            devices=devices,
        )
