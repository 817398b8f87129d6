"""Benchmarks on the server: a verified request, devices of its profile that are online, a signed
directive each after the commit (audited); results stored once, in time, from the device sent to."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from sqlalchemy import select

from edgefleet.benchwire import BenchmarkResults, CandidateResult, request_path
from edgefleet.errors import UnknownKeyError
from edgefleet.fileio import file_sha256
from edgefleet.keys import SigningKey
from edgefleet.mqtt import DeviceTopics, verify_directive
from edgefleet.server.benchmarks import (
    Target,
    create_benchmark,
    get_benchmark,
    record_results,
    request_file,
)
from edgefleet.server.db.database import Database
from edgefleet.server.db.models import AuditEntry, Benchmark
from edgefleet.server.directives import DirectiveIssuer
from edgefleet.server.errors import ConflictError, InvalidRequestError, NotFoundError
from edgefleet.server.principals import Principal, Role
from edgefleet.trust import TrustRoot
from tests.agent.test_benchmark import PROFILE, make_request
from tests.conftest import KeySet
from tests.server.rolloutsim import START, RecordingPublisher, add_device, make_settings

OPERATOR = Principal("ops", Role.OPERATOR)


@pytest.fixture
def issuer(tmp_path: Path, keyset: KeySet) -> DirectiveIssuer:
    return DirectiveIssuer([keyset.server], make_settings(tmp_path), clock=lambda: START)


def upload_of(tmp_path: Path, key: SigningKey) -> Path:
    """A request in an upload file of its own (create_benchmark moves or deletes it)."""
    folder = tmp_path / f"req-{len(list(tmp_path.glob('req-*')))}"
    return make_request(folder, folder.with_suffix(".efb"), key)


def create(
    db: Database,
    issuer: DirectiveIssuer,
    trust: TrustRoot,
    upload: Path,
    target: Target,
    publisher: RecordingPublisher | None = None,
) -> Benchmark:
    with db.session() as session:
        benchmark = create_benchmark(
            session,
            issuer.settings.data_dir,
            trust,
            issuer,
            publisher or RecordingPublisher(),
            upload,
            target,
            OPERATOR,
            START,
        )
        session.expunge(benchmark)
        return benchmark


def test_a_request_goes_to_each_online_device_of_its_profile_signed_after_the_commit(
    database: Database, issuer: DirectiveIssuer, trust: TrustRoot, keyset: KeySet, tmp_path: Path
) -> None:
    for device, profile, online in [
        ("lab-1", PROFILE, True),
        ("lab-2", PROFILE, True),
        ("lab-off", PROFILE, False),
        ("lab-arm", "aarch64", True),
    ]:
        add_device(database, device, profile=profile, online=online, tags={"lab": "yes"})
    upload = upload_of(tmp_path, keyset.release)
    length, sha256 = file_sha256(upload)
    publisher = RecordingPublisher()

    benchmark = create(database, issuer, trust, upload, Target(tag=("lab", "yes")), publisher)

    assert not upload.exists()
    assert file_sha256(request_file(issuer.settings.data_dir, benchmark)) == (length, sha256)
    assert benchmark.profile == PROFILE and benchmark.candidates == ["float"]
    assert [call.topic for call in publisher.calls] == [
        DeviceTopics("lab-1").directive,
        DeviceTopics("lab-2").directive,
    ]
    directives = [
        verify_directive(call.payload, trust, device_id=device, last_sequence=0, now=START)
        for call, device in zip(publisher.calls, ["lab-1", "lab-2"], strict=True)
    ]
    for directive in directives:
        assert directive.action == "benchmark" and directive.request_id == benchmark.id
        assert directive.bundle is not None and directive.bundle.sha256 == sha256
        assert directive.bundle.length == length
        [source] = directive.sources
        assert source.transport == "http" and source.url.endswith(request_path(benchmark.id))
    with database.session() as session:
        _, parts = get_benchmark(session, benchmark.id)
        assert [p.device_id for p in parts] == ["lab-1", "lab-2"]
        assert all(p.directive_sequence is not None for p in parts)
        [entry] = session.scalars(
            select(AuditEntry).where(AuditEntry.action == "benchmark.request")
        ).all()
        assert entry.actor == "ops" and entry.details["devices"] == ["lab-1", "lab-2"]


@pytest.mark.parametrize(
    ("target", "error", "words"),
    [
        (Target(device_id="lab-arm"), InvalidRequestError, "profile aarch64"),
        (Target(device_id="lab-off"), ConflictError, "is online"),
        (Target(device_id="nobody"), NotFoundError, "nobody"),
        (Target(tag=("site", "mars")), NotFoundError, "site=mars"),
    ],
)
def test_a_request_nobody_of_its_profile_can_answer_is_refused_and_nothing_is_kept(
    database: Database,
    issuer: DirectiveIssuer,
    trust: TrustRoot,
    keyset: KeySet,
    tmp_path: Path,
    target: Target,
    error: type[Exception],
    words: str,
) -> None:
    add_device(database, "lab-arm", profile="aarch64")
    add_device(database, "lab-off", profile=PROFILE, online=False)
    upload = upload_of(tmp_path, keyset.release)
    publisher = RecordingPublisher()

    with pytest.raises(error, match=words):
        create(database, issuer, trust, upload, target, publisher)

    assert not upload.exists() and publisher.calls == []
    assert not (issuer.settings.data_dir / "benchmarks").exists()
    with database.session() as session:
        assert session.scalars(select(Benchmark)).all() == []


def test_a_request_not_signed_by_the_release_role_is_refused(
    database: Database, issuer: DirectiveIssuer, trust: TrustRoot, tmp_path: Path
) -> None:
    add_device(database, "lab-1", profile=PROFILE)
    upload = upload_of(tmp_path, SigningKey.generate())

    with pytest.raises(UnknownKeyError):
        create(database, issuer, trust, upload, Target(device_id="lab-1"))

    assert not upload.exists()


def results_of(device_id: str) -> BenchmarkResults:
    return BenchmarkResults(
        device_id=device_id,
        profile=PROFILE,
        machine="x86_64",
        candidates=[CandidateResult(name="float", outcome="measured", p50_ms=0.5)],
    )


def test_results_are_stored_once_in_time_and_only_from_a_device_sent_to(
    database: Database, issuer: DirectiveIssuer, trust: TrustRoot, keyset: KeySet, tmp_path: Path
) -> None:
    add_device(database, "lab-1", profile=PROFILE)
    add_device(database, "lab-2", profile=PROFILE)
    benchmark = create(
        database, issuer, trust, upload_of(tmp_path, keyset.release), Target(device_id="lab-1")
    )
    soon = START + dt.timedelta(seconds=5)
    with database.session() as session:
        with pytest.raises(NotFoundError):
            record_results(session, benchmark.id, "lab-2", results_of("lab-2"), soon)
        record_results(session, benchmark.id, "lab-1", results_of("lab-1"), soon)
    with database.session() as session:
        with pytest.raises(ConflictError, match="already"):
            record_results(session, benchmark.id, "lab-1", results_of("lab-1"), soon)
        [part] = get_benchmark(session, benchmark.id)[1]
        assert part.answered_at is not None and part.result is not None
        assert part.result["candidates"][0]["p50_ms"] == 0.5

    late = START + issuer.settings.benchmark_ttl
    second = create(
        database, issuer, trust, upload_of(tmp_path, keyset.release), Target(device_id="lab-2")
    )
    with database.session() as session, pytest.raises(ConflictError, match="expired"):
        record_results(session, second.id, "lab-2", results_of("lab-2"), late)
