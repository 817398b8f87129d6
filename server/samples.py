"""Raw inputs devices uploaded (their reservoirs, `edgefleet.agent.reservoir`), for retraining.

    DATA_DIR/samples/<sha256>.npz    the files, named by the SHA-256 of their bytes

An upload (`edgefleet.samplewire`: signed by the device's enrolled key, dated
within the replay window) is streamed by the route into a file of the uploads
directory (`BundleStore.new_upload_path`, whose stale files the server removes
at start), then `store_sample` checks it (its size and SHA-256 are the ones
the signed metadata names; it is an .npz: a zip of .npy arrays whose checksums
hold, not inflating beyond MAX_INFLATION times its size) and only then moves it
under its name (fsync, rename) and adds the `input_samples` row. A refused
upload leaves nothing behind. The same file from the same device again is
stored once (a replay changes nothing). Raw inputs are sensitive data: the
file is served to operators only, and each download is audited (the route).
"""

from __future__ import annotations

import datetime as dt
import os
import zipfile
import zlib
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from edgefleet.fileio import file_sha256, fsync_directory
from edgefleet.samplewire import SampleUpload
from edgefleet.server.db.models import InputSample
from edgefleet.server.errors import InvalidRequestError, NotFoundError, StorageError
from edgefleet.timefmt import parse_time

SAMPLE_SUFFIX = ".npz"
NPY_MAGIC = b"\x93NUMPY"
MAX_INFLATION = 4  # the arrays of an upload may hold at most this many times its bytes


def samples_dir(data_dir: Path) -> Path:
    return Path(data_dir) / "samples"


def sample_path(data_dir: Path, row: InputSample) -> Path:
    return samples_dir(data_dir) / f"{row.sha256}{SAMPLE_SUFFIX}"


def check_npz(path: Path, size: int) -> None:
    """Raises: InvalidRequestError when `path` is not an intact .npz of arrays."""
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
            if not members or any(not m.filename.endswith(".npy") for m in members):
                raise InvalidRequestError("the upload is not an .npz of arrays")
            if sum(m.file_size for m in members) > MAX_INFLATION * size:
                raise InvalidRequestError("the upload's arrays inflate beyond what is accepted")
            for member in members:
                with archive.open(member) as handle:
                    if handle.read(len(NPY_MAGIC)) != NPY_MAGIC:
                        raise InvalidRequestError(f"{member.filename} in the upload is no array")
            broken = archive.testzip()
    except (zipfile.BadZipFile, zlib.error, EOFError, ValueError, RuntimeError) as exc:
        # RuntimeError: an encrypted member; NotImplementedError (a RuntimeError): an
        # unknown compression.
        raise InvalidRequestError(f"the upload is not an intact .npz file: {exc}") from exc
    if broken is not None:
        raise InvalidRequestError(f"{broken} in the upload is damaged (checksum)")


def store_sample(
    session: Session, data_dir: Path, upload: Path, meta: SampleUpload, now: dt.datetime
) -> tuple[InputSample, bool]:
    """Check the uploaded file and store it with its row; True when it is new.

    The upload file is moved or removed either way.

    Raises:
        InvalidRequestError: not the size or SHA-256 the metadata names, or not an .npz.
        StorageError: the data directory refused the file.
    """
    try:
        length, sha256 = file_sha256(upload)
        if (length, sha256) != (meta.size_bytes, meta.sha256):
            raise InvalidRequestError(
                f"the upload has {length} bytes of SHA-256 {sha256}; its signed metadata "
                f"names {meta.size_bytes} bytes of SHA-256 {meta.sha256}: it was cut or changed"
            )
        check_npz(upload, length)
        query = select(InputSample).where(
            InputSample.device_id == meta.device_id, InputSample.sha256 == sha256
        )
        existing = session.scalars(query.limit(1)).first()
        if existing is not None:
            return existing, False
        target = samples_dir(data_dir) / f"{sha256}{SAMPLE_SUFFIX}"
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(upload, "rb") as handle:
                os.fsync(handle.fileno())
            os.replace(upload, target)
            fsync_directory(target.parent)
        except OSError as exc:
            raise StorageError(f"cannot store uploaded samples {sha256}: {exc}") from exc
    finally:
        upload.unlink(missing_ok=True)
    row = InputSample(
        device_id=meta.device_id,
        bundle_name=meta.bundle_name,
        bundle_version=meta.bundle_version,
        reason=meta.reason,
        samples=meta.samples,
        size_bytes=length,
        sha256=sha256,
        captured_at=parse_time(meta.captured_at),
        received_at=now,
    )
    session.add(row)
    session.flush()
    return row, True


def list_samples(
    session: Session, device_id: str | None = None, limit: int = 100, offset: int = 0
) -> list[InputSample]:
    """Newest first."""
    query = select(InputSample).order_by(InputSample.id.desc()).limit(limit).offset(offset)
    if device_id is not None:
        query = query.where(InputSample.device_id == device_id)
    return list(session.scalars(query))


def get_sample(session: Session, sample_id: int) -> InputSample:
    """Raises: NotFoundError."""
    row = session.get(InputSample, sample_id)
    if row is None:
        raise NotFoundError(f"no uploaded samples with id {sample_id}")
    return row
