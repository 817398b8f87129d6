"""Benchmark requests: the converter's candidates measured on this device, apart from serving.

A verified `benchmark` directive (its sequence persisted by the installer) is
handed to `BenchmarkRunner.submit`, which queues it for the runner's own
worker, so neither installing nor serving waits for it. For each request, in
turn:

1. download the request the directive names (HTTP, by SHA-256 and length),
   into `benchmarks/` of the state directory;
2. verify and extract it exactly as a bundle (`extract_bundle`: the release
   role's signatures under this device's trust root, every file's length and
   SHA-256, the profile, the agent version), and require a benchmark request
   (`edgefleet.benchwire`): a refused request is reported as refused, with
   the reason, and nothing of it runs;
3. check that each candidate's runtime (onnxruntime for `.onnx`, LiteRT for
   `.tflite`) is one this device's profile runs and has installed, as the
   install's compatibility check does (`runtime-missing` otherwise, nothing
   started); run each candidate in a child process of its own
   (`edgefleet.agent.benchchild`), bounded in address space (RLIMIT_AS, set
   in the child before it loads anything) and in wall time (killed at the
   bound): never installed, never replacing the served model. A candidate
   that exceeds a bound or crashes is reported so, once: nothing is retried;
4. send the results signed with the device key (`edgefleet.benchwire`), a
   few attempts; then delete the request's files. They say `emulated` when
   `EDGEFLEET_EMULATED` is set (`edgefleet emulate agent` sets it): an agent
   cannot tell a qemu-user CPU from a real one by itself.

A request still queued or running when the agent stops is not resumed (its
directive was spent): the server shows it unanswered until it expires.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import os
import platform
import shutil
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from pydantic import ValidationError

from edgefleet import __version__
from edgefleet.agent.errors import CompatibilityError
from edgefleet.agent.install.compat import check_runtime
from edgefleet.agent.install.interfaces import Host
from edgefleet.agent.transport.http import HttpFetcher
from edgefleet.agent.upload import UploadError, post_signed
from edgefleet.benchwire import (
    EMULATED_ENV,
    REFERENCE_FILE,
    REQUEST_NAME,
    SMOKE_FILE,
    SPEC_FILE,
    BenchmarkResults,
    BenchmarkSpec,
    CandidateResult,
    CandidateSpec,
    ResultsUpload,
    results_path,
)
from edgefleet.bundle import BundleLimits, BundlePolicy, extract_bundle
from edgefleet.bundlefiles import SERVED_ONNX, SERVED_TFLITE
from edgefleet.errors import EdgefleetError, MalformedDocumentError, RuntimeNotOnProfileError
from edgefleet.mqtt.devicesig import DeviceKey
from edgefleet.mqtt.directives import Directive, HttpSource
from edgefleet.samplewire import sign_request
from edgefleet.timefmt import format_time, utcnow
from edgefleet.trust import TrustRoot
from edgefleet.wire import error_code

log = logging.getLogger(__name__)

CHILD_MODULE = "edgefleet.agent.benchchild"
UPLOAD_ATTEMPTS = 3
UPLOAD_RETRY_SECONDS = 2.0
TIMEOUT_SECONDS = 60.0
MAX_QUEUED = 8


def _describe(exc: BaseException) -> str:
    code = error_code(exc) if isinstance(exc, (EdgefleetError, OSError)) else "internal"
    return f"{code}: {exc}"[:500]


def _missing_runtime(candidate: CandidateSpec, profile: str, host: Host) -> CandidateResult | None:
    """`runtime-missing` when `profile` does not run the candidate's runtime or `host` has
    none of its modules installed (the install's own check); None when it can run here."""
    served_as = SERVED_TFLITE if candidate.model.endswith(".tflite") else SERVED_ONNX
    try:
        check_runtime(served_as, profile, host)
    except (CompatibilityError, RuntimeNotOnProfileError) as exc:
        return CandidateResult(
            name=candidate.name, outcome="runtime-missing", detail=str(exc)[:500]
        )
    return None


def run_candidate(
    spec: BenchmarkSpec, candidate: CandidateSpec, request_dir: Path, threads: int
) -> CandidateResult:
    """Measure one candidate of an extracted request in a bounded child process."""
    job = {
        "model": str(request_dir / candidate.model),
        "smoke": str(request_dir / SMOKE_FILE),
        "reference": str(request_dir / REFERENCE_FILE),
        "threads": threads,
        "warmup_runs": spec.warmup_runs,
        "rounds": spec.rounds,
        "runs_per_round": spec.runs_per_round,
    }
    job_file = request_dir / f"{candidate.name}.job.json"
    job_file.write_text(json.dumps(job))
    command = [sys.executable, "-m", CHILD_MODULE, str(spec.max_memory_bytes), str(job_file)]
    try:
        child = subprocess.run(
            command, capture_output=True, text=True, timeout=spec.max_seconds, check=False
        )
    except subprocess.TimeoutExpired:
        return CandidateResult(
            name=candidate.name,
            outcome="time-exceeded",
            detail=f"still running after the bound of {spec.max_seconds} s: killed",
        )
    lines = child.stdout.strip().splitlines()
    try:
        answer = json.loads(lines[-1]) if lines else {}
    except json.JSONDecodeError:
        answer = {}
    if child.returncode == 0 and "p50_ms" in answer:
        try:
            return CandidateResult.model_validate(
                {"name": candidate.name, "outcome": "measured", **answer}
            )
        except ValidationError as exc:  # e.g. NaN outputs: no figure to report
            answer = {"error": f"unusable figures: {exc.errors()[0]['msg']}"}
    bound = f"{spec.max_memory_bytes // 1024**2} MiB"
    if answer.get("memory"):
        return CandidateResult(
            name=candidate.name,
            outcome="memory-exceeded",
            detail=f"over the memory bound of {bound}: {answer.get('error', '')}"[:500],
        )
    ending = (
        f"killed by signal {-child.returncode}"
        if child.returncode < 0
        else f"exit status {child.returncode}"
    )
    why = answer.get("error") or (child.stderr.strip().splitlines() or [""])[-1]
    return CandidateResult(
        name=candidate.name, outcome="failed", detail=f"{ending}: {why}".strip(": ")[:500]
    )


def read_request(request_dir: Path) -> BenchmarkSpec:
    """The spec of an extracted request.

    Raises:
        MalformedDocumentError: no spec, or one that is not valid.
    """
    try:
        return BenchmarkSpec.model_validate_json((request_dir / SPEC_FILE).read_bytes())
    except FileNotFoundError as exc:
        raise MalformedDocumentError(f"the request holds no {SPEC_FILE}") from exc
    except ValidationError as exc:
        raise MalformedDocumentError(f"{SPEC_FILE} is not valid: {exc.errors()[0]['msg']}") from exc


def measure_request(
    request: Path,
    work_dir: Path,
    trust: TrustRoot,
    policy: BundlePolicy,
    device_id: str,
    threads: int,
    host: Host | None = None,
) -> BenchmarkResults:
    """Verify the request file `request` as a bundle, run every candidate, and say what came
    of each; a request that does not verify is answered `refused`, and nothing of it runs.
    `host` answers which runtimes are installed (this machine by default).
    The extracted files are removed before returning."""
    base = BenchmarkResults(
        device_id=device_id,
        profile=policy.profile or "",
        machine=platform.machine(),
        emulated=EMULATED_ENV in os.environ,
    )
    extracted = Path(tempfile.mkdtemp(prefix="request-", dir=work_dir)) / "files"
    try:
        try:
            verified = extract_bundle(request, extracted, trust, policy, BundleLimits())
            if verified.manifest.name != REQUEST_NAME:
                raise MalformedDocumentError(
                    f"{verified.manifest.name}@{verified.manifest.version} is a bundle, "
                    "not a benchmark request"
                )
            spec = read_request(extracted)
        except (EdgefleetError, OSError) as exc:
            log.warning("benchmark request refused: %s", _describe(exc))
            return base.model_copy(update={"refused": _describe(exc)})
        results = []
        for candidate in spec.candidates:
            result = _missing_runtime(
                candidate, policy.profile or spec.target, host or Host()
            ) or run_candidate(spec, candidate, extracted, threads)
            log.info(
                "benchmark candidate %s: %s%s",
                candidate.name,
                result.outcome,
                f" ({result.detail})" if result.detail else f", p50 {result.p50_ms:.3f} ms",
            )
            results.append(result)
        return base.model_copy(update={"candidates": results})
    finally:
        shutil.rmtree(extracted.parent, ignore_errors=True)


def upload_results(
    server_url: str,
    benchmark_id: int,
    results: BenchmarkResults,
    key: DeviceKey,
    context: ssl.SSLContext | None,
) -> None:
    """Send `results`, signed with the device key.

    Raises:
        UploadError: the server refused them, or did not answer (named).
    """
    body = results.model_dump_json().encode()
    meta = ResultsUpload(
        device_id=results.device_id,
        benchmark_id=benchmark_id,
        sent_at=format_time(utcnow()),
        sha256=hashlib.sha256(body).hexdigest(),
        size_bytes=len(body),
    ).model_dump_json()
    path = results_path(results.device_id, benchmark_id)
    signature = sign_request(path, meta.encode(), key)
    post_signed(server_url, path, body, "application/json", meta, signature, context)


class BenchmarkRunner:
    """Benchmark requests queued by the install worker, measured by a worker of their own."""

    def __init__(
        self,
        device_id: str,
        profile: str,
        threads: int,
        work_dir: Path,
        server_url: str,
        key: DeviceKey,
        trust: Callable[[], TrustRoot],
        ssl_context: ssl.SSLContext | None,
    ) -> None:
        self.device_id = device_id
        self.profile = profile
        self.threads = threads
        self.work_dir = work_dir
        self.server_url = server_url
        self.key = key
        self.trust = trust
        self.ssl_context = ssl_context
        self.fetcher = HttpFetcher(ssl_context=ssl_context)
        self._queue: collections.deque[Directive] = collections.deque(maxlen=MAX_QUEUED)
        self._lock = threading.Lock()
        self.wake: Callable[[], None] = lambda: None  # set to the worker's wake

    def submit(self, directive: Directive) -> None:
        """The installer's `on_benchmark`: queue a verified benchmark directive, at once."""
        with self._lock:
            self._queue.append(directive)
        log.info("benchmark request %d queued", directive.request_id)
        self.wake()

    def step(self) -> None:
        """Measure and answer every queued request, oldest first."""
        while True:
            with self._lock:
                if not self._queue:
                    return
                directive = self._queue.popleft()
            self.answer(directive)

    def answer(self, directive: Directive) -> None:
        request_id, bundle = directive.request_id, directive.bundle
        assert request_id is not None and bundle is not None  # the schema requires them
        self.work_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        download = self.work_dir / f"{request_id}.efb"
        try:
            source = next(s for s in directive.sources if isinstance(s, HttpSource))
            try:
                self.fetcher.fetch_from(source, bundle, download)
            except (EdgefleetError, OSError) as exc:
                results = BenchmarkResults(
                    device_id=self.device_id,
                    profile=self.profile,
                    machine=platform.machine(),
                    emulated=EMULATED_ENV in os.environ,
                    refused=f"not downloaded: {_describe(exc)}",
                )
            else:
                policy = BundlePolicy(profile=self.profile, agent_version=__version__)
                results = measure_request(
                    download, self.work_dir, self.trust(), policy, self.device_id, self.threads
                )
            self._send(request_id, results)
        finally:
            for leftover in self.work_dir.glob(f"{request_id}.efb*"):
                leftover.unlink(missing_ok=True)

    def _send(self, request_id: int, results: BenchmarkResults) -> None:
        for attempt in range(1, UPLOAD_ATTEMPTS + 1):
            try:
                upload_results(self.server_url, request_id, results, self.key, self.ssl_context)
                log.info("benchmark request %d answered", request_id)
                return
            except UploadError as exc:
                log.warning(
                    "benchmark request %d: results not sent (attempt %d of %d): %s",
                    request_id,
                    attempt,
                    UPLOAD_ATTEMPTS,
                    exc,
                )
                if attempt < UPLOAD_ATTEMPTS:
                    time.sleep(UPLOAD_RETRY_SECONDS * attempt)


__all__ = [
    "BenchmarkRunner",
    "measure_request",
    "read_request",
    "run_candidate",
    "upload_results",
]
