"""Benchmark: the converter's chosen model against the fp32 model and onnxruntime's defaults.

For each fixture model (tests/fixtures/models), in one run:

- `edgefleet.converter.convert` is timed end to end, with the calibration,
  validation and label splits the converter tests use (tests/fixtures/datasets.py),
  then run a second time, back to back, on the same inputs: both choices are
  printed with the report's decision (how sure each was), and whether they agree.
- Two peers are built the way onnxruntime's documentation tells a user to:
  `quant_pre_process`, then `quantize_static` with every default (QDQ, QInt8
  activations and weights, per-tensor, MinMax) calibrated on the calibration
  split, and `quantize_dynamic` with every default.
- fp32 (the source model), the chosen model (OUT_DIR/model.onnx) and both peers
  are measured on the validation split with the same session settings
  (`open_session` with the target profile): accuracy in % (integer labels) or
  RMSE (float labels), the worst cosine against fp32 over float outputs (always
  1 for a one-value output), latency on validation sample 0, and file size.

The machine is shared and noisy, so no latency is compared with a figure from
another run: the four models are timed interleaved, in rotating order, over
ROUNDS rounds. Each row shows its median ms; a latency ratio is the median over
rounds of the two models' times in the same round, so a load change between
rounds cancels out instead of landing on one side of the ratio.

Goals (exit status 1 when one is missed): accuracy drop <= 1 point for labelled
classifiers; chosen latency <= 0.7x fp32 on the CNN and never above 1.0x fp32
(met by construction when the converter ships the fp32 file itself); size <= 0.3x
fp32 when an int8 candidate is chosen; the two conversions choose the same
candidate; chosen at least as fast as each
onnxruntime default (ratio <= 1.05, for noise) and at least as accurate
(accuracy >= the default's, or RMSE <= 1.01x the default's, unless the default's
lower RMSE comes from clipping: its 99th-percentile deviation from fp32 breaks the
converter's max_deviation budget, which the table then says); the CNN converts in
under 120 s.

    .venv-test/bin/python bench/convert_models.py [--target host] [--json]
        [--models cnn,mlp,regressor,gru]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from edgefleet.converter import Budget, ConvertOptions, convert
from edgefleet.converter.data import load_dataset
from edgefleet.converter.evaluate import (
    Outputs,
    fidelity,
    measure_latency_ms,
    open_session,
    run_outputs,
    task_metrics,
)
from edgefleet.converter.modelinfo import ModelInfo, load_onnx
from edgefleet.converter.quantize import quiet_onnxruntime_tooling
from edgefleet.profiles import Profile, load_profile

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # for tests.fixtures, which is not installed

from tests.fixtures import datasets  # noqa: E402

Array = npt.NDArray[Any]
ROUNDS = 5
PEER_LATENCY_SLACK = 1.05  # chosen/default: below this, a difference is timing noise
PEER_RMSE_SLACK = 1.01
ROWS = ("fp32", "chosen", "ort default static", "ort default dynamic")


@dataclass(frozen=True)
class Case:
    file: str
    input_name: str
    data: Callable[[], tuple[Array, Array]]


CASES = {
    "cnn": Case("digits_cnn.onnx", "image", datasets.digits_images),
    "mlp": Case("digits_mlp.onnx", "features", datasets.digits_tabular),
    "regressor": Case("diabetes_regressor.onnx", "features", datasets.diabetes),
    "gru": Case("digits_gru.onnx", "rows", datasets.digits_sequences),
}


@dataclass
class Row:
    path: Path
    error: str | None = None
    score: float | None = None  # accuracy % or RMSE
    min_cosine: float | None = None
    deviation: float | None = None  # p99 |row - fp32| / spread, single-value outputs
    size_bytes: int | None = None  # recorded while the file exists
    latencies_ms: list[float] = field(default_factory=list)  # one per round

    @property
    def median_ms(self) -> float | None:
        return statistics.median(self.latencies_ms) if self.latencies_ms else None


@dataclass
class Result:
    model: str
    metric: str  # "accuracy" or "rmse"
    convert_seconds: float
    chosen: str  # candidate name; "float" ships the source model itself
    decision: str  # the report's decision: what was chosen and how sure
    again: str  # the second conversion's choice
    again_decision: str
    rows: dict[str, Row]

    def latency_ratio(self, row: str, reference: str = "fp32") -> float | None:
        """Median over rounds of row's time over reference's time in the same round."""
        ours, theirs = self.rows[row].latencies_ms, self.rows[reference].latencies_ms
        if not ours or not theirs:
            return None
        return statistics.median(a / b for a, b in zip(ours, theirs, strict=True))

    def size_ratio(self, row: str) -> float | None:
        size, fp32 = self.rows[row].size_bytes, self.rows["fp32"].size_bytes
        return size / fp32 if size is not None and fp32 else None


@dataclass(frozen=True)
class Goal:
    name: str
    model: str
    figure: str
    met: bool | None  # None: does not apply


def _failure(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:160] if lines else type(exc).__name__


def write_splits(case: Case, directory: Path) -> tuple[Path, Path, Path]:
    """calibration.npz, validation.npz, labels.npy, as tests/converter/conftest.py writes them."""
    features, targets = case.data()
    split = datasets.split(len(features))
    paths = (directory / "calibration.npz", directory / "validation.npz", directory / "labels.npy")
    for path, indices in zip(paths[:2], (split.calibration, split.validation), strict=True):
        arrays: dict[str, Any] = {case.input_name: features[indices]}
        np.savez(path, **arrays)
    np.save(paths[2], targets[split.validation])
    return paths


class SampleReader:
    """A CalibrationDataReader as onnxruntime's examples write one: one sample per call."""

    def __init__(self, name: str, samples: Array) -> None:
        self._feeds: Iterator[dict[str, Array]] = (
            {name: samples[i : i + 1]} for i in range(len(samples))
        )

    def get_next(self) -> dict[str, Array] | None:
        return next(self._feeds, None)


def build_ort_defaults(model: Path, case: Case, calibration: Path, workdir: Path) -> list[Row]:
    """onnxruntime's documented recipe, default settings: a static and a dynamic model."""
    from onnxruntime.quantization import quantize_dynamic, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = workdir / "ort-pre.onnx"
    static, dynamic = Row(workdir / "ort-static.onnx"), Row(workdir / "ort-dynamic.onnx")
    with quiet_onnxruntime_tooling():  # keeps the tooling's prints off stdout (--json)
        try:
            quant_pre_process(str(model), str(pre))
        except Exception as exc:
            static.error = dynamic.error = f"quant_pre_process: {_failure(exc)}"
            return [static, dynamic]
        reader = SampleReader(case.input_name, np.load(calibration)[case.input_name])
        try:
            quantize_static(str(pre), str(static.path), reader)
        except Exception as exc:
            static.error = _failure(exc)
        try:
            quantize_dynamic(str(pre), str(dynamic.path))
        except Exception as exc:
            dynamic.error = _failure(exc)
    return [static, dynamic]


def measure(
    rows: dict[str, Row], info: ModelInfo, profile: Profile, validation: Path, labels: Array
) -> None:
    """Score, cosine and size of each row, then latencies interleaved over ROUNDS rounds."""
    names = [spec.name for spec in info.outputs]
    dataset = load_dataset(validation, info.inputs)
    sessions: list[tuple[Row, object]] = []
    reference: Outputs | None = None  # fp32's, measured first
    for key, row in rows.items():
        if row.error:
            continue
        try:
            session = open_session(row.path, profile)
            outputs = run_outputs(session, dataset, names)
        except Exception as exc:
            if key == "fp32":
                raise
            row.error = _failure(exc)
            continue
        reference = reference or outputs
        per_output = fidelity(reference, outputs).values()
        cosines = [v["cosine"] for v in per_output if "cosine" in v]
        deviations = [v["deviation_p99"] for v in per_output if "deviation_p99" in v]
        row.deviation = max(deviations, default=None)
        row.score = next(iter(task_metrics(outputs, labels).values()), None)
        row.min_cosine = min(cosines, default=None)
        row.size_bytes = row.path.stat().st_size
        sessions.append((row, session))
    feed = dataset.sample(0)
    for round_ in range(ROUNDS):
        shift = round_ % len(sessions)  # rotate, so no model always runs first
        for row, session in sessions[shift:] + sessions[:shift]:
            row.latencies_ms.append(measure_latency_ms(session, feed))


def _convert(model: Path, out: Path, options: ConvertOptions) -> tuple[str, str]:
    """The chosen candidate's name and the report's decision."""
    result = convert(model, out, options)
    return result.chosen.candidate.name, str(result.report["decision"])


def run_model(name: str, target: str, scratch: Path) -> Result:
    case, workdir = CASES[name], scratch / name
    model = REPO / "tests" / "fixtures" / "models" / case.file
    workdir.mkdir()
    calibration, validation, labels = write_splits(case, workdir)
    options = ConvertOptions(target, calibration, validation=validation, labels=labels)
    chosen = Row(workdir / "out" / "model.onnx")
    started = time.perf_counter()
    try:
        chosen_name, decision = _convert(model, workdir / "out", options)
    except Exception as exc:
        chosen_name, decision, chosen.error = "none", "-", f"convert: {_failure(exc)}"
    seconds = time.perf_counter() - started
    try:
        again, again_decision = _convert(model, workdir / "out-again", options)
    except Exception as exc:
        again, again_decision = "none", f"convert: {_failure(exc)}"
    peers = build_ort_defaults(model, case, calibration, workdir)
    rows = dict(zip(ROWS, [Row(model), chosen, *peers], strict=True))
    label_array = np.load(labels)
    measure(rows, load_onnx(model)[1], load_profile(target), validation, label_array)
    metric = "accuracy" if label_array.dtype.kind in "iu" else "rmse"
    return Result(name, metric, seconds, chosen_name, decision, again, again_decision, rows)


def _x(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.2f}x"


def goals(result: Result) -> list[Goal]:
    model, fp32, chosen = result.model, result.rows["fp32"], result.rows["chosen"]
    found: list[Goal] = []
    if result.metric == "accuracy" and fp32.score is not None:
        drop = None if chosen.score is None else fp32.score - chosen.score
        figure = "-" if drop is None else f"{drop:.2f} points"
        found.append(
            Goal("accuracy drop <= 1 point", model, figure, drop is not None and drop <= 1)
        )
    ratio = result.latency_ratio("chosen")
    if model == "cnn":
        found.append(Goal("latency <= 0.7x fp32", model, _x(ratio), bool(ratio and ratio <= 0.7)))
    if result.chosen == "float":  # the fp32 file itself: any difference is noise
        found.append(Goal("latency <= 1.0x fp32", model, f"{_x(ratio)}, same file", True))
    else:
        found.append(Goal("latency <= 1.0x fp32", model, _x(ratio), bool(ratio and ratio <= 1)))
    size = result.size_ratio("chosen")
    met = None if result.chosen in ("float", "none") else bool(size and size <= 0.3)
    found.append(Goal("size <= 0.3x fp32 (int8 chosen)", model, _x(size), met))
    for peer in ROWS[2:]:
        other = result.rows[peer]
        ratio = result.latency_ratio("chosen", peer)
        if other.score is None or chosen.score is None or ratio is None:
            figure = "peer failed" if other.error else "not measured"
            found.append(Goal(f"as fast, as accurate as {peer}", model, figure, None))
            continue
        met = ratio <= PEER_LATENCY_SLACK
        found.append(Goal(f"as fast as {peer} (<= 1.05x: noise)", model, _x(ratio), met))
        if result.metric == "accuracy":
            figure, met = f"{chosen.score:.2f}% vs {other.score:.2f}%", chosen.score >= other.score
        else:
            figure = f"RMSE {chosen.score:.2f} vs {other.score:.2f}"
            met = chosen.score <= other.score * PEER_RMSE_SLACK
            limit = Budget().max_deviation
            if not met and other.deviation is not None and other.deviation > limit:
                # A lower RMSE bought by clipping predictions is not more accurate.
                figure += f" (peer clips: deviation {other.deviation:.2f} > {limit})"
                met = True
        found.append(Goal(f"as accurate as {peer}", model, figure, met))
    figure = result.chosen if result.again == result.chosen else f"{result.chosen}, {result.again}"
    found.append(Goal("same choice twice in a row", model, figure, result.again == result.chosen))
    if model == "cnn":
        seconds = result.convert_seconds
        found.append(Goal("conversion < 120 s", model, f"{seconds:.1f} s", seconds < 120))
    return found


def print_model(result: Result) -> None:
    names = {key: key for key in ROWS} | {"chosen": f"chosen ({result.chosen})"}
    width = max(len(name) for name in names.values())
    score = "accuracy %" if result.metric == "accuracy" else "RMSE"
    seconds = result.convert_seconds
    print(f"\n{result.model} ({CASES[result.model].file}): converted in {seconds:.1f} s")
    agree = "they agree" if result.again == result.chosen else "they DIFFER"
    print(f"  first:  {result.decision}")
    print(f"  second: {result.again_decision}")
    print(f"  chose {result.chosen}, then {result.again}: {agree}")
    header = ["model", score, "min cosine", "latency ms", "vs fp32", "size vs fp32"]
    print(f"{header[0]:<{width}}" + "".join(f"  {h:>12}" for h in header[1:]))
    for key, row in result.rows.items():
        if row.error:
            print(f"{names[key]:<{width}}  failed: {row.error}")
            continue
        cells = [
            "-" if row.score is None else f"{row.score:.2f}",
            "-" if row.min_cosine is None else f"{row.min_cosine:.5f}",
            "-" if row.median_ms is None else f"{row.median_ms:.3f}",
            _x(result.latency_ratio(key)),
            _x(result.size_ratio(key)),
        ]
        print(f"{names[key]:<{width}}" + "".join(f"  {c:>12}" for c in cells))


def print_goals(found: list[Goal]) -> None:
    width = max(len(goal.name) for goal in found)
    print(f"\n{'goal':<{width}}  {'model':<9}  {'measured':<24}  met")
    for goal in found:
        met = "n/a" if goal.met is None else "yes" if goal.met else "NO"
        print(f"{goal.name:<{width}}  {goal.model:<9}  {goal.figure:<24}  {met}")


def to_json(result: Result) -> dict[str, Any]:
    rows = {
        key: {
            "error": row.error,
            result.metric: row.score,
            "min_cosine": row.min_cosine,
            "latency_ms_median": row.median_ms,
            "latency_ms_rounds": row.latencies_ms,
            "latency_ratio_vs_fp32": result.latency_ratio(key),
            "size_bytes": row.size_bytes,
            "size_ratio_vs_fp32": result.size_ratio(key),
        }
        for key, row in result.rows.items()
    }
    return {
        "file": CASES[result.model].file,
        "convert_seconds": result.convert_seconds,
        "chosen": result.chosen,
        "decision": result.decision,
        "chosen_again": result.again,
        "decision_again": result.again_decision,
        "choices_agree": result.again == result.chosen,
        "rows": rows,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Converter vs fp32 and onnxruntime's defaults.")
    parser.add_argument("--target", default="host")
    parser.add_argument("--json", action="store_true", help="print all figures as JSON")
    parser.add_argument("--models", default=",".join(CASES), help="comma-separated: %(default)s")
    args = parser.parse_args(argv)
    models = [name.strip() for name in args.models.split(",") if name.strip()]
    unknown = sorted(set(models) - set(CASES))
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}: choose from {', '.join(CASES)}")
    profile = load_profile(args.target)
    with tempfile.TemporaryDirectory(prefix="edgefleet-bench-convert-") as scratch:
        results = [run_model(name, args.target, Path(scratch)) for name in models]
    found = [goal for result in results for goal in goals(result)]
    if args.json:
        figures = {
            "target": profile.name,
            "rounds": ROUNDS,
            "models": {result.model: to_json(result) for result in results},
            "goals": [asdict(goal) for goal in found],
        }
        print(json.dumps(figures, indent=2))
    else:
        print(f"target {profile.name}; latencies: {ROUNDS} interleaved rounds, ratios paired")
        for result in results:
            print_model(result)
        print_goals(found)
    return 1 if any(goal.met is False for goal in found) else 0


if __name__ == "__main__":
    sys.exit(main())
