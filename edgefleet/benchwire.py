"""Candidates measured on a device: the request the converter signs, the results a device sends.

The request is a bundle (`edgefleet.bundle`) signed by the release role, so a
device trusts it exactly as it trusts a bundle (signatures, every file's
length and SHA-256, profile, agent version), named `REQUEST_NAME` and holding:

    benchmark.json   `BenchmarkSpec`: the candidates, run counts and bounds
    candidates/*     each candidate's model file: `.onnx` (run with onnxruntime) or
                     `.tflite` (run with LiteRT, as the agent serves it)
    smoke.npz        the inputs every candidate runs: key "<sample>/<input>"
    reference.npz    the float model's outputs for them (on the build machine):
                     key "<sample>/<output>"; where the target runs TFLite only, the
                     float model is the float32 TFLite one

It is never installed: it holds no model to serve, and only a benchmark
directive names it. The server sends a signed `benchmark` directive naming
the request by SHA-256 and length (`edgefleet.mqtt.Directive`); the device
answers over HTTP, signed with its enrolled key as an upload of raw inputs is
(`edgefleet.samplewire`):

    POST /api/v1/devices/{device_id}/benchmarks/{benchmark_id}
    X-Edgefleet-Sample:    `ResultsUpload`, compact JSON
    X-Edgefleet-Signature: the device's signature over it, bound to this path
    body:                  `BenchmarkResults`, JSON (its SHA-256 and size in the metadata)
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from edgefleet.validation import Timestamp
from edgefleet.wire import API_PREFIX

REQUEST_NAME = "edgefleet-benchmark"
REQUEST_VERSION = "0.0.0"
SPEC_FILE = "benchmark.json"
SMOKE_FILE = "smoke.npz"
REFERENCE_FILE = "reference.npz"
MAX_CANDIDATES = 64
MAX_RESULTS_BYTES = 256 * 1024
MAX_ROUNDS = 64
MAX_DETAIL_CHARS = 512
# Set by `edgefleet emulate agent` for the agent it runs on an emulated CPU: its results
# say `emulated`, and their latency stands for no real device.
EMULATED_ENV = "EDGEFLEET_EMULATED"

# What became of one candidate on the device ("runtime-missing": its runtime is not
# installed there, or the device's profile does not run it; nothing was started).
Outcome = Literal["measured", "memory-exceeded", "time-exceeded", "runtime-missing", "failed"]
Finite = Annotated[float, Field(allow_inf_nan=False, ge=0)]


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)


class CandidateSpec(_Model):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9.-]{0,127}$")
    model: str = Field(pattern=r"^candidates/[a-z0-9][a-z0-9.-]{0,127}\.(onnx|tflite)$")


class BenchmarkSpec(_Model):
    """benchmark.json: what every candidate runs, and the bounds of each child process."""

    schema_version: Literal[1] = 1
    target: str = Field(max_length=64)  # the conversion's target profile
    candidates: list[CandidateSpec] = Field(min_length=1, max_length=MAX_CANDIDATES)
    warmup_runs: int = Field(ge=0, le=1000)
    rounds: int = Field(ge=1, le=MAX_ROUNDS)  # timed runs come in this many rounds
    runs_per_round: int = Field(ge=1, le=1000)
    max_memory_bytes: int = Field(ge=16 * 1024**2)  # the child's address space
    max_seconds: int = Field(ge=1, le=3600)  # the child's wall time


class OutputFidelity(_Model):
    """One output on the smoke samples against the float model's (from the request)."""

    cosine: Annotated[float, Field(allow_inf_nan=False)]
    max_abs_error: Finite


class CandidateResult(_Model):
    name: str = Field(max_length=128)
    outcome: Outcome
    detail: Annotated[str, Field(max_length=MAX_DETAIL_CHARS)] | None = None
    p50_ms: Finite | None = None
    p90_ms: Finite | None = None
    p99_ms: Finite | None = None
    # The fastest run of each round (the converter pairs them with the float model's).
    round_ms: list[Finite] = Field(default_factory=list, max_length=MAX_ROUNDS)
    peak_rss_bytes: Annotated[int, Field(ge=0)] | None = None
    fidelity: dict[Annotated[str, Field(max_length=256)], OutputFidelity] = Field(
        default_factory=dict, max_length=64
    )


class BenchmarkResults(_Model):
    """What a device measured, or why it refused the whole request (`refused`)."""

    device_id: str = Field(max_length=128)
    profile: str = Field(max_length=64)
    machine: str = Field(max_length=64)  # platform.machine() on the device
    emulated: bool = False  # the device is an emulated CPU (EMULATED_ENV): correctness only
    refused: Annotated[str, Field(max_length=MAX_DETAIL_CHARS)] | None = None
    candidates: list[CandidateResult] = Field(default_factory=list, max_length=MAX_CANDIDATES)


class ResultsUpload(_Model):
    """The signed metadata of a results upload."""

    device_id: str = Field(max_length=128)
    benchmark_id: int = Field(ge=1)
    sent_at: Timestamp
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size_bytes: int = Field(ge=1, le=MAX_RESULTS_BYTES)


def results_path(device_id: str, benchmark_id: int) -> str:
    return f"{API_PREFIX}/devices/{device_id}/benchmarks/{benchmark_id}"


def request_path(benchmark_id: int) -> str:
    """Where a device downloads the request (no token: it verifies what it gets)."""
    return f"{API_PREFIX}/benchmarks/{benchmark_id}/request"


__all__ = [
    "EMULATED_ENV",
    "MAX_RESULTS_BYTES",
    "REFERENCE_FILE",
    "REQUEST_NAME",
    "REQUEST_VERSION",
    "SMOKE_FILE",
    "SPEC_FILE",
    "BenchmarkResults",
    "BenchmarkSpec",
    "CandidateResult",
    "CandidateSpec",
    "Outcome",
    "OutputFidelity",
    "ResultsUpload",
    "request_path",
    "results_path",
]
