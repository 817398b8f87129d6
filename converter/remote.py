"""`--measure-on`: the candidates timed on devices of the target instead of this machine.

The candidates the converter would choose among (the float model and every
candidate within the budget) are packed as a benchmark request
(`edgefleet.benchwire`), signed with the release key as a bundle is, and
uploaded to the fleet server (`POST /api/v1/benchmarks`), which sends it to the
device named, or to the online devices with a tag, of the target profile. The
converter then polls `GET /api/v1/benchmarks/{id}` (a progress line each time)
until every device answered or the timeout passed, and takes the figures of the
first device (by id) that measured them:

- each candidate's speed: the device ran it in `ROUNDS` rounds of runs, and
  the fastest run of each round is set against the float model's in the
  same round number (`PairedTiming`: the same choice rules as on this
  machine, but the rounds of two candidates ran one after the other, in
  separate processes, not interleaved);
- its latency (p50, with p90, p99) and peak memory, in the report;
- its outputs on the smoke samples against the float model's: a candidate
  that answers differently there (cosine below the budget's) misses the budget;
- a candidate that exceeded a bound or failed there, or whose runtime the device
  lacks, is rejected with the reason.

ONNX candidates run there with onnxruntime, TFLite ones (`--tflite`, and every
candidate of a target that runs TFLite only, where the float model is the
float32 TFLite one) with LiteRT, as the agent serves them.

Fidelity on the full validation set is still judged on this machine.
Standard library HTTP only (urllib): the converter needs no HTTP client.
"""

from __future__ import annotations

import json
import shutil
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

from edgefleet import __version__
from edgefleet.benchwire import (
    REFERENCE_FILE,
    REQUEST_NAME,
    REQUEST_VERSION,
    SMOKE_FILE,
    SPEC_FILE,
    BenchmarkResults,
    BenchmarkSpec,
    CandidateResult,
    CandidateSpec,
)
from edgefleet.bundle import build_bundle
from edgefleet.converter.choose import Evaluation, PairedTiming
from edgefleet.converter.context import ConversionContext, MeasureOn
from edgefleet.converter.errors import ConversionFailedError, DeviceMeasurementError
from edgefleet.converter.evaluate import MAX_RUNS_PER_ROUND, PAIRED_ROUNDS, ROUND_SECONDS
from edgefleet.converter.progress import Progress
from edgefleet.wire import API_PREFIX

SMOKE_SAMPLES = 8
WARMUP_RUNS = 10
POLL_SECONDS = 2.0
HTTP_TIMEOUT_SECONDS = 60.0


def device_label(device_id: str, profile: str, emulated: bool = False) -> str:
    where = f"profile {profile}, emulated: correctness only" if emulated else f"profile {profile}"
    return f"device {device_id} ({where})"


def _feeds_npz(path: Path, feeds: list[dict[str, np.ndarray]]) -> None:
    np.savez(
        path,
        **{
            f"{index}/{name}": array
            for index, feed in enumerate(feeds)
            for name, array in feed.items()
        },  # type: ignore[arg-type]
    )


def build_request(
    context: ConversionContext, evaluations: list[Evaluation], measure: MeasureOn, out: Path
) -> Path:
    """The signed benchmark request for `evaluations` (each with a model file) at `out`."""
    folder = context.workdir / "benchmark-request"
    (folder / "candidates").mkdir(parents=True)
    specs = []
    for evaluation in evaluations:
        assert evaluation.path is not None
        spec = CandidateSpec(
            name=evaluation.candidate.name,
            model=f"candidates/{evaluation.candidate.name}{evaluation.path.suffix}",
        )
        shutil.copyfile(evaluation.path, folder / spec.model)
        specs.append(spec)
    feeds = list(context.validation.samples(range(min(SMOKE_SAMPLES, context.validation.size))))
    names = [spec.name for spec in context.info.outputs]
    reference = [
        dict(zip(names, context.float_session.run(names, feed), strict=True))  # type: ignore[attr-defined]
        for feed in feeds
    ]
    _feeds_npz(folder / SMOKE_FILE, feeds)
    _feeds_npz(folder / REFERENCE_FILE, reference)
    runs = round(ROUND_SECONDS * 1000 / max(context.float_ms, 1e-6))
    spec_doc = BenchmarkSpec(
        target=context.profile.name,
        candidates=specs,
        warmup_runs=WARMUP_RUNS,
        rounds=PAIRED_ROUNDS,
        runs_per_round=max(1, min(MAX_RUNS_PER_ROUND, runs)),
        max_memory_bytes=measure.max_memory_mib * 1024**2,
        max_seconds=measure.max_seconds,
    )
    (folder / SPEC_FILE).write_text(spec_doc.model_dump_json(indent=2))
    build_bundle(
        folder,
        out,
        name=REQUEST_NAME,
        version=REQUEST_VERSION,
        keys=measure.keys,
        profiles=[context.profile.name],
        min_agent_version=__version__,
        lineage={"benchmark_of": context.model.name},
        serves_model=False,  # candidates to measure, not a model to install
    )
    return out


def _call(
    measure: MeasureOn, method: str, path: str, body: bytes | None = None, **query: str
) -> Any:
    url = f"{measure.server.rstrip('/')}{API_PREFIX}{path}"
    if query:
        url += "?" + urllib.parse.urlencode(query)
    headers = {"Content-Type": "application/octet-stream"}
    if measure.token:
        headers["Authorization"] = f"Bearer {measure.token}"
    request = urllib.request.Request(url, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_SECONDS) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        try:
            detail = json.loads(exc.read(4096)).get("detail", "")
        except ValueError:
            detail = ""
        raise DeviceMeasurementError(
            f"the fleet server refused the benchmark ({exc.code}): {detail or exc.reason}"
        ) from exc
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise DeviceMeasurementError(
            f"cannot reach the fleet server at {measure.server}: {reason}; check --server"
        ) from exc


def _wait(measure: MeasureOn, created: dict[str, Any], progress: Progress) -> dict[str, Any]:
    """Poll the benchmark until no device's part is pending, or the timeout."""
    deadline = time.monotonic() + measure.timeout_s
    progress.start(
        f"measuring {len(created['candidates'])} candidates on {created['target']} "
        f"(benchmark {created['id']}, profile {created['profile']})",
        len(created["devices"]),
    )
    done = 0
    try:
        while True:
            found: dict[str, Any] = _call(measure, "GET", f"/benchmarks/{created['id']}")
            settled = sum(1 for part in found["devices"] if part["state"] != "pending")
            progress.advance(settled - done)
            done = settled
            if found["complete"] or time.monotonic() >= deadline:
                return found
            time.sleep(POLL_SECONDS)
    finally:
        progress.finish()


def _measured(found: dict[str, Any], names: set[str]) -> tuple[BenchmarkResults, list[str]]:
    """The first device's results that cover every candidate, and notes on every device."""
    notes, usable = [], []
    for part in found["devices"]:
        results = part["results"]
        if results is None:
            notes.append(
                f"device {part['device_id']}: {part['state']}"
                + (f" ({part['error']})" if part["error"] else "")
            )
            continue
        parsed = BenchmarkResults.model_validate(results)
        if parsed.refused:
            notes.append(f"device {parsed.device_id} refused the request: {parsed.refused}")
        elif {c.name for c in parsed.candidates} >= names:
            usable.append(parsed)
    if not usable:
        raise DeviceMeasurementError(
            f"no device measured benchmark {found['id']} ({found['target']}): "
            + "; ".join(notes or ["no answer"])
            + ": start a device of the target, or raise --measure-timeout"
        )
    return usable[0], notes


def _apply(
    evaluation: Evaluation,
    measured: CandidateResult,
    float_result: CandidateResult,
    label: str,
    min_cosine: float,
) -> None:
    evaluation.measured_on = label
    if measured.outcome != "measured":
        evaluation.error = f"on {label}: {measured.outcome}: {measured.detail or ''}".rstrip(": ")
        return
    evaluation.device_figures = measured.model_dump(exclude={"name", "round_ms"})
    evaluation.latency_ms = measured.p50_ms
    if not evaluation.is_float:
        evaluation.timing = PairedTiming(tuple(measured.round_ms), tuple(float_result.round_ms))
    for output, figures in measured.fidelity.items():
        if figures.cosine < min_cosine:
            evaluation.failures.append(
                f"{output}: cosine {figures.cosine:.4f} against float on the smoke samples on "
                f"{label} < {min_cosine}"
            )


def measure_on_devices(
    context: ConversionContext,
    evaluations: list[Evaluation],
    measure: MeasureOn,
    progress: Progress,
) -> list[str]:
    """Time the float model and every usable candidate on a device; their figures replace
    this machine's. Returns the notes for the report.

    Raises:
        DeviceMeasurementError: the server refused the request, or no device measured it.
        ConversionFailedError: the float model itself failed on the device.
    """
    sent = [e for e in evaluations if e.is_float or e.usable]
    request = build_request(context, sent, measure, context.workdir / "benchmark.efb")
    created = _call(measure, "POST", "/benchmarks", request.read_bytes(), **measure.query())
    found = _wait(measure, created, progress)
    results, notes = _measured(found, {e.candidate.name for e in sent})
    by_name = {c.name: c for c in results.candidates}
    label = device_label(results.device_id, results.profile, results.emulated)
    float_result = by_name["float"]
    if float_result.outcome != "measured":
        remedy = (
            "install it there"
            if float_result.outcome == "runtime-missing"
            else "raise the bounds (--measure-memory)"
        )
        raise ConversionFailedError(
            f"the float model did not run on {label} ({float_result.outcome}: "
            f"{float_result.detail}): nothing to compare the candidates with; {remedy} "
            "or measure on another device"
        )
    for evaluation in sent:
        _apply(
            evaluation,
            by_name[evaluation.candidate.name],
            float_result,
            label,
            context.options.budget.min_cosine,
        )
    return [
        f"latency and memory measured on {label}, machine {results.machine}, benchmark "
        f"{created['id']}: {len(sent)} candidate(s), {PAIRED_ROUNDS} rounds each; fidelity "
        "judged on this machine on the validation data",
        *notes,
    ]


__all__ = ["build_request", "device_label", "measure_on_devices"]
