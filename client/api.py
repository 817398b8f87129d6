"""`ApiClient`: the fleet server's HTTP API (`edgefleet.wire`) as Python calls, over httpx.

Every answer is the server's JSON as plain dicts and lists: the client does
not import the server's schemas (they live beside FastAPI, which a laptop
running `edgefleet rollout status` need not have). Errors are translated where
they cross into our code (`errors.py`): an error answer raises the server's own
error class with its message; a connection failure raises
ServerUnreachableError naming the URL and how to point the CLI elsewhere.
Nothing here reads the environment: the CLI passes --server/--token in.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, cast
from urllib.parse import quote

import httpx

from edgefleet.client.errors import (
    ServerResponseError,
    ServerUnreachableError,
    error_from_response,
)
from edgefleet.errors import UsageError
from edgefleet.wire import API_PREFIX, AuthError

DEFAULT_SERVER = "http://127.0.0.1:8080"
UPLOAD_CHUNK = 256 * 1024
# Reading an answer: a push waits while the server verifies the whole bundle.
READ_TIMEOUT_S = 60.0
PUSH_READ_TIMEOUT_S = 600.0

JsonObject = dict[str, Any]


class ApiClient:
    """A session with one fleet server, authenticated by an API token (or none).

    Use as a context manager, or call `close()`.
    """

    def __init__(
        self,
        base_url: str,
        token: str | None = None,
        *,
        timeout: float = READ_TIMEOUT_S,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        """Raises: UsageError when `base_url` is not an http(s) URL."""
        root = base_url.rstrip("/").removesuffix(API_PREFIX)
        if not root.startswith(("http://", "https://")):
            raise UsageError(f"server URL {base_url!r} must start with http:// or https://")
        self.base_url = root
        self.has_token = bool(token)
        headers = {"Accept": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self._http = httpx.Client(
            base_url=root + API_PREFIX,
            headers=headers,
            timeout=httpx.Timeout(timeout, connect=10.0),
            transport=transport,
        )

    def __enter__(self) -> ApiClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # -- transport ---------------------------------------------------------------------------

    def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | list[tuple[str, Any]] | None = None,
        json_body: Any = None,
        content: Iterator[bytes] | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> httpx.Response:
        """One request to `path` under the API prefix; returns a successful (< 400) response.

        Raises:
            ServerError (or a core UntrustedInputError): the server's error, with its message.
            ServerUnreachableError: no connection, or no answer in time.
        """
        extra: dict[str, Any] = {}
        if timeout is not None:
            extra["timeout"] = httpx.Timeout(timeout, connect=10.0)
        try:
            response = self._http.request(
                method,
                path,
                params=params,
                json=json_body,
                content=content,
                headers=headers,
                **extra,
            )
        except httpx.TimeoutException as exc:
            raise ServerUnreachableError(
                f"the server at {self.base_url} did not answer in time ({exc.__class__.__name__})"
            ) from exc
        except (httpx.ConnectError, httpx.UnsupportedProtocol) as exc:
            raise ServerUnreachableError(
                f"cannot reach the server at {self.base_url}: {exc or exc.__class__.__name__} "
                "(is `edgefleet server run` running? set --server or EDGEFLEET_SERVER)"
            ) from exc
        except httpx.TransportError as exc:
            raise ServerUnreachableError(
                f"lost the connection to the server at {self.base_url}: "
                f"{exc or exc.__class__.__name__}"
            ) from exc
        if response.status_code >= 400:
            error = error_from_response(
                response.status_code,
                response.content,
                url=str(response.request.url),
                retry_after=response.headers.get("Retry-After"),
            )
            if isinstance(error, AuthError) and response.status_code == 401 and not self.has_token:
                error = type(error)(
                    f"{error} (no API token given: set --token or EDGEFLEET_TOKEN; an admin "
                    "creates one with `edgefleet server token create`)"
                )
            raise error
        return response

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        return self._decode(self.request(method, path, **kwargs))

    def _decode(self, response: httpx.Response) -> Any:
        try:
            return response.json()
        except ValueError as exc:
            raise ServerResponseError(
                f"the answer of {response.request.url} is not JSON: is {self.base_url} an "
                "edgefleet server?",
                response.status_code,
            ) from exc

    def _object(self, method: str, path: str, **kwargs: Any) -> JsonObject:
        return cast(JsonObject, self._json(method, path, **kwargs))

    def _items(self, path: str, **kwargs: Any) -> list[JsonObject]:
        # List endpoints answer either a bare list or {"items": [...], ...}.
        value = self._json("GET", path, **kwargs)
        if isinstance(value, dict):
            value = value.get("items", [])
        return cast(list[JsonObject], value)

    # -- health --------------------------------------------------------------------------------

    def health(self) -> JsonObject:
        return self._object("GET", "/health")

    # -- bundles -------------------------------------------------------------------------------

    def push_bundle(
        self, path: Path, progress: Callable[[int], None] | None = None
    ) -> tuple[JsonObject, bool]:
        """Upload a bundle file, streamed; returns (the stored bundle, whether it was new).

        The server verifies the bundle's signature against its trust root before
        it stores anything; pushing the identical file again is not an error.

        Raises:
            OSError: the file cannot be read.
            BundleExistsError: another bundle is stored under that name and version.
            A core BundleError / SignatureError: the server refused the bundle.
            ServerUnreachableError, ServerError: as `request`.
        """
        length = path.stat().st_size

        def chunks() -> Iterator[bytes]:
            with path.open("rb") as handle:
                while chunk := handle.read(UPLOAD_CHUNK):
                    if progress is not None:
                        progress(len(chunk))
                    yield chunk

        response = self.request(
            "POST",
            "/bundles",
            content=chunks(),
            # An explicit length: no chunked encoding, the server can refuse an
            # oversized upload before reading it.
            headers={"Content-Type": "application/octet-stream", "Content-Length": str(length)},
            timeout=PUSH_READ_TIMEOUT_S,
        )
        return cast(JsonObject, self._decode(response)), response.status_code == 201

    def push_trust_root(self, document: bytes) -> JsonObject:
        """Hand the server trust root version N+1 (admin); it checks it as a device would.

        Raises:
            A core TrustRootError / MalformedDocumentError: the server refused it.
            ServerUnreachableError, ServerError: as `request`.
        """
        return self._object(
            "POST", "/trust", content=iter([document]), headers={"Content-Type": "application/json"}
        )

    def get_trust_root(self) -> JsonObject:
        """The newest trust root version the server holds, and its expiry."""
        return self._object("GET", "/trust")

    def list_bundles(self, name: str | None = None) -> list[JsonObject]:
        return self._items("/bundles", params={"name": name} if name else None)

    def get_bundle(self, name: str, version: str) -> JsonObject:
        return self._object("GET", f"/bundles/{_seg(name)}/{_seg(version)}")

    def get_accuracy(
        self, name: str, version: str, *, device: str | None = None, hours: int = 24
    ) -> JsonObject:
        """Labelled accuracy of a bundle version over the last `hours`, per device."""
        params: dict[str, Any] = {"bundle": name, "version": version, "hours": hours}
        if device:
            params["device"] = device
        return self._object("GET", "/accuracy", params=params)

    # -- devices -------------------------------------------------------------------------------

    def list_devices(
        self,
        *,
        online: bool | None = None,
        tags: Mapping[str, str] | None = None,
        model: str | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> JsonObject:
        """{"items": [device, ...], "total": n} for the devices that match."""
        params: list[tuple[str, Any]] = [("limit", limit), ("offset", offset)]
        if online is not None:
            params.append(("online", "true" if online else "false"))
        params.extend(("tag", f"{key}={value}") for key, value in (tags or {}).items())
        if model:
            params.append(("model", model))
        return self._object("GET", "/devices", params=params)

    def get_device(self, device_id: str) -> JsonObject:
        return self._object("GET", f"/devices/{_seg(device_id)}")

    def remove_device(self, device_id: str) -> None:
        """Remove an enrolled device (operator role; 404 unknown, 409 in an active rollout)."""
        self.request("DELETE", f"/devices/{_seg(device_id)}")

    def request_diagnostics(self, device_id: str) -> JsonObject:
        """Ask a device for its log lines and status (operator role); the request row."""
        return self._object("POST", f"/devices/{_seg(device_id)}/diagnostics")

    def list_diagnostics(self, device_id: str, limit: int = 5) -> list[JsonObject]:
        """The device's most recent diagnostics requests with their answers, newest first."""
        return self._items(f"/devices/{_seg(device_id)}/diagnostics", params={"limit": limit})

    def create_enroll_token(
        self, tags: Mapping[str, str], ttl_s: int, max_uses: int = 1
    ) -> JsonObject:
        return self._object(
            "POST",
            "/enroll-tokens",
            json_body={"tags": dict(tags), "ttl_s": ttl_s, "max_uses": max_uses},
        )

    # -- rollouts ------------------------------------------------------------------------------

    def start_rollout(self, bundle: str, select: str | None, plan: Any) -> JsonObject:
        """Start rolling `bundle` ("name@version") out to the devices `select` matches."""
        body = {"bundle": bundle, "select": select or "", "plan": plan}
        return self._object("POST", "/rollouts", json_body=body)

    def list_rollouts(self, state: str | None = None) -> list[JsonObject]:
        return self._items("/rollouts", params={"state": state} if state else None)

    def rollout_status(self, rollout_id: int) -> JsonObject:
        return self._object("GET", f"/rollouts/{rollout_id}")

    def rollout_action(self, rollout_id: int, action: str, reason: str | None) -> JsonObject:
        """`action` is pause, resume or abort."""
        body = {"reason": reason} if reason else {}
        return self._object("POST", f"/rollouts/{rollout_id}/{action}", json_body=body)

    # -- alerts --------------------------------------------------------------------------------

    def list_alerts(
        self,
        *,
        device: str | None = None,
        cohort: str | None = None,
        kind: str | None = None,
        open_only: bool = False,
        limit: int = 100,
        offset: int = 0,
    ) -> tuple[list[JsonObject], int | None]:
        """A page of alerts, newest first (of one device, one cohort, one kind), and how
        many match over every page (None from a server that does not say)."""
        params: dict[str, Any] = {"limit": limit, "offset": offset}
        for name, value in (("device", device), ("cohort", cohort), ("kind", kind)):
            if value:
                params[name] = value
        if open_only:
            params["open"] = "true"
        response = self.request("GET", "/alerts", params=params)
        rows = self._decode(response)
        if isinstance(rows, dict):
            rows = rows.get("items", [])
        total = response.headers.get("X-Total-Count")
        return cast(list[JsonObject], rows), int(total) if total and total.isdigit() else None

    def ack_alert(self, alert_id: int) -> JsonObject:
        """Acknowledge an alert (operator role; 404 when there is no such alert)."""
        return self._object("POST", f"/alerts/{alert_id}/ack")

    # -- webhooks ------------------------------------------------------------------------------

    def list_webhook_deliveries(
        self, *, failed: bool = False, limit: int = 100
    ) -> list[JsonObject]:
        """Alert events not delivered to the webhook yet (only given-up ones: `failed`)."""
        params: dict[str, Any] = {"limit": limit}
        if failed:
            params["failed"] = "true"
        return self._items("/webhooks/deliveries", params=params)

    def retry_webhook_delivery(self, delivery_id: int) -> JsonObject:
        """Send an undelivered event again (operator role; 404 none, 409 delivered)."""
        return self._object("POST", f"/webhooks/deliveries/{delivery_id}/retry")

    # -- dead letters --------------------------------------------------------------------------

    def list_dead_letters(self, *, device: str | None = None, limit: int = 100) -> list[JsonObject]:
        """What the database refused of a device, set aside by ingestion, newest first."""
        params: dict[str, Any] = {"limit": limit}
        if device:
            params["device"] = device
        return self._items("/dead-letters", params=params)

    def get_dead_letter(self, letter_id: int) -> JsonObject:
        """One dead letter with its messages (operator role; 404 when there is none)."""
        return self._object("GET", f"/dead-letters/{letter_id}")

    def replay_dead_letter(self, letter_id: int) -> JsonObject:
        """Take a dead letter's messages again and write them (operator role; 404, 409)."""
        return self._object("POST", f"/dead-letters/{letter_id}/replay")

    def discard_dead_letter(self, letter_id: int) -> None:
        """Delete a dead letter: its messages are not stored (operator role; 404)."""
        self.request("DELETE", f"/dead-letters/{letter_id}")

    # -- samples -------------------------------------------------------------------------------

    def list_samples(self, *, device: str | None = None, limit: int = 100) -> list[JsonObject]:
        """Raw inputs devices uploaded, newest first (metadata only)."""
        params: dict[str, Any] = {"limit": limit}
        if device:
            params["device"] = device
        return self._items("/samples", params=params)

    def get_sample_file(self, sample_id: int) -> bytes:
        """The .npz of uploaded raw inputs (operator role; the server audits the download)."""
        return self.request("GET", f"/samples/{sample_id}").content


def _seg(value: str) -> str:
    """One path segment: a name with a slash must not reach another route."""
    return quote(value, safe="")


__all__ = ["DEFAULT_SERVER", "ApiClient", "JsonObject"]
