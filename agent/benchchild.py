"""One candidate of a benchmark request, measured in a child process of its own.

    python -m edgefleet.agent.benchchild MAX_MEMORY_BYTES JOB.json

The address space (RLIMIT_AS) is bounded before numpy or the runtime is
imported, so the model, its session and every run stay within it. An `.onnx`
candidate runs with onnxruntime (CPU), a `.tflite` one with LiteRT through
`edgefleet.litert`, as the agent serves it (serving signature, else tensors;
contiguous inputs). The parent bounds the wall time and reads the child's
one line of JSON on stdout: the latency of every timed run summarised (p50,
p90, p99, the fastest run of each round), the peak resident memory, and each
output's fidelity on the smoke samples against the float model's outputs
shipped in the request. A failure is one line of JSON too (`error`, and
`memory` when an allocation failed), and exit status 3. The parent
(`edgefleet.agent.benchmark`) tells the other endings apart: killed at the
time bound, or crashed.
"""

from __future__ import annotations

import json
import resource
import sys
from collections.abc import Callable
from typing import Any

# One candidate loaded: its outputs by name for one feed.
Runner = Callable[[dict[str, Any]], dict[str, Any]]

# How an allocation refused under RLIMIT_AS shows in the error of numpy, onnxruntime,
# the dynamic loader or a thread pool.
ALLOCATION_FAILURES = (
    "bad_alloc",
    "Failed to allocate",
    "Cannot allocate memory",
    "failed to map segment",
    "out of memory",
    "pthread_create",
)


def _bound_memory(max_bytes: int) -> None:
    resource.setrlimit(resource.RLIMIT_AS, (max_bytes, max_bytes))


def _feeds(path: str) -> list[dict[str, Any]]:
    import numpy as np

    with np.load(path, allow_pickle=False) as data:
        by_sample: dict[int, dict[str, Any]] = {}
        for key in data.files:
            index, _, name = key.partition("/")
            by_sample.setdefault(int(index), {})[name] = data[key]
    return [by_sample[index] for index in sorted(by_sample)]


def _fidelity(outputs: list[dict[str, Any]], reference: list[dict[str, Any]]) -> dict[str, Any]:
    import numpy as np

    result = {}
    for name in reference[0]:
        ref = np.stack([np.asarray(r[name], np.float64).reshape(-1) for r in reference])
        got = np.stack([np.asarray(o[name], np.float64).reshape(-1) for o in outputs])
        norms = np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1)
        dots = (ref * got).sum(axis=1)
        cosines = np.where(norms == 0, 1.0, dots / np.where(norms == 0, 1.0, norms))
        result[name] = {
            "cosine": float(cosines.mean()),
            "max_abs_error": float(np.abs(ref - got).max()),
        }
    return result


def _onnx_runner(model: str, threads: int) -> Runner:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    names = [output.name for output in session.get_outputs()]
    return lambda feed: dict(zip(names, session.run(names, feed), strict=True))


def _litert_runner(model: str, threads: int) -> Runner:
    from pathlib import Path

    import numpy as np

    from edgefleet.litert import LiteRTModel

    loaded = LiteRTModel(Path(model), threads)
    return lambda feed: loaded.invoke({k: np.ascontiguousarray(v) for k, v in feed.items()})


def measure(job: dict[str, Any]) -> dict[str, Any]:
    """Load the candidate, answer the smoke samples, then time it; the figures as JSON data."""
    import time

    import numpy as np

    model = str(job["model"])
    runner = _litert_runner if model.endswith(".tflite") else _onnx_runner
    run = runner(model, int(job["threads"]))
    feeds = _feeds(job["smoke"])
    reference = _feeds(job["reference"])
    outputs = [run(feed) for feed in feeds]
    for _ in range(int(job["warmup_runs"])):
        run(feeds[0])
    times: list[float] = []
    round_ms: list[float] = []
    for _ in range(int(job["rounds"])):
        this_round = []
        for _ in range(int(job["runs_per_round"])):
            begin = time.perf_counter()
            run(feeds[0])
            this_round.append((time.perf_counter() - begin) * 1000)
        round_ms.append(min(this_round))
        times += this_round
    p50, p90, p99 = (float(v) for v in np.percentile(times, [50, 90, 99]))
    return {
        "p50_ms": p50,
        "p90_ms": p90,
        "p99_ms": p99,
        "round_ms": round_ms,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "fidelity": _fidelity(outputs, reference),
    }


def main(argv: list[str]) -> int:
    _bound_memory(int(argv[0]))
    try:
        with open(argv[1], encoding="utf-8") as handle:
            job = json.load(handle)
        print(json.dumps(measure(job)), flush=True)
        return 0
    except BaseException as exc:  # every ending is reported, as one line
        message = (f"{type(exc).__name__}: {exc}".splitlines() or [""])[0][:400]
        memory = isinstance(exc, MemoryError) or any(m in message for m in ALLOCATION_FAILURES)
        print(json.dumps({"error": message, "memory": memory}), flush=True)
        return 3


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
