"""A broker's refusal of the device's certificate is named, not left as a lost connection.

mosquitto runs the locked-down configuration `edgefleet broker config` writes;
the fleet CA revokes one device certificate, and mosquitto rereads the
revocation list at its restart. The agent's link (a real `AgentLink`) then
says, in its log and in `describe()` (what `agent status` shows), that the
broker refused its certificate and what to do; so it does for a certificate
of a CA the broker does not know. A valid certificate connects.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509

from edgefleet.agent.link import AgentLink
from edgefleet.agent.outbox import Outbox
from edgefleet.agentconfig import MqttSettings
from edgefleet.backoff import Backoff
from edgefleet.fleetca import init_ca
from edgefleet.timefmt import utcnow
from tests.agent.broker import WAIT, mosquitto_or_skip, unique_device_id
from tests.server.serverproc import wait_until
from tests.server.test_broker_lockdown import Identity, LockedBroker

ADVICE = (
    "enroll the device again (edgefleet agent enroll) for a new certificate, or set "
    "[mqtt] cert_file and key_file to one the broker accepts"
)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[LockedBroker]:
    mosquitto_or_skip()
    locked = LockedBroker(tmp_path / "locked")
    locked.start()
    try:
        yield locked
    finally:
        locked.stop()


def link_of(broker: LockedBroker, device_id: str, identity: Identity, tmp_path: Path) -> AgentLink:
    settings = MqttSettings(
        url=broker.url,
        ca_file=broker.out / "ca.crt",
        cert_file=identity.cert,
        key_file=identity.key,
    )
    return AgentLink(
        device_id,
        settings,
        Outbox(tmp_path / f"outbox-{device_id}", 1 << 20),
        on_directive=lambda payload: None,
        on_fleet_timestamp=lambda payload: None,
        backoff=Backoff(initial=0.2, maximum=1.0),
        poll_interval=0.1,
    )


def described(link: AgentLink, prefix: str) -> str:
    """What the link says once it starts with `prefix` (asserted within WAIT)."""
    link.start()
    try:
        assert wait_until(lambda: link.describe().startswith(prefix), WAIT), link.describe()
        return link.describe()
    finally:
        link.stop()


def test_a_revoked_certificate_is_named_in_the_log_and_the_status(
    broker: LockedBroker, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    device = unique_device_id()
    identity = broker.device(device)
    assert described(link_of(broker, device, identity, tmp_path), "connected") == "connected"

    serial = x509.load_pem_x509_certificate(identity.cert.read_bytes()).serial_number
    (broker.out / "crl.pem").write_bytes(
        broker.ca.revocation_list([(format(serial, "x"), utcnow())])
    )
    broker.stop()
    broker.start()  # mosquitto rereads the revocation list only at a restart
    caplog.set_level(logging.WARNING, logger="edgefleet.agent.link")
    refusal = "broker refused our certificate (revoked or expired?): it is revoked: " + ADVICE
    link = link_of(broker, device, identity, tmp_path)
    assert described(link, "not connected: broker") == f"not connected: {refusal}"
    assert link.counters().last_problem == refusal
    assert refusal in caplog.messages


def test_a_certificate_of_an_unknown_ca_is_named(broker: LockedBroker, tmp_path: Path) -> None:
    device = unique_device_id()
    stranger = broker.device(device, ca=init_ca(tmp_path / "other-ca"))
    assert described(link_of(broker, device, stranger, tmp_path), "not connected: broker") == (
        "not connected: broker refused our certificate (unknown CA): the broker does not "
        f"trust the CA that issued it: {ADVICE}"
    )
