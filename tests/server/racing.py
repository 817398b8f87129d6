"""Devices racing to enroll with one token: each in a thread of its own, started together."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

from edgefleet.server.errors import EnrollmentError


def race_to_enroll(
    enroll: Callable[[str], object], device_ids: Sequence[str]
) -> tuple[list[str], list[str]]:
    """Run `enroll(device_id)` for every id at once; the ids that enrolled, and the
    refusals (EnrollmentError's messages) of the others."""
    barrier = threading.Barrier(len(device_ids))
    enrolled: list[str] = []
    refused: list[str] = []

    def racer(device_id: str) -> None:
        barrier.wait()
        try:
            enroll(device_id)
            enrolled.append(device_id)
        except EnrollmentError as exc:
            refused.append(str(exc))

    threads = [threading.Thread(target=racer, args=(device_id,)) for device_id in device_ids]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return enrolled, refused
