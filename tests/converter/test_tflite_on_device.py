"""`edgefleet convert --measure-on` with TFLite candidates, timed with LiteRT on a device.

A real `edgefleet server run`, real mosquitto and a real `edgefleet agent run`;
the model is converted to TFLite by onnx2tf in its tool environment, so the
tests follow EDGEFLEET_REQUIRE_TFLITE_TOOLS as tests/converter/test_onnx_to_tflite.py
does. With `--tflite` on this machine's profile (x86_64-vnni, which runs
onnxruntime and LiteRT) the TFLite candidates go to the device as `.tflite` files
beside the ONNX ones; for armv7-tflite (an agent of that profile on this machine:
the agent runs what its profile lists, whatever the machine) the float model sent
is the float32 TFLite one, the reference the others are compared with. The agent
runs them with LiteRT, and their figures in the report are the device's.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgefleet.keys import save_private_key
from tests.agent.broker import MosquittoBroker, unique_device_id
from tests.agent.power_loss_driver import PROFILE
from tests.conftest import KeySet
from tests.converter import test_benchmark_on_device as on_device
from tests.converter import test_onnx_to_tflite as to_tflite
from tests.converter.conftest import Case, convert_args
from tests.server.serverproc import ServerProcess, agent_log, json_of, start_agent, wait_until

broker = on_device.broker
server = on_device.server
onnx2tf_ready = to_tflite.onnx2tf_ready
plain_mlp = to_tflite.plain_mlp


@dataclass(frozen=True)
class Measured:
    device: str
    report: dict[str, Any]
    rows: dict[str, dict[str, Any]]  # the report's candidates by name
    sent: set[str]  # the candidates with figures from the device
    part: dict[str, Any]  # the device's part of the benchmark, from the server
    agent_log: str


@contextmanager
def measured_conversion(
    tmp_path: Path,
    server: ServerProcess,
    broker: MosquittoBroker,
    keyset: KeySet,
    case: Case,
    target: str,
    *extra: str,
) -> Iterator[Measured]:
    """`edgefleet convert` of `case` for `target`, measured on an agent of that profile."""
    token = on_device.operator_token(tmp_path / "data")
    release_key = tmp_path / "keys" / "release.key"
    save_private_key(release_key, keyset.release)
    device = unique_device_id("lab")
    agent = start_agent(
        tmp_path, device, broker.url, server.url, tmp_path / "keys/trust.json", profile=target
    )
    try:
        with server.api(token) as api:

            def online() -> bool:
                response = api.get(f"/devices/{device}")
                return response.status_code == 200 and bool(response.json()["online"])

            assert wait_until(online, on_device.WAIT), agent_log(tmp_path, device)
            out = tmp_path / "out"
            converted = on_device.edgefleet(
                *convert_args(case, target, out, *extra),
                "--measure-on", device, "--server", server.url, "--token", token,
                "--measure-key", release_key, "--measure-timeout", "600",
            )  # fmt: skip
            assert converted.returncode == 0, converted.stderr + agent_log(tmp_path, device)
            report = json.loads((out / "report.json").read_text())
            rows = {row["name"]: row for row in report["candidates"]}
            [part] = json_of(api.get("/benchmarks/1"), 200)["devices"]
            yield Measured(
                device=device,
                report=report,
                rows=rows,
                sent={name for name, row in rows.items() if row["device_figures"] is not None},
                part=part,
                agent_log=agent_log(tmp_path, device),
            )
    finally:
        if agent.poll() is None:
            agent.terminate()
            agent.wait(30)


def assert_measured_on_the_device(measured: Measured, profile: str) -> None:
    assert measured.part["state"] == "answered"
    assert {c["name"] for c in measured.part["results"]["candidates"]} == measured.sent
    for name in measured.sent:
        row = measured.rows[name]
        assert row["latency_measured_on"] == f"device {measured.device} (profile {profile})", row
        figures = row["device_figures"]
        assert figures["outcome"] == "measured", figures
        assert 0 < figures["p50_ms"] <= figures["p90_ms"] <= figures["p99_ms"]
        assert row["latency_ms"] == figures["p50_ms"]
        assert figures["fidelity"]["probabilities"]["cosine"] > 0.99
        assert f"benchmark candidate {name}: measured" in measured.agent_log


def test_tflite_candidates_are_measured_with_litert_on_the_device(
    tmp_path: Path,
    onnx2tf_ready: None,
    plain_mlp: Case,
    server: ServerProcess,
    broker: MosquittoBroker,
    keyset: KeySet,
) -> None:
    with measured_conversion(
        tmp_path, server, broker, keyset, plain_mlp, PROFILE, "--tflite"
    ) as measured:
        # tflite-float32 answers as the float model does: always within the budget, sent.
        assert {"float", "tflite-float32"} <= measured.sent, measured.rows
        assert_measured_on_the_device(measured, PROFILE)
        notes = " ".join(measured.rows["tflite-float32"]["notes"])
        assert f"latency with LiteRT on a device of target {PROFILE}" in notes


def test_armv7_float_model_is_the_float32_tflite_one_measured_on_the_device(
    tmp_path: Path,
    onnx2tf_ready: None,
    plain_mlp: Case,
    server: ServerProcess,
    broker: MosquittoBroker,
    keyset: KeySet,
) -> None:
    with measured_conversion(
        tmp_path, server, broker, keyset, plain_mlp, "armv7-tflite"
    ) as measured:
        assert set(measured.rows) == {"float", "tflite-int8"}
        assert "float" in measured.sent  # an .onnx file would be runtime-missing on armv7
        assert_measured_on_the_device(measured, "armv7-tflite")
        # The reference is the float32 TFLite model's own outputs: it answers them exactly.
        float_fidelity = measured.rows["float"]["device_figures"]["fidelity"]["probabilities"]
        assert float_fidelity["max_abs_error"] < 1e-5
        assert (tmp_path / "out" / "model.tflite").is_file()
