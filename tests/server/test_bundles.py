"""The bundle store: what it accepts, what it refuses, and that a refusal leaves nothing behind."""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import shutil
import tarfile
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import select

from edgefleet.bundle import build_bundle
from edgefleet.errors import (
    BadSignatureError,
    BundleError,
    PathConflictError,
    TamperedFileError,
    TrustRootExpiredError,
    UnknownKeyError,
    UsageError,
    WrongRoleError,
)
from edgefleet.keys import SigningKey
from edgefleet.server.audit import list_audit
from edgefleet.server.bundles import BundleStore, is_sha256
from edgefleet.server.db.database import Database
from edgefleet.server.db.models import BundleRow
from edgefleet.server.errors import BundleExistsError, NotFoundError
from edgefleet.server.principals import Principal, Role
from edgefleet.timefmt import utcnow
from edgefleet.trust import TrustRoot
from tests.conftest import write_model_dir
from tests.core.forge import forge
from tests.server.conftest import PROFILE, KeySet, make_trust_root

ALICE = Principal("alice", Role.OPERATOR)
BOB = Principal("bob", Role.OPERATOR)


def build(
    tmp_path: Path,
    keys: list[SigningKey],
    *,
    name: str = "demo",
    version: str = "1.2.3",
    tag: str = "",
) -> Path:
    """A freshly built bundle (random model bytes, so every call differs)."""
    src = write_model_dir(tmp_path / f"src-{name}-{version}-{tag}-{os.urandom(4).hex()}")
    output = tmp_path / f"{name}-{version}-{tag}-{os.urandom(4).hex()}.efb"
    build_bundle(
        src,
        output,
        name=name,
        version=version,
        keys=keys,
        profiles=[PROFILE],
        lineage={"source": "tests"},
    )
    return output


def upload(store: BundleStore, bundle: Path) -> Path:
    """What the API does with a request body: copy it into a new upload file."""
    path = store.new_upload_path()
    shutil.copyfile(bundle, path)
    return path


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def stored_files(store: BundleStore) -> list[str]:
    return sorted(p.name for p in store.bundles_dir.iterdir())


def bundle_rows(db: Database) -> list[BundleRow]:
    with db.session() as session:
        return list(session.scalars(select(BundleRow).order_by(BundleRow.id)))


@pytest.fixture
def store(tmp_path: Path, trust: TrustRoot) -> BundleStore:
    return BundleStore(tmp_path / "data", trust)


def test_push_stores_the_verified_file_under_its_digest_and_adds_a_row(
    database: Database, store: BundleStore, tmp_path: Path, keyset: KeySet
) -> None:
    bundle = build(tmp_path, [keyset.release])
    incoming = upload(store, bundle)
    with database.session() as session:
        row, created = store.push(session, incoming, ALICE)
    assert created
    digest = sha256_of(bundle)
    assert (row.name, row.version, row.sha256, row.length) == (
        "demo",
        "1.2.3",
        digest,
        bundle.stat().st_size,
    )
    assert row.profiles == [PROFILE] and row.pushed_by == "alice"
    assert row.release_counter >= 0 and row.min_agent_version
    assert row.manifest["name"] == "demo" and row.manifest["lineage"] == {"source": "tests"}
    assert [f["path"] for f in row.manifest["files"]] == [
        "model.float.onnx",
        "model.onnx",
        "samples/inputs.npz",
    ]
    assert row.manifest["signed_by"] == [keyset.release.keyid]
    assert store.path_of(row).read_bytes() == bundle.read_bytes()
    with database.session() as session:
        assert store.open_blob(session, digest) == store.path_of(row)
    assert stored_files(store) == [f"{digest}.efb"]
    assert list(store.uploads_dir.iterdir()) == []  # moved, not copied
    with database.session() as session:
        entries = list_audit(session)
        assert [(e.actor, e.action, e.target) for e in entries] == [
            ("alice", "bundle.push", "demo@1.2.3")
        ]
        assert entries[0].details["sha256"] == digest
        assert store.get(session, "demo", "1.2.3").id == row.id
        found = store.get_by_sha256(session, digest)
        assert found is not None and found.id == row.id


def test_identical_push_again_is_idempotent(
    database: Database, store: BundleStore, tmp_path: Path, keyset: KeySet
) -> None:
    bundle = build(tmp_path, [keyset.release])
    with database.session() as session:
        first, created = store.push(session, upload(store, bundle), ALICE)
    assert created
    again = upload(store, bundle)
    with database.session() as session:
        second, created = store.push(session, again, BOB)
    assert not created
    assert second.id == first.id and second.pushed_by == "alice"
    assert not again.exists() and list(store.uploads_dir.iterdir()) == []
    assert len(bundle_rows(database)) == 1
    with database.session() as session:
        assert len(list_audit(session)) == 1  # nothing changed, nothing audited


def test_other_bytes_under_a_stored_name_and_version_are_refused(
    database: Database, store: BundleStore, tmp_path: Path, keyset: KeySet
) -> None:
    original = build(tmp_path, [keyset.release])
    rebuilt = build(tmp_path, [keyset.release], tag="rebuilt")  # same name@version, new bytes
    with database.session() as session:
        row, _ = store.push(session, upload(store, original), ALICE)
    incoming = upload(store, rebuilt)
    with pytest.raises(BundleExistsError) as caught, database.session() as session:
        store.push(session, incoming, BOB)
    message = str(caught.value)
    assert "demo@1.2.3" in message
    assert sha256_of(original) in message and sha256_of(rebuilt) in message
    assert not incoming.exists()
    assert stored_files(store) == [f"{row.sha256}.efb"]
    assert store.path_of(row).read_bytes() == original.read_bytes()
    assert [r.sha256 for r in bundle_rows(database)] == [row.sha256]


def assert_nothing_stored(database: Database, store: BundleStore, incoming: Path) -> None:
    assert not incoming.exists()
    assert list(store.uploads_dir.iterdir()) == []
    assert stored_files(store) == []
    assert bundle_rows(database) == []
    with database.session() as session:
        assert list_audit(session) == []


def test_bundle_signed_by_an_unknown_key_is_refused(
    sqlite_database: Database, store: BundleStore, tmp_path: Path
) -> None:
    incoming = upload(store, build(tmp_path, [SigningKey.generate()]))
    with pytest.raises(UnknownKeyError), sqlite_database.session() as session:
        store.push(session, incoming, ALICE)
    assert_nothing_stored(sqlite_database, store, incoming)


def test_bundle_signed_by_the_server_key_is_refused(
    sqlite_database: Database, store: BundleStore, tmp_path: Path, keyset: KeySet
) -> None:
    # The server role signs directives; only the release role may sign bundles.
    incoming = upload(store, build(tmp_path, [keyset.server]))
    with pytest.raises(WrongRoleError), sqlite_database.session() as session:
        store.push(session, incoming, ALICE)
    assert_nothing_stored(sqlite_database, store, incoming)


def test_manifest_edited_after_signing_is_refused(
    database: Database, store: BundleStore, tmp_path: Path, keyset: KeySet
) -> None:
    bundle = build(tmp_path, [keyset.release], version="1.2.3")
    data = bundle.read_bytes()
    # Same length, so the archive stays well-formed: only the signature can tell.
    assert data.count(b'"version":"1.2.3"') == 1
    bundle.write_bytes(data.replace(b'"version":"1.2.3"', b'"version":"1.2.4"'))
    incoming = upload(store, bundle)
    with pytest.raises(BadSignatureError), database.session() as session:
        store.push(session, incoming, ALICE)
    assert_nothing_stored(database, store, incoming)


def test_file_changed_after_signing_is_refused(
    sqlite_database: Database, store: BundleStore, tmp_path: Path, keyset: KeySet
) -> None:
    bundle = build(tmp_path, [keyset.release])
    with tarfile.open(bundle) as archive:
        offset = archive.getmember("model.onnx").offset_data + 1234
    with open(bundle, "r+b") as handle:
        handle.seek(offset)
        byte = handle.read(1)
        handle.seek(offset)
        handle.write(bytes([byte[0] ^ 0x01]))
    incoming = upload(store, bundle)
    with pytest.raises(TamperedFileError, match=r"model\.onnx"), sqlite_database.session() as s:
        store.push(s, incoming, ALICE)
    assert_nothing_stored(sqlite_database, store, incoming)


def test_a_manifest_listing_a_file_and_a_path_inside_it_is_refused(
    sqlite_database: Database, store: BundleStore, tmp_path: Path, keyset: KeySet
) -> None:
    # Signed by the release key, yet no device could stage it: `a` cannot also be a directory.
    files = {"a": b"a file", "a/b": b"a file inside the file"}
    incoming = upload(store, forge(tmp_path / "conflict.efb", files, [keyset.release]))
    with pytest.raises(PathConflictError, match="'a' as a file"), sqlite_database.session() as s:
        store.push(s, incoming, ALICE)
    assert_nothing_stored(sqlite_database, store, incoming)


@pytest.mark.parametrize("content", [b"", b"not a bundle at all" * 100, os.urandom(4096)])
def test_what_is_not_a_bundle_is_refused(
    sqlite_database: Database, store: BundleStore, content: bytes
) -> None:
    incoming = store.new_upload_path()
    incoming.write_bytes(content)
    with pytest.raises(BundleError), sqlite_database.session() as session:
        store.push(session, incoming, ALICE)
    assert_nothing_stored(sqlite_database, store, incoming)


def test_push_is_refused_when_the_servers_trust_root_has_expired(
    sqlite_database: Database, tmp_path: Path, keyset: KeySet
) -> None:
    expired = make_trust_root(keyset, expires=utcnow() - dt.timedelta(days=1))
    store = BundleStore(tmp_path / "data", expired)
    incoming = upload(store, build(tmp_path, [keyset.release]))
    with pytest.raises(TrustRootExpiredError), sqlite_database.session() as session:
        store.push(session, incoming, ALICE)
    assert_nothing_stored(sqlite_database, store, incoming)


def test_a_file_outside_the_uploads_directory_is_neither_pushed_nor_deleted(
    sqlite_database: Database, store: BundleStore, tmp_path: Path, keyset: KeySet
) -> None:
    bundle = build(tmp_path, [keyset.release])
    with pytest.raises(UsageError, match="new_upload_path"), sqlite_database.session() as s:
        store.push(s, bundle, ALICE)
    assert bundle.exists() and bundle_rows(sqlite_database) == []


def test_rolled_back_push_leaves_no_row_and_the_next_push_stores_it(
    sqlite_database: Database, store: BundleStore, tmp_path: Path, keyset: KeySet
) -> None:
    bundle = build(tmp_path, [keyset.release])
    with pytest.raises(RuntimeError), sqlite_database.session() as session:
        store.push(session, upload(store, bundle), ALICE)
        raise RuntimeError("the request failed after the push")
    assert bundle_rows(sqlite_database) == []
    assert stored_files(store) == [f"{sha256_of(bundle)}.efb"]  # a harmless orphan
    with sqlite_database.session() as session:
        assert store.open_blob(session, sha256_of(bundle)) is None  # and never served
    with sqlite_database.session() as session:
        row, created = store.push(session, upload(store, bundle), ALICE)
    assert created and store.path_of(row).read_bytes() == bundle.read_bytes()
    assert stored_files(store) == [f"{row.sha256}.efb"]


def test_identical_push_restores_a_file_the_data_directory_lost(
    sqlite_database: Database, store: BundleStore, tmp_path: Path, keyset: KeySet
) -> None:
    bundle = build(tmp_path, [keyset.release])
    with sqlite_database.session() as session:
        row, _ = store.push(session, upload(store, bundle), ALICE)
    store.path_of(row).unlink()
    with sqlite_database.session() as session:
        assert store.open_blob(session, row.sha256) is None
    with sqlite_database.session() as session:
        _, created = store.push(session, upload(store, bundle), ALICE)
        assert not created and store.open_blob(session, row.sha256) == store.path_of(row)
    assert store.path_of(row).read_bytes() == bundle.read_bytes()


def test_concurrent_pushes_of_one_version_with_different_bytes_store_one(
    database: Database, store: BundleStore, tmp_path: Path, keyset: KeySet
) -> None:
    first = build(tmp_path, [keyset.release])
    second = build(tmp_path, [keyset.release], tag="other")
    outcome: list[BaseException | None] = []

    def push_second() -> None:
        try:
            with database.session() as session:
                store.push(session, upload(store, second), BOB)
        except BaseException as exc:
            outcome.append(exc)
        else:
            outcome.append(None)

    with database.session() as session:
        store.push(session, upload(store, first), ALICE)
        thread = threading.Thread(target=push_second)
        thread.start()
        # Its file placed, the second push is at its INSERT, which waits for our commit.
        deadline = time.monotonic() + 10
        while len(stored_files(store)) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.1)
    thread.join(30)
    assert len(outcome) == 1 and isinstance(outcome[0], BundleExistsError)
    assert "at the same moment" in str(outcome[0])
    assert [r.sha256 for r in bundle_rows(database)] == [sha256_of(first)]


def test_get_list_and_lookups(
    sqlite_database: Database, tmp_path: Path, keyset: KeySet, trust: TrustRoot
) -> None:
    moments = iter(utcnow() + dt.timedelta(minutes=i) for i in range(10))
    store = BundleStore(tmp_path / "data", trust, clock=lambda: next(moments))
    pushed = {}
    for name, version in [("demo", "1.0.0"), ("other", "0.1.0"), ("demo", "1.1.0")]:
        with sqlite_database.session() as session:
            row, _ = store.push(
                session,
                upload(store, build(tmp_path, [keyset.release], name=name, version=version)),
                ALICE,
            )
            pushed[(name, version)] = row.sha256
    with sqlite_database.session() as session:
        assert [(r.name, r.version) for r in store.list(session)] == [
            ("demo", "1.1.0"),
            ("other", "0.1.0"),
            ("demo", "1.0.0"),
        ]
        assert [r.version for r in store.list(session, name="demo")] == ["1.1.0", "1.0.0"]
        assert store.list(session, name="missing") == []
        with pytest.raises(NotFoundError, match=r"demo@9\.9\.9"):
            store.get(session, "demo", "9.9.9")
        assert store.get_by_sha256(session, "0" * 64) is None
        assert store.get_by_sha256(session, pushed[("demo", "1.0.0")].upper()) is None


@pytest.mark.parametrize(
    "name",
    [
        "",
        "..",
        "../secret",
        "../../etc/passwd",
        "A" * 64,  # digests are lowercase
        "0" * 63,
        "0" * 65,
        "0" * 64 + "/",
        "0" * 64 + ".efb",
        "0" * 64 + "\n",
        "0" * 64,  # well-formed, but not stored
    ],
)
def test_open_blob_never_names_another_file(
    sqlite_database: Database, store: BundleStore, name: str
) -> None:
    # Files a lax lookup would hand out: beside the store, digests in other forms, and
    # an orphan file of a well-formed digest that no bundle row names.
    (store.bundles_dir.parent / "secret.efb").write_bytes(b"x")
    (store.bundles_dir / ("A" * 64 + ".efb")).write_bytes(b"x")
    (store.bundles_dir / ("0" * 64 + ".efb.efb")).write_bytes(b"x")
    (store.bundles_dir / ("0" * 64 + ".efb")).write_bytes(b"x")
    with sqlite_database.session() as session:
        assert store.open_blob(session, name) is None


def test_is_sha256() -> None:
    assert is_sha256("ab" * 32)
    assert not is_sha256("AB" * 32) and not is_sha256("ab" * 32 + "\n")


def test_uploads_are_unique_and_stale_ones_are_removed(store: BundleStore) -> None:
    paths = {store.new_upload_path() for _ in range(50)}
    assert len(paths) == 50 and all(p.parent == store.uploads_dir and p.exists() for p in paths)
    old = sorted(paths)[:10]
    hour_ago = time.time() - 7200
    for path in old:
        os.utime(path, (hour_ago, hour_ago))
    assert store.remove_stale_uploads(dt.timedelta(hours=1)) == 10
    assert {p for p in paths if p.exists()} == paths - set(old)
