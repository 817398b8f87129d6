"""A device's raw inputs: uploaded by the agent, signed with its key, stored, listed and
downloaded (audited); refused when the signature, the date, the size or the file is wrong."""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import io
import json
import random
from pathlib import Path

import numpy as np
import pytest

from edgefleet.agent.reservoir import SampleMeta, episode_files
from edgefleet.agent.upload import SampleUploader, UploadError, upload_file
from edgefleet.backoff import Backoff
from edgefleet.mqtt.devicesig import DeviceKey
from edgefleet.samplewire import META_HEADER, SIGNATURE_HEADER, SampleUpload, sign_upload
from edgefleet.server.db.database import Database
from edgefleet.server.principals import Role
from edgefleet.timefmt import format_time
from edgefleet.trust import TrustRoot
from tests.agent.broker import free_port
from tests.clirun import Cli
from tests.server.apiclient import Api, make_api, serve

DEVICE = "cam-07"


def npz_bytes(rows: int = 5) -> bytes:
    buffer = io.BytesIO()
    rng = np.random.default_rng(1)
    np.savez(buffer, features=rng.random((rows, 64), dtype=np.float32), levels=np.full(rows, 8))
    return buffer.getvalue()


def write_episode(
    directory: Path, data: bytes, stem: str = "20260301T120200Z-digits-1.0.0"
) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{stem}.npz"
    path.write_bytes(data)
    meta = SampleMeta(
        "digits",
        "1.0.0",
        "drift on features[3] since 2026-03-01T12:02:00Z",
        5,
        "2026-03-01T12:02:00Z",
    )
    path.with_suffix(".json").write_text(json.dumps(dataclasses.asdict(meta)))
    return path


def enrolled(api: Api) -> DeviceKey:
    key = DeviceKey.generate()
    assert api.enroll(DEVICE, public_key=key.public_hex).status_code in (200, 201)
    return key


def signed_headers(
    api: Api, key: DeviceKey, data: bytes, *, sent_at: dt.datetime | None = None, **changes: object
) -> dict[str, str]:
    fields: dict[str, object] = {
        "device_id": DEVICE,
        "bundle_name": "digits",
        "bundle_version": "1.0.0",
        "reason": "drift on features[3]",
        "samples": 5,
        "captured_at": "2026-03-01T12:02:00Z",
        "sent_at": format_time(sent_at or api.clock()),
        "sha256": hashlib.sha256(data).hexdigest(),
        "size_bytes": len(data),
    }
    fields.update(changes)
    meta = json.dumps(
        SampleUpload.model_validate(fields).model_dump(), separators=(",", ":")
    ).encode()
    return {
        META_HEADER: meta.decode(),
        SIGNATURE_HEADER: sign_upload(meta, DEVICE, key),
        "Content-Type": "application/octet-stream",
    }


def stored_files(api: Api) -> list[Path]:
    """The files of the samples directory, and any upload left behind."""
    data = api.context.settings.data_dir
    return sorted(
        path
        for directory in (data / "samples", data / "uploads")
        if directory.exists()
        for path in directory.iterdir()
    )


def test_the_agent_uploads_and_an_operator_downloads(
    database: Database, tmp_path: Path, trust: TrustRoot
) -> None:
    api = make_api(database, tmp_path, trust)
    key = enrolled(api)
    data = npz_bytes()
    episode = write_episode(tmp_path / "device-samples", data)
    with serve(api) as url:
        upload_file(url, DEVICE, key, episode)
        upload_file(url, DEVICE, key, episode)  # again (a retry after a lost answer): stored once
    listed = api.get("/samples", Role.VIEWER, params={"device": DEVICE}).json()
    assert len(listed) == 1
    sample = listed[0]
    assert (sample["device_id"], sample["samples"], sample["size_bytes"]) == (DEVICE, 5, len(data))
    assert sample["sha256"] == hashlib.sha256(data).hexdigest()
    assert sample["reason"].startswith("drift on features[3]")
    assert stored_files(api) == [
        api.context.settings.data_dir / "samples" / f"{sample['sha256']}.npz"
    ]
    assert api.get(f"/samples/{sample['id']}", Role.VIEWER).status_code == 403
    download = api.get(f"/samples/{sample['id']}", Role.OPERATOR)
    assert download.status_code == 200 and download.content == data
    audit = [(e["action"], e["target"]) for e in api.get("/audit").json()]
    assert ("samples.download", f"samples {sample['id']}") in audit
    assert api.get("/samples", Role.VIEWER, params={"device": "another"}).json() == []


def test_a_wrong_signature_is_refused_and_nothing_stored(
    sqlite_database: Database, tmp_path: Path, trust: TrustRoot
) -> None:
    api = make_api(sqlite_database, tmp_path, trust)
    enrolled(api)
    data = npz_bytes()
    impostor = DeviceKey.generate()
    answer = api.post(
        f"/devices/{DEVICE}/samples",
        None,
        content=data,
        headers=signed_headers(api, impostor, data),
    )
    assert answer.status_code == 401 and answer.json()["error"] == "auth"
    unsigned = api.post(f"/devices/{DEVICE}/samples", None, content=data)
    assert unsigned.status_code == 401
    headers = signed_headers(api, impostor, data)
    unknown = api.post("/devices/cam-99/samples", None, content=data, headers=headers)
    assert unknown.status_code == 404
    assert api.get("/samples").json() == [] and stored_files(api) == []


def test_another_devices_route_or_an_old_upload_is_refused(
    sqlite_database: Database, tmp_path: Path, trust: TrustRoot
) -> None:
    api = make_api(sqlite_database, tmp_path, trust)
    key = enrolled(api)
    assert api.enroll("cam-08").status_code in (200, 201)
    data = npz_bytes()
    moved = api.post(
        "/devices/cam-08/samples", None, content=data, headers=signed_headers(api, key, data)
    )
    assert moved.status_code == 401  # signed for cam-07's route, under cam-08's key: no
    stale = signed_headers(api, key, data, sent_at=api.clock() - dt.timedelta(hours=1))
    replayed = api.post(f"/devices/{DEVICE}/samples", None, content=data, headers=stale)
    assert replayed.status_code == 401 and "replay window" in replayed.json()["detail"]
    assert api.get("/samples").json() == [] and stored_files(api) == []


@pytest.mark.parametrize("damage", ["truncated", "garbage", "changed"])
def test_a_damaged_upload_is_refused_and_nothing_stored(
    sqlite_database: Database, tmp_path: Path, trust: TrustRoot, damage: str
) -> None:
    api = make_api(sqlite_database, tmp_path, trust)
    key = enrolled(api)
    data = npz_bytes()
    if damage == "truncated":  # signed for the whole file, cut on the way
        headers, body = signed_headers(api, key, data), data[: len(data) // 2]
    elif damage == "garbage":  # signed as it is: the device sent no .npz
        body = b"PK\x03\x04 not really a zip" * 40
        headers = signed_headers(api, key, body)
    else:  # a signed, whole zip whose array bytes were changed: checksums fail
        changed = bytearray(data)
        changed[len(changed) // 3] ^= 0xFF
        body = bytes(changed)
        headers = signed_headers(api, key, body)
    answer = api.post(f"/devices/{DEVICE}/samples", None, content=body, headers=headers)
    assert answer.status_code == 422, answer.text
    assert api.get("/samples").json() == [] and stored_files(api) == []


def test_an_upload_over_the_servers_limit_is_refused(
    sqlite_database: Database, tmp_path: Path, trust: TrustRoot
) -> None:
    data = npz_bytes(rows=200)
    api = make_api(sqlite_database, tmp_path, trust, max_sample_bytes=len(data) - 1)
    key = enrolled(api)
    answer = api.post(
        f"/devices/{DEVICE}/samples", None, content=data, headers=signed_headers(api, key, data)
    )
    assert answer.status_code == 413
    assert stored_files(api) == []


def test_the_uploader_deletes_after_a_2xx_and_keeps_the_file_while_the_server_is_away(
    sqlite_database: Database, tmp_path: Path, trust: TrustRoot
) -> None:
    api = make_api(sqlite_database, tmp_path, trust)
    key = enrolled(api)
    directory = tmp_path / "device-samples"
    first = write_episode(directory, npz_bytes(), "20260301T120200Z-digits-1.0.0")
    running = write_episode(directory, npz_bytes(rows=7), "20260301T130200Z-digits-1.0.0")
    now = [0.0]
    away = SampleUploader(
        f"http://127.0.0.1:{free_port()}",
        DEVICE,
        key,
        directory,
        current_file=lambda: None,
        is_enrolled=lambda: True,
        backoff=Backoff(initial=30.0, maximum=60.0),
        rng=random.Random(1),
        clock=lambda: now[0],
    )
    away.step()
    assert away.failures == 1 and episode_files(directory) == [first, running]
    with pytest.raises(UploadError):
        upload_file(away.server_url, DEVICE, key, first)
    with serve(api) as url:
        uploader = SampleUploader(
            url, DEVICE, key, directory, current_file=lambda: running, is_enrolled=lambda: True
        )
        uploader.step()
    assert episode_files(directory) == [running]  # the running episode is never sent
    assert not first.exists() and not first.with_suffix(".json").exists()
    assert [row["sha256"] for row in api.get("/samples").json()] == [
        hashlib.sha256(npz_bytes()).hexdigest()
    ]


def test_the_cli_lists_and_downloads(
    sqlite_database: Database,
    tmp_path: Path,
    trust: TrustRoot,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    api = make_api(sqlite_database, tmp_path, trust)
    key = enrolled(api)
    data = npz_bytes()
    run = Cli(capsys)
    with serve(api) as url:
        upload_file(url, DEVICE, key, write_episode(tmp_path / "device-samples", data))
        monkeypatch.setenv("EDGEFLEET_SERVER", url)
        monkeypatch.setenv("EDGEFLEET_TOKEN", api.tokens[Role.OPERATOR])
        out, _ = run("samples", "list", "--device", DEVICE)
        header, row = out.splitlines()
        assert header.split()[:4] == ["ID", "DEVICE", "BUNDLE", "SAMPLES"]
        sample_id, device, bundle, samples = row.split()[:4]
        assert (device, bundle, samples) == (DEVICE, "digits@1.0.0", "5")
        target = tmp_path / "out" / "inputs.npz"
        target.parent.mkdir()
        out, _ = run("samples", "get", sample_id, "-o", target)
        assert target.read_bytes() == data and out.startswith(f"wrote {len(data)} bytes")
        with np.load(target) as arrays:
            assert arrays["features"].shape == (5, 64)
        _, err = run("samples", "get", "999", "-o", tmp_path / "out" / "none.npz", status=1)
        assert err.startswith("refused [not-found]: no uploaded samples with id 999")
        assert not (tmp_path / "out" / "none.npz").exists()
        monkeypatch.setenv("EDGEFLEET_TOKEN", api.tokens[Role.VIEWER])
        _, err = run("samples", "get", sample_id, "-o", tmp_path / "out" / "viewer.npz", status=1)
        assert err.startswith("refused [forbidden]: ")
        out, _ = run("samples", "list", "--device", "another")
        assert out.strip() == "no uploaded samples"
