"""Bundles through the API: push (verified, idempotent, bounded), list, show, download."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgefleet.agent.transport.http import HttpFetcher
from edgefleet.bundle import build_bundle
from edgefleet.keys import SigningKey
from edgefleet.mqtt import BundleRef, HttpSource
from edgefleet.server.bundles import BUNDLE_SUFFIX
from edgefleet.server.db.database import Database
from edgefleet.server.principals import Role
from edgefleet.trust import TrustRoot
from tests.conftest import PROFILE, KeySet, write_model_dir
from tests.core.forge import forge
from tests.server.apiclient import API, Api, make_api, serve


@pytest.fixture
def api(sqlite_database: Database, tmp_path: Path, trust: TrustRoot) -> Api:
    return make_api(sqlite_database, tmp_path, trust, max_bundle_bytes=400_000)


def other_bundle(tmp_path: Path, key: SigningKey, *, version: str = "1.2.3") -> Path:
    src = write_model_dir(tmp_path / f"src-{key.keyid[:8]}-{version}")
    output = tmp_path / f"other-{key.keyid[:8]}-{version}.efb"
    build_bundle(src, output, name="demo", version=version, keys=[key], profiles=[PROFILE])
    return output


def uploads_left(api: Api) -> list[Path]:
    return list(api.context.bundles.uploads_dir.iterdir())


def test_push_stores_once_and_repeats_are_200(api: Api, bundle_file: Path) -> None:
    first = api.push(bundle_file)
    assert first.status_code == 201, first.text
    body = first.json()
    data = bundle_file.read_bytes()
    assert body["name"] == "demo" and body["version"] == "1.2.3"
    assert body["sha256"] == hashlib.sha256(data).hexdigest() and body["length"] == len(data)
    assert body["profiles"] == [PROFILE] and body["pushed_by"].startswith("operator-")
    assert {f["path"] for f in body["manifest"]["files"]} >= {"model.onnx"}

    again = api.push(bundle_file)
    assert again.status_code == 200 and again.json()["id"] == body["id"]
    assert [b["id"] for b in api.get("/bundles", Role.VIEWER).json()] == [body["id"]]
    assert api.get("/bundles/demo/1.2.3", Role.VIEWER).json() == body
    assert api.get("/bundles", params={"name": "other"}).json() == []
    assert uploads_left(api) == []
    audit = [(e["action"], e["target"]) for e in api.get("/audit").json()]
    assert audit == [("bundle.push", "demo@1.2.3")]


def test_other_bytes_under_the_same_version_are_409(
    api: Api, bundle_file: Path, tmp_path: Path, keyset: KeySet
) -> None:
    assert api.push(bundle_file).status_code == 201
    response = api.push(other_bundle(tmp_path, keyset.release))
    assert response.status_code == 409
    assert response.json()["error"] == "bundle-exists"
    assert (
        api.get("/bundles/demo/1.2.3").json()["sha256"]
        == hashlib.sha256(bundle_file.read_bytes()).hexdigest()
    )


def test_unsigned_or_garbage_bundles_are_refused_with_their_code(
    api: Api, tmp_path: Path, bundle_file: Path
) -> None:
    stranger = api.push(other_bundle(tmp_path, SigningKey.generate()))
    assert stranger.status_code == 422
    assert stranger.json()["error"] == "unknown-key"
    garbage = api.post(
        "/bundles",
        Role.OPERATOR,
        content=b"not a bundle" * 100,
        headers={"Content-Type": "application/octet-stream"},
    )
    assert garbage.status_code == 422 and garbage.json()["error"] == "not-a-bundle"
    tampered = bytearray(bundle_file.read_bytes())
    tampered[-2000] ^= 0xFF
    refused = api.post("/bundles", Role.OPERATOR, content=bytes(tampered))
    assert refused.status_code == 422
    empty = api.post("/bundles", Role.OPERATOR, content=b"")
    assert empty.status_code == 422 and empty.json()["error"] == "invalid-request"
    assert api.get("/bundles").json() == []
    assert uploads_left(api) == []
    assert list(api.context.bundles.bundles_dir.iterdir()) == []


def test_bodies_over_the_limit_are_413_declared_or_streamed(api: Api) -> None:
    declared = api.post("/bundles", Role.OPERATOR, content=b"x" * 400_001)
    assert declared.status_code == 413 and declared.json()["error"] == "body-too-large"

    def chunks() -> Iterator[bytes]:  # no Content-Length: chunked transfer
        for _ in range(10):
            yield b"y" * 50_000

    streamed = api.post("/bundles", Role.OPERATOR, content=chunks())
    assert streamed.status_code == 413, streamed.text
    assert uploads_left(api) == []


def test_download_whole_and_ranges(api: Api, bundle_file: Path) -> None:
    sha = api.push(bundle_file).json()["sha256"]
    data = bundle_file.read_bytes()
    n = len(data)
    for path, role in ((f"/blobs/{sha}", None), ("/bundles/demo/1.2.3/file", Role.VIEWER)):
        whole = api.get(path, role)
        assert whole.status_code == 200 and whole.content == data
        assert whole.headers["Accept-Ranges"] == "bytes"
        assert whole.headers["Content-Length"] == str(n)

        resumed = api.get(path, role, headers={"Range": "bytes=1000-"})
        assert resumed.status_code == 206 and resumed.content == data[1000:]
        assert resumed.headers["Content-Range"] == f"bytes 1000-{n - 1}/{n}"
        middle = api.get(path, role, headers={"Range": "bytes=10-19"})
        assert middle.content == data[10:20]
        tail = api.get(path, role, headers={"Range": "bytes=-7"})
        assert tail.content == data[-7:]

        for bad in (f"bytes={n}-", "bytes=5-1", "bytes=0-1,4-5", "bytes=abc", "bytes"):
            refused = api.get(path, role, headers={"Range": bad})
            assert refused.status_code == 416, bad
            assert refused.headers["Content-Range"] == f"bytes */{n}"
            assert refused.json()["error"] == "range-not-satisfiable"


def test_unknown_and_malformed_names_are_4xx(api: Api) -> None:
    assert api.get("/blobs/" + "a" * 64, None).status_code == 404
    assert api.get("/blobs/../../etc/passwd", None).status_code == 404
    assert api.get("/blobs/" + "A" * 64, None).status_code == 422
    assert api.get("/bundles/demo/9.9.9").status_code == 404
    assert api.get("/bundles/demo/9.9.9/file").status_code == 404
    assert api.get("/bundles/Demo!/1.0.0").status_code == 422
    assert api.get("/bundles/demo/not-semver").status_code == 422
    assert api.get("/bundles", params={"name": "\u0000"}).status_code == 422


def test_a_file_no_bundle_row_names_is_not_served(api: Api, bundle_file: Path) -> None:
    # What a push whose commit failed leaves behind: the verified file, no row.
    data = bundle_file.read_bytes()
    orphan = hashlib.sha256(data).hexdigest()
    api.context.bundles.bundles_dir.mkdir(parents=True, exist_ok=True)
    (api.context.bundles.bundles_dir / f"{orphan}{BUNDLE_SUFFIX}").write_bytes(data)
    refused = api.get(f"/blobs/{orphan}", None)
    assert refused.status_code == 404 and refused.json()["error"] == "not-found"
    assert api.push(bundle_file).json()["sha256"] == orphan  # a push adds the row
    assert api.get(f"/blobs/{orphan}", None).content == data


def test_the_agents_http_fetcher_resumes_from_the_blob_route(
    api: Api, bundle_file: Path, tmp_path: Path
) -> None:
    sha = api.push(bundle_file).json()["sha256"]
    data = bundle_file.read_bytes()
    destination = tmp_path / "device" / "bundle.efb"
    destination.parent.mkdir()
    (destination.parent / "bundle.efb.part").write_bytes(data[:5000])  # an interrupted download
    ref = BundleRef(name="demo", version="1.2.3", sha256=sha, length=len(data))
    fetcher = HttpFetcher(timeout=10)
    with serve(api) as url:
        source = HttpSource(url=f"{url}{API}/blobs/{sha}")
        assert fetcher.fetch_from(source, ref, destination) == destination
    assert destination.read_bytes() == data
    assert fetcher.last_stats is not None
    assert fetcher.last_stats.resumed_from == 5000 and fetcher.last_stats.restarts == 0
    assert fetcher.last_stats.bytes_received == len(data) - 5000


def test_a_release_counter_the_database_cannot_store_is_refused_not_a_500(
    api: Api, tmp_path: Path, keyset: KeySet
) -> None:
    # Built elsewhere (not by `bundle build`, which refuses it): signed, but over 2**63-1.
    bundle = forge(
        tmp_path / "huge.efb", {"model.onnx": b"onnx" * 100}, [keyset.release],
        release_counter=20261208000000000000,
    )  # fmt: skip
    response = api.push(bundle)
    assert response.status_code == 422, response.text
    assert response.json()["error"] == "malformed-document"
    assert "release_counter" in response.json()["detail"]
    assert api.get("/bundles").json() == []
    assert uploads_left(api) == []
