"""Uploading the reservoir's files to the fleet server, where the configuration allows it.

Only with `[drift] upload_inputs = true`, a server_url, a device key and an
enrollment: `SampleUploader` (an `edgefleet.worker.Worker` step) sends every
finished episode file in `samples/` (`edgefleet.agent.reservoir`), oldest
first, as `edgefleet.samplewire` describes, signed with the device key. A 2xx
answer deletes the file; any failure (no answer, a refusal) keeps it and waits
before the next attempt (`edgefleet.backoff`, up to an hour), so a server that
is away loses nothing. The episode still being written is never sent.

Standard library only (urllib), as enrollment.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import asdict
from http.client import HTTPException
from pathlib import Path

from edgefleet.agent.reservoir import delete_episode, episode_files, read_meta
from edgefleet.agent.tlsidentity import describe_unreachable, https_opener
from edgefleet.backoff import Backoff
from edgefleet.mqtt.devicesig import DeviceKey
from edgefleet.samplewire import (
    META_HEADER,
    SIGNATURE_HEADER,
    SampleUpload,
    samples_path,
    sign_upload,
)
from edgefleet.timefmt import format_time, utcnow

log = logging.getLogger(__name__)

UPLOAD_BACKOFF = Backoff(initial=30.0, maximum=3600.0)
UPLOAD_POLL_SECONDS = 30.0
TIMEOUT_SECONDS = 60.0


class UploadError(Exception):
    """The server did not take the file (no answer, or an error status)."""


def upload_file(
    server_url: str,
    device_id: str,
    key: DeviceKey,
    path: Path,
    context: ssl.SSLContext | None = None,
) -> None:
    """Send one episode file, over HTTPS trusting `context` (None: the system's CAs).

    Raises:
        UploadError: no answer, or an answer other than 2xx.
        OSError, ValueError, TypeError: the file or its .json cannot be read.
    """
    body = path.read_bytes()
    meta = SampleUpload(
        device_id=device_id,
        sent_at=format_time(utcnow()),
        sha256=hashlib.sha256(body).hexdigest(),
        size_bytes=len(body),
        **asdict(read_meta(path)),
    )
    meta_bytes = json.dumps(meta.model_dump(), separators=(",", ":")).encode()
    post_signed(
        server_url,
        samples_path(device_id),
        body,
        "application/octet-stream",
        meta_bytes.decode(),
        sign_upload(meta_bytes, device_id, key),
        context,
    )


def post_signed(
    server_url: str,
    path: str,
    body: bytes,
    content_type: str,
    meta: str,
    signature: str,
    context: ssl.SSLContext | None,
) -> None:
    """POST a device-signed upload (`edgefleet.samplewire`'s headers) to `server_url + path`.

    Raises:
        UploadError: no answer, or an answer other than 2xx (named).
    """
    request = urllib.request.Request(
        server_url + path,
        data=body,
        method="POST",
        headers={"Content-Type": content_type, META_HEADER: meta, SIGNATURE_HEADER: signature},
    )
    try:
        with https_opener(context).open(request, timeout=TIMEOUT_SECONDS) as response:
            response.read(4096)
    except urllib.error.HTTPError as exc:
        detail = exc.read(1024).decode("utf-8", "replace").strip()
        raise UploadError(f"the fleet server answered {exc.code}: {detail}") from exc
    except (urllib.error.URLError, HTTPException, OSError) as exc:
        raise UploadError(describe_unreachable(server_url, exc)) from exc


class SampleUploader:
    """One `step` per worker interval: uploads what is due; see the module docstring."""

    def __init__(
        self,
        server_url: str,
        device_id: str,
        key: DeviceKey,
        directory: Path,
        *,
        current_file: Callable[[], Path | None],
        is_enrolled: Callable[[], bool],
        ssl_context: ssl.SSLContext | None = None,
        backoff: Backoff = UPLOAD_BACKOFF,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.server_url = server_url
        self.device_id = device_id
        self.key = key
        self.directory = directory
        self.current_file = current_file
        self.is_enrolled = is_enrolled
        self.ssl_context = ssl_context
        self.backoff = backoff
        self.failures = 0
        self._rng = rng or random.Random()
        self._clock = clock
        self._next_attempt = 0.0

    def step(self) -> None:
        if self._clock() < self._next_attempt or not self.is_enrolled():
            return
        files = episode_files(self.directory)
        running = self.current_file()
        for path in files:
            if path == running:
                continue
            try:
                upload_file(self.server_url, self.device_id, self.key, path, self.ssl_context)
            except (UploadError, OSError, ValueError, TypeError) as exc:
                delay = self.backoff.delay(self.failures, self._rng)
                self.failures += 1
                self._next_attempt = self._clock() + delay
                log.warning("raw inputs %s not uploaded: %s; next try in %.0f s", path, exc, delay)
                return
            self.failures = 0
            delete_episode(path)
            log.info("raw inputs %s uploaded to %s and deleted here", path.name, self.server_url)
