"""Diagnostics on the device: the log ring's bounds and redaction, the answer's size bound, and
the installer verifying a diagnostics directive like every other (a replay is refused)."""

from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path

import pytest

from edgefleet.agent.diagnostics import LogRing, diagnostics_answer, redact
from edgefleet.agent.install import Installer
from edgefleet.agent.layout import StateLayout
from edgefleet.errors import ReplayedDirectiveError, UnknownKeyError
from edgefleet.keys import SigningKey
from edgefleet.mqtt import (
    MAX_DIAGNOSTICS_BYTES,
    Directive,
    encode_message,
    sign_directive,
)
from edgefleet.mqtt.messages import MAX_LOG_BYTES, MAX_LOG_LINE_CHARS, MAX_LOG_LINES
from edgefleet.timefmt import format_time, utcnow
from edgefleet.trust import TrustRoot
from tests.agent.power_loss_driver import device_config
from tests.conftest import KeySet


@pytest.fixture
def ring() -> logging.Logger:
    logger = logging.getLogger("tests.diagnostics.ring")
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    logger.handlers = [LogRing()]
    return logger


def lines_of(logger: logging.Logger) -> list[str]:
    handler = logger.handlers[0]
    assert isinstance(handler, LogRing)
    return [line.message for line in handler.lines()]


def test_the_ring_keeps_the_newest_records_of_info_and_above(ring: logging.Logger) -> None:
    ring.debug("a debug record is not kept")
    for number in range(MAX_LOG_LINES + 50):
        ring.info("record %d", number)
    kept = lines_of(ring)
    assert len(kept) == MAX_LOG_LINES
    assert kept[0] == "record 50" and kept[-1] == f"record {MAX_LOG_LINES + 49}"


def test_lines_are_cut_and_together_bounded_newest_kept(ring: logging.Logger) -> None:
    for number in range(MAX_LOG_LINES):
        ring.warning("%03d %s", number, "x" * 5000)
    kept = lines_of(ring)
    assert all(len(line) == MAX_LOG_LINE_CHARS for line in kept)
    assert sum(len(line.encode()) for line in kept) <= MAX_LOG_BYTES
    assert len(kept) == MAX_LOG_BYTES // MAX_LOG_LINE_CHARS
    assert kept[-1].startswith(f"{MAX_LOG_LINES - 1:03d} ")


def test_an_exception_adds_its_type_and_message_not_its_traceback(ring: logging.Logger) -> None:
    try:
        raise OSError("disk full")
    except OSError:
        ring.exception("writing the outbox failed")
    [line] = lines_of(ring)
    assert line == "writing the outbox failed (OSError: disk full)"


def test_tokens_and_url_passwords_never_enter_the_ring(ring: logging.Logger) -> None:
    token = "efe_" + "Ab3-_x" * 7
    ring.warning("enrolling with %s at mqtt://device:s3cret@broker:1883", token)
    [line] = lines_of(ring)
    assert token not in line and "s3cret" not in line
    assert line == "enrolling with efe_*** at mqtt://device:***@broker:1883"
    assert redact("api token efa_XYZ123 used") == "api token efa_*** used"


def directive(device_id: str, sequence: int, key: SigningKey) -> bytes:
    now = utcnow()
    document = Directive.model_validate(
        {
            "issued": format_time(now),
            "expires": format_time(now + dt.timedelta(minutes=5)),
            "device_id": device_id,
            "sequence": sequence,
            "action": "diagnostics",
            "request_id": 40 + sequence,
        }
    )
    return sign_directive(document, [key])


def test_a_diagnostics_directive_is_verified_answered_once_and_changes_no_install_state(
    tmp_path: Path, trust: TrustRoot, keyset: KeySet
) -> None:
    config = device_config(tmp_path / "device", trust.raw)
    asked: list[Directive] = []
    installer = Installer(config, StateLayout(config.state_dir), trust, on_diagnostics=asked.append)
    before = installer.status()

    with pytest.raises(UnknownKeyError):
        installer.install_directive(directive(config.device_id, 5, SigningKey.generate()))
    assert asked == [] and installer.status().last_directive_sequence == 0

    genuine = directive(config.device_id, 5, keyset.server)
    after = installer.install_directive(genuine)
    assert [(d.request_id, d.sequence) for d in asked] == [(45, 5)]
    assert after.last_directive_sequence == 5
    assert (after.state, after.current, after.install) == (
        before.state,
        before.current,
        before.install,
    )

    reopened = Installer(config, StateLayout(config.state_dir), trust, on_diagnostics=asked.append)
    with pytest.raises(ReplayedDirectiveError):  # the spent sequence survived a restart
        reopened.install_directive(genuine)
    assert len(asked) == 1


def test_an_answer_leaves_out_older_lines_until_it_fits(
    ring: logging.Logger, keyset: KeySet
) -> None:
    for number in range(MAX_LOG_LINES):
        ring.info("%03d %s", number, "y" * 300)
    handler = ring.handlers[0]
    assert isinstance(handler, LogRing)
    now = utcnow()
    request = Directive.model_validate(
        {
            "issued": format_time(now),
            "expires": format_time(now + dt.timedelta(minutes=5)),
            "device_id": "cam-01",
            "sequence": 3,
            "action": "diagnostics",
            "request_id": 7,
        }
    )
    big_status = {"notes": "z" * (MAX_DIAGNOSTICS_BYTES - 40_000)}
    answer = diagnostics_answer(request, handler.lines(), big_status)
    assert len(encode_message(answer)) <= MAX_DIAGNOSTICS_BYTES
    assert 0 < len(answer.log_lines) < MAX_LOG_LINES
    assert answer.log_lines[-1].message.startswith(f"{MAX_LOG_LINES - 1:03d} ")
    assert (answer.request_id, answer.directive_sequence) == (7, 3)
