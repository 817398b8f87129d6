"""`edgefleet broker check` against real brokers: mosquitto, the embedded broker, a mosquitto
configured to break one thing, and the locked-down mosquitto over TLS with server identities.

Each broker is run for the test; every check connects real paho clients to it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from edgefleet.brokercheck import CHECKS, CheckResult, CheckTarget, Identity, run_checks
from edgefleet.server.mqtt.broker import EmbeddedBroker
from tests.agent.broker import MosquittoBroker, free_port
from tests.clirun import Cli
from tests.server.test_broker_lockdown import LockedBroker, edgefleet

TIMEOUT = 10.0


def results_of(
    url: str, ca_file: Path | None = None, identities: Sequence[Identity] = ()
) -> dict[str, CheckResult]:
    target = CheckTarget(url, ca_file, identities, TIMEOUT)
    return {result.name: result for result in run_checks(target)}


def failed(results: dict[str, CheckResult]) -> dict[str, str]:
    return {name: result.detail for name, result in results.items() if not result.passed}


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Cli:
    return Cli(capsys)


@pytest.fixture(scope="module")
def mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MosquittoBroker]:
    with MosquittoBroker.running(tmp_path_factory.mktemp("mosquitto")) as broker:
        yield broker


def test_mosquitto_holds_every_check(mosquitto: MosquittoBroker, cli: Cli) -> None:
    out, err = cli("broker", "check", mosquitto.url, "--timeout", str(TIMEOUT))
    lines = out.splitlines()
    assert [line.split(":")[0] for line in lines] == [f"PASS {name}" for name in CHECKS]
    assert "100 messages over 5 kinds" in out
    assert "262144-byte device message" in out
    assert err == ""


def test_the_embedded_broker_holds_all_but_session_expiry() -> None:
    pytest.importorskip("iotcore")
    with EmbeddedBroker(free_port()) as broker:
        results = results_of(broker.url)
    # rumqttd keeps a session however it ended: Session Expiry 0 on DISCONNECT and the
    # expiry interval are not honoured (docs/scale.md, "The embedded broker").
    assert failed(results) == {
        "session-expiry": "a session with a 2 s expiry was still there after a DISCONNECT "
        "with Session Expiry 0 (a stopped server replica would keep its share of the messages)"
    }


def test_a_packet_limit_below_the_largest_message_fails_payload_sizes(
    tmp_path: Path, cli: Cli
) -> None:
    with MosquittoBroker.running(tmp_path, "max_packet_size 200000\n") as broker:
        out, err = cli("broker", "check", broker.url, status=1)
    lines = {line.split(":")[0]: line for line in out.splitlines()}
    assert lines.pop("FAIL payload-sizes") == (  # mosquitto states its limit in CONNACK
        "FAIL payload-sizes: the broker states a maximum packet size of 200000 bytes, below a "
        "262144-byte device message (the largest) (mosquitto: max_packet_size)"
    )
    assert sorted(lines) == sorted(f"PASS {name}" for name in CHECKS if name != "payload-sizes")
    assert err == (
        "refused [broker-check]: 1 of 7 checks failed (payload-sizes): this broker lacks "
        "what edgefleet relies on, see the FAIL lines\n"
    )


def test_a_short_queue_for_offline_clients_fails_queued_qos1(tmp_path: Path) -> None:
    # The helper's configuration sets no limit (0); a later line wins.
    with MosquittoBroker.running(tmp_path, "max_queued_messages 5\n") as broker:
        results = results_of(broker.url)
    assert list(failed(results)) == ["queued-qos1"]
    assert failed(results)["queued-qos1"].startswith("5 of 20 QoS 1 messages published while")
    assert "max_queued_messages" in failed(results)["queued-qos1"]


def test_no_broker_is_an_error_of_its_own(cli: Cli) -> None:
    out, err = cli("broker", "check", f"mqtt://127.0.0.1:{free_port()}", status=2)
    assert out == ""
    assert err.startswith("error [broker-unreachable]: cannot connect to the broker at 127.0.0.1:")
    assert len(err.splitlines()) == 1


def test_a_cert_without_its_key_is_a_usage_error(tmp_path: Path, cli: Cli) -> None:
    cert = tmp_path / "server.crt"
    cert.write_text("not checked before the count")
    _, err = cli("broker", "check", "mqtts://127.0.0.1:8883", "--cert", cert, status=2)
    assert err == "error [usage]: 1 --cert and 0 --key: pass one --key after each --cert\n"
    _, err = cli("broker", "check", "mqtt://127.0.0.1:1883", "--ca", cert, status=2)
    assert err.startswith("error [usage]: --ca, --cert and --key are for TLS: use mqtts://")


@pytest.fixture(scope="module")
def locked(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LockedBroker]:
    broker = LockedBroker(tmp_path_factory.mktemp("locked"))
    # Two server identities: the broker names each connection after its certificate.
    edgefleet("broker", "config", "--ca", broker.ca_dir, "--port", str(broker.port), "-o",
              broker.out, "--force", "--server-identity", "edgefleet",
              "--server-identity", "check")  # fmt: skip
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


def test_the_locked_down_broker_holds_every_check_for_two_server_identities(
    locked: LockedBroker, cli: Cli
) -> None:
    out, _ = cli("broker", "check", locked.url, "--ca", locked.out / "ca.crt",
                 "--cert", locked.out / "server-edgefleet.crt",
                 "--key", locked.out / "server-edgefleet.key",
                 "--cert", locked.out / "server-check.crt",
                 "--key", locked.out / "server-check.key")  # fmt: skip
    assert [line.split(":")[0] for line in out.splitlines()] == [f"PASS {n}" for n in CHECKS]
    assert "maximum packet size 266240" in out  # the limit `broker config` sets, stated


def test_one_identity_on_the_locked_down_broker_says_to_pass_a_second(
    locked: LockedBroker,
) -> None:
    server = locked.out / "server-edgefleet"
    results = results_of(
        locked.url,
        ca_file=locked.out / "ca.crt",
        identities=[Identity(server.with_suffix(".crt"), server.with_suffix(".key"))],
    )
    assert "shared-subscriptions" in failed(results)
    detail = failed(results)["shared-subscriptions"]
    assert "the broker closed the connection (" in detail
    assert detail.endswith(
        "; with one certificate, a broker that names each connection after its certificate "
        "closes one when the next connects: pass a second --cert and --key"
    )
    assert results["payload-sizes"].passed  # one client at a time is fine


def test_a_device_identity_may_not_use_the_check_topics(locked: LockedBroker, cli: Cli) -> None:
    device = locked.device("cam-check")
    out, err = cli("broker", "check", locked.url, "--ca", locked.out / "ca.crt", "--cert",
                   device.cert, "--key", device.key, "--timeout", "3", status=1)  # fmt: skip
    assert (
        "FAIL retained: a later subscriber did not receive the retained message (may this "
        "client use edgefleet/v1/broker-check/#? the broker's ACL may forbid it)"
    ) in out.splitlines()
    assert err.startswith("refused [broker-check]:")
