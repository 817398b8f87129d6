"""The core's MQTT session without a broker: broker URLs, and no paho until a session is made."""

from __future__ import annotations

import subprocess
import sys

import pytest

from edgefleet.errors import UsageError
from edgefleet.mqtt.session import parse_broker_url, redact_broker_url


def test_importing_the_mqtt_package_and_session_loads_no_paho() -> None:
    code = (
        "import sys, edgefleet.mqtt, edgefleet.mqtt.session, edgefleet.backoff; "
        "print(sorted(m for m in sys.modules if m.startswith('paho')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"


def test_broker_urls() -> None:
    plain = parse_broker_url("mqtt://broker")
    assert (plain.port, plain.tls, plain.username, plain.password) == (1883, False, None, None)
    assert parse_broker_url("mqtts://broker").port == 8883
    secure = parse_broker_url("mqtts://user:pw@broker.example:9999")
    assert (secure.host, secure.port, secure.tls, secure.username, secure.password) == (
        "broker.example",
        9999,
        True,
        "user",
        "pw",
    )
    quoted = parse_broker_url("mqtt://fleet%40site:p%3Aw%40rd@broker")
    assert (quoted.username, quoted.password) == ("fleet@site", "p:w@rd")
    for bad in ("http://broker", "mqtt://", "mqtt://broker:port"):
        with pytest.raises(UsageError):
            parse_broker_url(bad)


def test_messages_never_show_the_password() -> None:
    assert redact_broker_url("mqtts://user:s3cret@broker:8883") == "mqtts://user:***@broker:8883"
    assert redact_broker_url("mqtt://broker:1883") == "mqtt://broker:1883"
    with pytest.raises(UsageError) as refused:
        parse_broker_url("mqtt://user:s3cret@broker:port")
    assert "s3cret" not in str(refused.value)
