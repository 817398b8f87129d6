"""Benchmarks: the converter's candidates measured on devices of the target profile.

An operator uploads a benchmark request (`edgefleet.benchwire`: a bundle named
`edgefleet-benchmark`, signed by the release role) naming where to measure it:
one device, or every device with a tag. `create_benchmark` verifies the
request as the bundle store verifies a bundle, picks the devices (of the
request's profile, online; a request nobody can answer is refused), stores the
file under `benchmarks/` by its digest, adds the `Benchmark` row, one
`BenchmarkResult` row per device and a signed `benchmark` directive for each
in one unit of work (audited `benchmark.request`), commits, and only then
publishes the directives; one the broker did not take leaves that device's
row failed with the reason.

Each device downloads the request (`GET /benchmarks/{id}/request`, no token:
it verifies the bytes itself), measures it and uploads its results signed
with its key; `record_results` stores them on its row, once, if they arrive
before the benchmark expires (`settings.benchmark_ttl`).
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from sqlalchemy import select
from sqlalchemy.orm import Session

from edgefleet.benchwire import REQUEST_NAME, BenchmarkResults, request_path
from edgefleet.bundle import BundleLimits, verify_bundle
from edgefleet.errors import PublishError
from edgefleet.fileio import file_sha256, fsync_directory
from edgefleet.mqtt import BundleRef
from edgefleet.server.audit import record_audit
from edgefleet.server.db.models import Benchmark, BenchmarkResult, Device
from edgefleet.server.devices import device_filters, get_device
from edgefleet.server.directives import DirectiveIssuer, OutgoingDirective, publish_directive
from edgefleet.server.errors import ConflictError, InvalidRequestError, NotFoundError, StorageError
from edgefleet.server.mqtt.interfaces import Publisher
from edgefleet.server.principals import Principal
from edgefleet.trust import TrustRoot

AUDIT_ACTION = "benchmark.request"
BENCHMARKS_DIR = "benchmarks"
MAX_DEVICES = 16  # devices measuring one request

DeviceState = Literal["pending", "answered", "refused", "failed", "expired"]


@dataclass(frozen=True)
class Target:
    """Where to measure: one device by id, or the devices with one tag."""

    device_id: str | None = None
    tag: tuple[str, str] | None = None

    def describe(self) -> str:
        if self.tag is not None:
            return f"tag {self.tag[0]}={self.tag[1]}"
        return f"device {self.device_id}"


def request_file(data_dir: Path, benchmark: Benchmark) -> Path:
    return Path(data_dir) / BENCHMARKS_DIR / f"{benchmark.sha256}.efb"


def device_state(result: BenchmarkResult, expires_at: dt.datetime, now: dt.datetime) -> DeviceState:
    """Where one device's part stands at `now`."""
    if result.result is not None:
        return "refused" if result.result.get("refused") else "answered"
    if result.error is not None:
        return "failed"
    return "expired" if now >= expires_at else "pending"


def _devices(session: Session, target: Target, profile: str) -> list[Device]:
    """The online devices of `profile` that `target` names.

    Raises:
        NotFoundError: no such device.
        InvalidRequestError: the device, or every device with the tag, has another profile.
        ConflictError: none of them is online.
    """
    if target.device_id is not None:
        found = [get_device(session, target.device_id)]
    else:
        assert target.tag is not None
        query = select(Device).where(*device_filters(None, dict([target.tag]), None))
        found = list(session.scalars(query.order_by(Device.id)))
        if not found:
            raise NotFoundError(f"no device has the {target.describe()}")
    fitting = [device for device in found if device.profile == profile]
    if not fitting:
        profiles = ", ".join(sorted({device.profile for device in found}))
        raise InvalidRequestError(
            f"the request is for profile {profile}; the {target.describe()} names devices of "
            f"profile {profiles}: measure on a device of the conversion's target"
        )
    online = [device for device in fitting if device.online]
    if not online:
        raise ConflictError(
            f"no device of profile {profile} with the {target.describe()} is online: "
            "start one, or measure on another"
        )
    return online[:MAX_DEVICES]


def _place(upload: Path, target: Path) -> None:
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(upload, "rb") as handle:
            os.fsync(handle.fileno())
        os.chmod(upload, 0o644)
        shutil.move(upload, target)
    except OSError as exc:
        raise StorageError(f"cannot store the benchmark request: {exc}") from exc
    fsync_directory(target.parent)


def create_benchmark(
    session: Session,
    data_dir: Path,
    trust: TrustRoot,
    issuer: DirectiveIssuer,
    publisher: Publisher,
    upload: Path,
    target: Target,
    actor: Principal,
    now: dt.datetime,
) -> Benchmark:
    """Verify the request at `upload`, send it to the devices `target` names; the row.

    `upload` is moved into the store or deleted, whatever the outcome. Commits
    `session` before publishing the directives.

    Raises:
        SignatureError, BundleError, MalformedDocumentError: the request does not verify.
        InvalidRequestError: a bundle, not a benchmark request; devices of another profile.
        NotFoundError: no such device, or none with the tag.
        ConflictError: none of them is online.
        StorageError: the file or the database failed.
    """
    try:
        length, sha256 = file_sha256(upload)
        manifest = verify_bundle(upload, trust, limits=BundleLimits(), now=now).manifest
        if manifest.name != REQUEST_NAME:
            raise InvalidRequestError(
                f"{manifest.name}@{manifest.version} is a bundle, not a benchmark request: "
                "push bundles to /bundles"
            )
        profile = manifest.profiles[0]
        devices = _devices(session, target, profile)
        benchmark = Benchmark(
            requested_by=actor.name,
            requested_at=now,
            expires_at=now + issuer.settings.benchmark_ttl,
            profile=profile,
            selector=target.describe(),
            sha256=sha256,
            length=length,
            candidates=[
                Path(entry.path).stem
                for entry in manifest.files
                if entry.path.startswith("candidates/")
            ],
        )
        _place(upload, request_file(data_dir, benchmark))
    finally:
        upload.unlink(missing_ok=True)
    session.add(benchmark)
    session.flush()  # the row's id goes into the directives
    ref = BundleRef(name=manifest.name, version=manifest.version, sha256=sha256, length=length)
    url = f"{issuer.settings.base_url}{request_path(benchmark.id)}"
    sent: list[tuple[BenchmarkResult, OutgoingDirective]] = []
    for device in devices:
        directive = issuer.prepare_benchmark(session, device, benchmark.id, ref, url)
        result = BenchmarkResult(
            benchmark_id=benchmark.id,
            device_id=device.id,
            directive_sequence=directive.sequence,
        )
        session.add(result)
        sent.append((result, directive))
    record_audit(
        session,
        actor,
        AUDIT_ACTION,
        f"benchmark {benchmark.id}",
        {
            "sha256": sha256,
            "profile": profile,
            "target": target.describe(),
            "devices": [device.id for device in devices],
        },
        now=now,
    )
    session.commit()
    for result, directive in sent:
        try:
            publish_directive(publisher, directive)
        except PublishError as exc:
            result.error = f"the directive was not published (the broker did not take it): {exc}"
    session.commit()
    return benchmark


def get_benchmark(session: Session, benchmark_id: int) -> tuple[Benchmark, list[BenchmarkResult]]:
    """The benchmark and its devices' parts, by device id.

    Raises:
        NotFoundError: no such benchmark.
    """
    benchmark = session.get(Benchmark, benchmark_id)
    if benchmark is None:
        raise NotFoundError(f"no benchmark {benchmark_id}")
    query = (
        select(BenchmarkResult)
        .where(BenchmarkResult.benchmark_id == benchmark_id)
        .order_by(BenchmarkResult.device_id)
    )
    return benchmark, list(session.scalars(query))


def record_results(
    session: Session,
    benchmark_id: int,
    device_id: str,
    results: BenchmarkResults,
    received_at: dt.datetime,
) -> None:
    """Store `results` (verified as sent by `device_id`) on that device's part.

    Raises:
        NotFoundError: the benchmark was not sent to this device.
        ConflictError: the device answered already, or the benchmark has expired.
    """
    benchmark = session.get(Benchmark, benchmark_id)
    result = session.get(BenchmarkResult, (benchmark_id, device_id))
    if benchmark is None or result is None:
        raise NotFoundError(f"benchmark {benchmark_id} was not sent to device {device_id}")
    if result.answered_at is not None:
        raise ConflictError(f"device {device_id} answered benchmark {benchmark_id} already")
    if received_at >= benchmark.expires_at:
        raise ConflictError(f"benchmark {benchmark_id} expired at {benchmark.expires_at}")
    document: dict[str, Any] = results.model_dump(mode="json")
    result.result = document
    result.answered_at = received_at


__all__ = [
    "AUDIT_ACTION",
    "DeviceState",
    "Target",
    "create_benchmark",
    "device_state",
    "get_benchmark",
    "record_results",
    "request_file",
]
