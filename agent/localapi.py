"""The agent's local HTTP API, for applications on the device (localhost only).

    GET  /v1/health           {"status": ok | no-model | degraded, "detail", "model",
                              "install_state", "drift", "link"}
    GET  /v1/model            what is served: versions, fallback chain, breakers
    POST /v1/predict          {"inputs": {name: nested list}}
                              -> {"outputs", "answered_by", "model", "latency_ms"}
    POST /v1/predict/batch    an .npz of inputs (samples first) -> an .npz of outputs
    POST /v1/feedback         {"predicted": p, "label": l}: labelled accuracy (or error, for floats)
    POST /v1/install          the bundle's bytes (application/octet-stream): `agent install`
                              while the agent runs
    POST /v1/rollback         `agent rollback` while the agent runs

Install and rollback change the device, so they need authentication; the
other calls stay open (and do no extra work for it). The API listens twice:
on TCP (`[local_api] host`/`port`) and on the Unix socket STATE_DIR/api.sock
(mode 0600, in the 0700 state directory: only the agent's user and root get
in). A change on the socket is authenticated by those file permissions; on
TCP it needs `Authorization: Bearer TOKEN`, TOKEN being the secret the agent
writes at each start to STATE_DIR/api-token (mode 0600: reading it takes the
same rights as the socket). Without it: 401 `unauthorized`, before the body
is read. An install's body is streamed to a 0600 file in downloads/ (at most
`[limits] max_bundle_bytes`) and installed from there; the agent never opens
a path a caller names.

Predictions through this API are served and monitored exactly like in-process
ones. Errors are JSON {"error", "code"} with 400 (bad input: a bad or negative
Content-Length, a body shorter than announced, JSON nested too deep, a body
that is not an .npz), 401 (a change without the token), 409 (an install is
running), 413 (a batch above `max_batch_samples`, a body above 64 MiB, an
.npz whose arrays would decompress beyond 64 MiB, a bundle above
`max_bundle_bytes`), 415 (an install that is not application/octet-stream),
422 (a refused bundle), or 503 (nothing to serve); never a traceback.

Programs on the device call it; web pages in a browser on the device must not
be able to (a page from anywhere could otherwise roll the model back). So a
request is refused, before anything else is read, when it carries an `Origin`
header (403 `cross-origin`: browsers send one with every cross-site request),
when its `Host` is not this machine (403 `bad-host`: a page whose name was
made to point at 127.0.0.1, DNS rebinding; any host is taken when the API
listens on every address), or when it is a POST with a Content-Type an HTML
form can send without asking (415 `form-content-type`:
application/x-www-form-urlencoded, multipart/form-data, text/plain). These
checks apply on the Unix socket too.
Standard library only: a device needs no web framework.
"""

from __future__ import annotations

import hmac
import io
import json
import logging
import math
import os
import secrets
import socket
import socketserver
import sys
import threading
import zipfile
import zlib
from collections.abc import Callable
from email.message import Message
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import numpy.lib.format as npy_format

from edgefleet.agent.errors import (
    BatchTooLargeError,
    ConfigError,
    InferenceError,
    InputSchemaError,
    InstallInProgressError,
    NoModelError,
    RollbackError,
)
from edgefleet.agent.inference import Predictor
from edgefleet.agent.install.handlers import LOCAL_COPY
from edgefleet.agent.layout import PRIVATE_FILE
from edgefleet.errors import EdgefleetError, LocalError, UntrustedInputError
from edgefleet.fileio import atomic_write_bytes
from edgefleet.wire import error_code

log = logging.getLogger(__name__)
MAX_BODY_BYTES = 64 * 1024 * 1024
MAX_NPZ_ARRAY_BYTES = MAX_BODY_BYTES  # all arrays of one .npz, decompressed
NPZ = "application/x-npz"
BUNDLE = "application/octet-stream"
CHANGES = frozenset({"/v1/install", "/v1/rollback"})  # what needs authentication
UPLOAD_CHUNK_BYTES = 1024 * 1024
REQUEST_TIMEOUT_SECONDS = 30  # a client that stops sending mid-request is dropped


class ApiError(Exception):
    def __init__(self, status: HTTPStatus, message: str, code: str) -> None:
        super().__init__(message)
        self.status, self.code = status, code


def _status_for(exc: EdgefleetError) -> HTTPStatus:
    if isinstance(exc, BatchTooLargeError):
        return HTTPStatus.REQUEST_ENTITY_TOO_LARGE
    if isinstance(exc, (InputSchemaError, LocalError)):
        return HTTPStatus.BAD_REQUEST
    if isinstance(exc, InstallInProgressError):
        return HTTPStatus.CONFLICT
    if isinstance(exc, (NoModelError, InferenceError)):
        return HTTPStatus.SERVICE_UNAVAILABLE
    if isinstance(exc, (UntrustedInputError, RollbackError)):
        return HTTPStatus.UNPROCESSABLE_ENTITY
    return HTTPStatus.INTERNAL_SERVER_ERROR


def _jsonable(outputs: dict[str, np.ndarray]) -> dict[str, Any]:
    return {name: value.tolist() for name, value in outputs.items()}


LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
# What an HTML form on any web page can POST without the browser asking first (CORS).
FORM_CONTENT_TYPES = frozenset(
    {"application/x-www-form-urlencoded", "multipart/form-data", "text/plain"}
)


def _host_name(host_header: str) -> str:
    """The name in a Host header, without its port ("[::1]:8765" -> "::1")."""
    if host_header.startswith("["):
        return host_header[1:].split("]", 1)[0]
    return host_header.rsplit(":", 1)[0] if host_header.count(":") == 1 else host_header


def refuse_browsers(headers: Message, listen_host: str) -> None:
    """Refuse what a web page in a browser on the device could send (module docstring).

    Raises:
        ApiError: 403 `cross-origin` (an Origin header), 403 `bad-host` (a Host that is not
            this machine: DNS rebinding), 415 `form-content-type`.
    """
    if headers.get("Origin") is not None:
        raise ApiError(
            HTTPStatus.FORBIDDEN,
            "requests from web pages are refused: call the agent from a program on the device",
            "cross-origin",
        )
    host = _host_name(headers.get("Host", "").strip()).lower()
    wildcard = listen_host in ("0.0.0.0", "::")
    if host and not wildcard and host not in LOOPBACK_NAMES and host != listen_host:
        raise ApiError(
            HTTPStatus.FORBIDDEN,
            f"Host {host!r} is not this machine: address the agent as 127.0.0.1 or localhost",
            "bad-host",
        )
    kind = headers.get("Content-Type", "").split(";", 1)[0].strip().lower()
    if kind in FORM_CONTENT_TYPES:
        raise ApiError(
            HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
            f"Content-Type {kind} is refused: send application/json (or {NPZ} for a batch)",
            "form-content-type",
        )


def listen(host: str, port: int) -> socket.socket:
    """A socket listening on `host`:`port` (0: a free port) for the local API.

    Raises:
        ConfigError: the port is taken (another agent?) or the address is not this
            machine's; the message names the port and the setting to change.
    """
    try:
        return socket.create_server((host, port))
    except OSError as exc:
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        raise ConfigError(
            f"the local API cannot listen on {host}:{port}: {reason}; set "
            "[local_api] port in agent.toml to a free port (`edgefleet agent init "
            "--local-api-port N`), or [local_api] enabled = false to run without it"
        ) from None


def listen_unix(path: Path) -> socket.socket:
    """A Unix socket listening at `path` (mode 0600; a stale one from an agent that
    crashed is replaced) for the local API's authenticated side.

    Raises:
        ConfigError: the socket cannot be made there (a path too long, a file system
            without sockets); the message names the path.
    """
    path.unlink(missing_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(str(path))
        path.chmod(PRIVATE_FILE)
        listener.listen()
    except OSError as exc:
        listener.close()
        raise ConfigError(
            f"the local API cannot listen on the Unix socket {path}: {exc.strerror or exc}; "
            "give the agent a shorter state_dir in agent.toml, or "
            "[local_api] enabled = false to run without the API"
        ) from None
    return listener


def issue_token(path: Path) -> str:
    """A fresh secret for `Authorization: Bearer` on TCP, written to `path` (mode 0600):
    the agent makes one at each start."""
    token = secrets.token_urlsafe(32)
    atomic_write_bytes(path, token.encode(), PRIVATE_FILE)
    return token


class LocalApi:
    """Serves the API on background threads; `install` and `rollback` are the agent's.

    `install` takes the path of a bundle this API wrote in `uploads` (downloads/);
    `token` is the secret a TCP caller must present for a change (module docstring).
    """

    def __init__(
        self,
        predictor: Predictor,
        host: str,
        port: int,
        *,
        install: Callable[[Path], dict[str, Any]],
        rollback: Callable[[], dict[str, Any]],
        install_state: Callable[[], str],
        token: str,
        uploads: Path,
        max_bundle_bytes: int,
        drift: Callable[[], str] | None = None,
        link: Callable[[], str] | None = None,
        listener: socket.socket | None = None,
        unix_listener: socket.socket | None = None,
    ) -> None:
        """`listener`: a socket from `listen` (the runner binds before it resumes an install);
        none: listen on `host`:`port` now. `unix_listener`: one from `listen_unix`; none:
        TCP only (changes then need the token).

        Raises:
            ConfigError: the address cannot be listened on (see `listen`).
        """
        self.predictor = predictor
        self.install, self.rollback, self.install_state = install, rollback, install_state
        self.drift = drift  # the device's own drift check: "ok", "drift on ...", "insufficient"
        self.link = link  # the MQTT link in words: "connected", "not connected: why"
        self.uploads, self.max_bundle_bytes = uploads, max_bundle_bytes
        self._bearer = f"Bearer {token}".encode()
        api = self

        class Handler(BaseHTTPRequestHandler):
            server_version = "edgefleet-agent"
            timeout = REQUEST_TIMEOUT_SECONDS
            authenticated = False  # a change needs the token (TCP)

            def do_GET(self) -> None:
                self._answer(lambda: api.get(self.path), guarded=True)

            def do_POST(self) -> None:
                upload: Path | None = None
                try:
                    refuse_browsers(self.headers, api.listen_host)
                    if self.path in CHANGES and not self.authenticated:
                        api.authenticate(self.headers)
                    if self.path == "/v1/install":
                        upload = self._receive_bundle()
                        body = b""
                    else:
                        body = self._read_body()
                except ApiError as exc:
                    self.close_connection = True  # what is left of the body is not read
                    self._send(exc.status, {"error": str(exc), "code": exc.code})
                    return
                if upload is not None:
                    self._answer(lambda: (HTTPStatus.OK, api.install_upload(upload)))
                    return
                content_type = self.headers.get("Content-Type", "")
                self._answer(lambda: api.post(self.path, body, content_type))

            def _length(self, limit: int) -> int:
                announced = self.headers.get("Content-Length") or "0"
                if not announced.isdigit():  # digits only: no sign, no spaces
                    raise ApiError(
                        HTTPStatus.BAD_REQUEST,
                        f"Content-Length {announced!r} is not a number of bytes",
                        "bad-length",
                    )
                length = int(announced)
                if length > limit:
                    raise ApiError(
                        HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                        f"the body is {length} bytes, more than the {limit} allowed",
                        "too-large",
                    )
                return length

            def _read_body(self) -> bytes:
                length = self._length(MAX_BODY_BYTES)
                body = self.rfile.read(length)
                if len(body) < length:
                    raise _short_body(len(body), length)
                return body

            def _receive_bundle(self) -> Path:
                """The install's body, streamed to a new 0600 file in downloads/."""
                kind = self.headers.get("Content-Type", "").split(";", 1)[0].strip().lower()
                if kind != BUNDLE:
                    raise ApiError(
                        HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                        f"send the bundle file's bytes as {BUNDLE}, not {kind or 'no type'}",
                        "bad-content-type",
                    )
                length = self._length(api.max_bundle_bytes)
                if length == 0:
                    raise ApiError(
                        HTTPStatus.BAD_REQUEST, "the body holds no bundle", "bad-request"
                    )
                path = api.uploads / f"{LOCAL_COPY}.upload-{secrets.token_hex(8)}"
                received = 0
                try:
                    with open(
                        os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE), "wb"
                    ) as file:
                        while received < length:
                            chunk = self.rfile.read(min(UPLOAD_CHUNK_BYTES, length - received))
                            if not chunk:
                                raise _short_body(received, length)
                            file.write(chunk)
                            received += len(chunk)
                except BaseException:
                    path.unlink(missing_ok=True)
                    raise
                return path

            def _answer(
                self, work: Callable[[], tuple[HTTPStatus, Any]], guarded: bool = False
            ) -> None:
                try:
                    if guarded:
                        refuse_browsers(self.headers, api.listen_host)
                    status, payload = work()
                except ApiError as exc:
                    status, payload = exc.status, {"error": str(exc), "code": exc.code}
                except EdgefleetError as exc:
                    status, payload = _status_for(exc), {"error": str(exc), "code": error_code(exc)}
                except Exception as exc:  # the app must get an answer, and the agent live on
                    log.exception("local API request failed")
                    status = HTTPStatus.INTERNAL_SERVER_ERROR
                    payload = {"error": f"{type(exc).__name__}: {exc}", "code": "internal"}
                self._send(status, payload)

            def _send(self, status: HTTPStatus, payload: Any) -> None:
                if isinstance(payload, bytes):
                    body, content_type = payload, NPZ
                else:
                    body, content_type = json.dumps(payload).encode(), "application/json"
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                log.debug("local API: " + format, *args)

        class SocketHandler(Handler):
            authenticated = True  # only the agent's user and root can connect

        listener = listener or listen(host, port)
        self.listen_host = str(listener.getsockname()[0])
        self._servers: list[socketserver.TCPServer] = [_serve_on(listener, Handler)]
        if unix_listener is not None:
            self._servers.append(_serve_on(unix_listener, SocketHandler))
        self._threads = [
            threading.Thread(target=server.serve_forever, daemon=True, name="edgefleet-local-api")
            for server in self._servers
        ]

    def install_upload(self, upload: Path) -> dict[str, Any]:
        """Install a bundle this API received, and remove the received file before the
        answer goes out (a caller that has the answer finds it gone)."""
        try:
            return self.install(upload)
        finally:
            upload.unlink(missing_ok=True)

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._servers[0].socket.getsockname()[:2]
        return str(host), int(port)

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()

    def authenticate(self, headers: Message) -> None:
        """Refuse a change over TCP without this start's token (compared in constant time).

        Raises:
            ApiError: 401 `unauthorized`.
        """
        presented = headers.get("Authorization", "").encode("utf-8", "surrogateescape")
        if not hmac.compare_digest(presented, self._bearer):
            raise ApiError(
                HTTPStatus.UNAUTHORIZED,
                "installs and rollbacks need the agent's token (Authorization: Bearer, from "
                "api-token in its state directory) or its Unix socket: run `edgefleet agent "
                "install` or `agent rollback` as root or as the agent's user",
                "unauthorized",
            )

    # --- routes ----------------------------------------------------------------------------

    def get(self, path: str) -> tuple[HTTPStatus, Any]:
        if path == "/v1/health":
            info = self.predictor.model_info()
            model = f"{info.current.name}@{info.current.version}" if info.current else None
            status, detail = info.health()
            return HTTPStatus.OK, {
                "status": status,
                "detail": detail,
                "model": model,
                "install_state": self.install_state(),
                "drift": self.drift() if self.drift is not None else None,
                "link": self.link() if self.link is not None else None,
            }
        if path == "/v1/model":
            return HTTPStatus.OK, self.predictor.model_info().as_dict()
        raise ApiError(HTTPStatus.NOT_FOUND, f"no such endpoint: GET {path}", "not-found")

    def post(self, path: str, body: bytes, content_type: str) -> tuple[HTTPStatus, Any]:
        if path == "/v1/predict/batch":
            return HTTPStatus.OK, self._predict_npz(body)
        if path == "/v1/rollback":
            return HTTPStatus.OK, self.rollback()
        payload = _json(body)
        if path == "/v1/predict":
            return HTTPStatus.OK, self._predict_json(payload)
        if path == "/v1/feedback":
            return HTTPStatus.OK, self._feedback(payload)
        raise ApiError(HTTPStatus.NOT_FOUND, f"no such endpoint: POST {path}", "not-found")

    def _predict_json(self, payload: dict[str, Any]) -> dict[str, Any]:
        inputs = payload.get("inputs")
        if not isinstance(inputs, dict) or not inputs:
            raise ApiError(
                HTTPStatus.BAD_REQUEST, 'expected {"inputs": {name: values}}', "bad-request"
            )
        try:
            arrays = {str(name): np.asarray(value) for name, value in inputs.items()}
        except (ValueError, TypeError) as exc:
            raise ApiError(
                HTTPStatus.BAD_REQUEST, f"inputs are not arrays: {exc}", "bad-request"
            ) from exc
        prediction = self.predictor.predict(arrays)
        return {
            "outputs": _jsonable(prediction.outputs),
            "answered_by": prediction.step,
            "model": prediction.model,
            "latency_ms": round(prediction.latency_ms, 3),
        }

    def _predict_npz(self, body: bytes) -> bytes:
        prediction = self.predictor.predict(_load_npz(body))
        out = io.BytesIO()
        np.savez(out, **prediction.outputs)  # type: ignore[arg-type]
        return out.getvalue()

    def _feedback(self, payload: dict[str, Any]) -> dict[str, Any]:
        if "predicted" not in payload or "label" not in payload:
            raise ApiError(
                HTTPStatus.BAD_REQUEST, 'expected {"predicted": p, "label": l}', "bad-request"
            )
        predicted, label = payload["predicted"], payload["label"]
        telemetry = self.predictor.telemetry
        if telemetry is None:
            return {"recorded": False}
        if isinstance(label, int) and isinstance(predicted, int):
            telemetry.record_label(correct=predicted == label)
        elif isinstance(label, (int, float)) and isinstance(predicted, (int, float)):
            telemetry.record_label(error=abs(float(predicted) - float(label)))
        else:
            raise ApiError(
                HTTPStatus.BAD_REQUEST, "predicted and label must be numbers", "bad-request"
            )
        return {"recorded": True}


def _load_npz(body: bytes) -> dict[str, np.ndarray]:
    """The arrays of an .npz body, refused before any member decompresses beyond
    `MAX_NPZ_ARRAY_BYTES` in all (declared sizes checked first; reads capped, for
    archives whose headers lie)."""
    try:
        with zipfile.ZipFile(io.BytesIO(body)) as archive:
            members = archive.infolist()
            if not members:
                raise ApiError(HTTPStatus.BAD_REQUEST, "the .npz holds no arrays", "bad-request")
            declared = sum(member.file_size for member in members)
            if declared > MAX_NPZ_ARRAY_BYTES:
                raise _npz_too_large(f"its arrays declare {declared} bytes")
            arrays, left = {}, MAX_NPZ_ARRAY_BYTES
            for member in members:
                with archive.open(member) as reader:
                    data = reader.read(left + 1)
                if len(data) > left:
                    raise _npz_too_large("its arrays decompress to more than they declare")
                left -= len(data)
                name = member.filename.removesuffix(".npy")
                arrays[name] = _read_npy(data)
    except (
        zipfile.BadZipFile,
        zlib.error,
        NotImplementedError,
        RuntimeError,
        ValueError,
        EOFError,
        OSError,
    ) as exc:
        raise ApiError(
            HTTPStatus.BAD_REQUEST, f"the body is not an .npz of arrays: {exc}", "bad-request"
        ) from exc
    return arrays


def _read_npy(data: bytes) -> np.ndarray:
    """One .npy member, refused (ValueError) when its header declares more than it holds:
    the array is allocated from the header before its data is read."""
    stream = io.BytesIO(data)
    version = npy_format.read_magic(stream)
    if version == (1, 0):
        shape, _, dtype = npy_format.read_array_header_1_0(stream)
    elif version == (2, 0):
        shape, _, dtype = npy_format.read_array_header_2_0(stream)
    else:
        raise ValueError(f".npy format version {version} is not supported")
    if dtype.itemsize * math.prod(shape) > len(data) - stream.tell():
        raise ValueError(f"an array of shape {shape} holds less data than it declares")
    stream.seek(0)
    return npy_format.read_array(stream, allow_pickle=False)


def _log_request_error(request: Any, client_address: Any) -> None:
    """One readable line for a request that ended in an exception, never a traceback on
    stderr (socketserver's default): a client that hung up mid-request is no fault here."""
    exc = sys.exc_info()[1]
    if isinstance(exc, (BrokenPipeError, ConnectionResetError, ConnectionAbortedError)):
        log.info("local API: a client hung up before its request was answered (%s)", exc)
    else:
        log.error("local API: a request failed: %s: %s", type(exc).__name__, exc)


class _TcpServer(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        _log_request_error(request, client_address)


class _UnixServer(socketserver.ThreadingUnixStreamServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        _log_request_error(request, client_address)


def _serve_on(
    listener: socket.socket, handler: type[BaseHTTPRequestHandler]
) -> socketserver.TCPServer:
    """A threading HTTP server on a socket that is bound and listening already."""
    server_class = _UnixServer if listener.family == socket.AF_UNIX else _TcpServer
    server = server_class(listener.getsockname(), handler, bind_and_activate=False)
    server.socket.close()
    server.socket = listener
    server.daemon_threads = True
    return server


def _short_body(received: int, length: int) -> ApiError:
    return ApiError(
        HTTPStatus.BAD_REQUEST,
        f"the body ended after {received} of the {length} bytes its Content-Length announced",
        "bad-length",
    )


def _npz_too_large(why: str) -> ApiError:
    return ApiError(
        HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
        f"the .npz is refused: {why}, more than the {MAX_NPZ_ARRAY_BYTES} allowed; "
        "send fewer samples per batch",
        "too-large",
    )


def _json(body: bytes) -> dict[str, Any]:
    try:
        value = json.loads(body or b"{}")
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ApiError(HTTPStatus.BAD_REQUEST, f"body is not JSON: {exc}", "bad-request") from exc
    except RecursionError as exc:
        message = "body is JSON nested too deep"
        raise ApiError(HTTPStatus.BAD_REQUEST, message, "bad-request") from exc
    if not isinstance(value, dict):
        raise ApiError(HTTPStatus.BAD_REQUEST, "body must be a JSON object", "bad-request")
    return value
