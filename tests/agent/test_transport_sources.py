"""Trying a directive's sources in order (SourcesFetcher), and what counts as misuse."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgefleet.agent.errors import CompatibilityError
from edgefleet.agent.transport import SourcesFetcher
from edgefleet.errors import TamperedFileError, UsageError
from edgefleet.mqtt.directives import BundleRef, HttpSource, MqttBlocksSource, Source
from tests.agent.test_transport_http import LENGTH, FileServer, fetcher, make_directive

BUNDLE_STUB = BundleRef(name="demo", version="1.2.3", sha256="0" * 64, length=1)


@pytest.fixture
def content() -> bytes:
    return os.urandom(LENGTH)


@pytest.fixture
def server(tmp_path: Path, content: bytes) -> Iterator[FileServer]:
    path = tmp_path / "served.efb"
    path.write_bytes(content)
    server = FileServer(path)
    yield server
    server.close()


@pytest.fixture
def destination(tmp_path: Path) -> Path:
    (tmp_path / "downloads").mkdir()
    return tmp_path / "downloads" / "bundle"


def test_sources_tried_in_order_until_one_delivers(
    tmp_path: Path, server: FileServer, destination: Path, content: bytes
) -> None:
    other = tmp_path / "other.efb"
    other.write_bytes(os.urandom(LENGTH))
    bad_mirror = FileServer(other)
    try:
        sources: list[Source] = [
            MqttBlocksSource(block_size=65536),  # no block fetcher configured: skipped
            HttpSource(url=bad_mirror.url),
            HttpSource(url=server.url),
        ]
        SourcesFetcher(http=fetcher()).fetch(make_directive(content, sources), destination)
    finally:
        bad_mirror.close()
    assert destination.read_bytes() == content


def test_sources_fetcher_refuses_when_every_source_is_tampered(
    tmp_path: Path, destination: Path, content: bytes
) -> None:
    other = tmp_path / "other.efb"
    other.write_bytes(os.urandom(LENGTH))
    bad_mirror = FileServer(other)
    try:
        directive = make_directive(content, [HttpSource(url=bad_mirror.url)])
        with pytest.raises(TamperedFileError):
            SourcesFetcher(http=fetcher()).fetch(directive, destination)
    finally:
        bad_mirror.close()


def test_no_usable_source_is_incompatible_and_rollback_is_misuse(
    server: FileServer, destination: Path, content: bytes
) -> None:
    only_blocks = make_directive(content, [MqttBlocksSource(block_size=65536)])
    with pytest.raises(CompatibilityError, match="mqtt-blocks"):
        fetcher().fetch(only_blocks, destination)
    with pytest.raises(CompatibilityError):
        SourcesFetcher(http=fetcher()).fetch(only_blocks, destination)
    rollback = make_directive(content, [HttpSource(url=server.url)]).model_copy(
        update={"action": "rollback", "bundle": None, "sources": []}
    )
    with pytest.raises(UsageError):
        fetcher().fetch(rollback, destination)
    with pytest.raises(UsageError):
        fetcher().fetch_from(MqttBlocksSource(block_size=65536), BUNDLE_STUB, destination)
