"""The fallback chain as `Predictor.reload` lays it out, and the answer it gives.

A `Serving` is built whole by `build_serving` and never changed: `predict`
reads it once per request, so a request never sees half of a reload.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np

from edgefleet.agent.inference.loaded import LoadedVersion, Step
from edgefleet.agent.inference.schema import InputValidator
from edgefleet.agent.inference.timing import CallLimit

StepName = Literal["primary", "float", "previous", "default"]


class Prediction(NamedTuple):
    """An answer: outputs by name, the chain step that gave it, the model, the latency.

    (A NamedTuple: immutable and the cheapest object to build on the hot path.)
    """

    outputs: dict[str, np.ndarray]
    step: StepName
    model: str  # name@version of the version that answered; "default" for the default answer
    latency_ms: float


class Tally:
    """A counter that threads may bump without a lock (itertools.count's next() is atomic)."""

    def __init__(self) -> None:
        self._count = itertools.count()
        self.add: Callable[[], int] = self._count.__next__  # a C call: no Python frame

    @property
    def value(self) -> int:
        return int(repr(self._count)[len("count(") : -1])  # "count(7)": next value, i.e. done


@dataclass(frozen=True)
class ChainStep:
    position: StepName
    version: LoadedVersion
    step: Step
    label: str
    revalidate: bool  # the inputs were checked against another schema
    answered: Tally
    limit: CallLimit  # the version's, measured on this device (timing.py)


@dataclass(frozen=True)
class Serving:
    """What `reload` found; replaced whole, never changed."""

    current: LoadedVersion | None
    previous: LoadedVersion | None
    steps: tuple[ChainStep, ...]
    # Inputs are checked against the first step's version: `current`, unless it failed to load.
    validator: InputValidator | None


def build_serving(
    current: LoadedVersion | None,
    previous: LoadedVersion | None,
    tallies: Mapping[StepName, Tally],
    limits: Mapping[Path, CallLimit],
) -> Serving:
    """primary and float of `current`, then `previous`'s served model; absent steps left out.

    `limits` holds the call limit of each version, by directory.
    """
    chain: list[tuple[StepName, LoadedVersion, Step]] = []
    if current is not None:
        chain.append(("primary", current, current.served))
        if current.fallback is not None:
            chain.append(("float", current, current.fallback))
    if previous is not None:
        chain.append(("previous", previous, previous.served))
    first = chain[0][1].schema.inputs if chain else None
    steps = tuple(
        ChainStep(
            position,
            version,
            step,
            version.label,
            version.schema.inputs != first,
            tallies[position],
            limits[version.directory],
        )
        for position, version, step in chain
    )
    return Serving(current, previous, steps, steps[0].version.validator if steps else None)


def split_outputs(
    outputs: Mapping[str, np.ndarray], sizes: Sequence[int]
) -> list[dict[str, np.ndarray]]:
    """Cut a stacked answer back into one answer per request (`sizes` samples each).

    An output without the batch axis (its first dimension is not the total) goes whole to each.
    """
    cuts = np.cumsum(sizes)[:-1]
    total = sum(sizes)
    parts: list[dict[str, np.ndarray]] = [{} for _ in sizes]
    for name, array in outputs.items():
        pieces = (
            np.split(array, cuts) if array.ndim and len(array) == total else [array] * len(sizes)
        )
        for part, piece in zip(parts, pieces, strict=True):
            part[name] = piece
    return parts
