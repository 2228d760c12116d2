"""The HTTP side of the ML backend: Label Studio's four JSON endpoints on the standard library's
``ThreadingHTTPServer`` (no web framework is a dependency of seglabel, and four small JSON
endpoints do not need one; the model work is serialised by the backend anyway).

- ``GET /health``: ``{"status": "UP", "model_version": ...}``
- ``POST /setup``: reads the project's labeling interface (``schema``), answers ``model_version``
- ``POST /predict``: ``{"results": [one prediction per task]}``
- ``POST /webhook``: accepted and ignored (Label Studio registers it beside every ML backend and
  sends its events there, without the backend's credentials; nothing is read from it)
- ``GET /versions``: the one model version (Label Studio's model list asks for it)

With ``auth`` (user, password) every endpoint but ``/webhook`` wants HTTP basic auth, as Label
Studio sends it for a backend registered with ``auth_method: BASIC_AUTH``.
"""
from __future__ import annotations

import base64
import hmac
import json
import logging
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from ..errors import SeglabelError
from .backend import Backend

log = logging.getLogger("seglabel")
MAX_BODY = 256 * 1024 * 1024  # bytes of one request (tasks carry their earlier predictions)


class BackendServer(ThreadingHTTPServer):
    daemon_threads = True  # a request in flight does not keep a stopped server alive

    def __init__(self, backend: Backend | None, host: str = "127.0.0.1", port: int = 9090,
                 auth: tuple[str, str] | None = None) -> None:
        self.backend = backend  # may be set after binding: requests wait in the listen queue until serving
        self.expected_auth = None if auth is None else "Basic " + base64.b64encode(":".join(auth).encode()).decode()
        super().__init__((host, port), _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"


class _Handler(BaseHTTPRequestHandler):
    server: BackendServer
    server_version = "seglabel-serve"
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        if not self._authorised():
            return
        backend = self.server.backend
        if self.path.split("?")[0].rstrip("/") == "/health":
            self._send(200, {"status": "UP", "model_class": "seglabel", "model_version": backend.model_version})
        elif self.path.split("?")[0].rstrip("/") == "/versions":
            self._send(200, {"versions": [backend.model_version], "message": ""})
        else:
            self._send(404, {"error": f"no such endpoint: GET {self.path}"})

    def do_POST(self) -> None:  # noqa: N802
        path = self.path.split("?")[0].rstrip("/")
        if path == "/webhook":
            if self._read_body() is not None:  # events are not used; read so the connection stays usable
                self._send(200, {"status": "ok"})
            return
        if not self._authorised():
            return
        body = self._read_body()
        if body is None:
            return
        backend = self.server.backend
        try:
            if path == "/setup":
                version = backend.setup(_text(body, "schema"), str(body.get("project", "")))
                self._send(200, {"model_version": version})
            elif path == "/predict":
                tasks = body.get("tasks")
                if not isinstance(tasks, list):
                    raise _BadRequest("'tasks' must be a list of tasks")
                results = backend.predict(tasks, _text(body, "label_config"), str(body.get("project", "")))
                log.info("project %s: %d of %d tasks predicted", body.get("project", "?"), sum(map(bool, results)),
                         len(tasks))
                self._send(200, {"results": results, "model_version": backend.model_version})
            else:
                self._send(404, {"error": f"no such endpoint: POST {self.path}"})
        except (_BadRequest, SeglabelError) as e:
            log.warning("%s %s: %s", self.command, path, e)
            self._send(400, {"error": str(e)})

    def _authorised(self) -> bool:
        expected = self.server.expected_auth
        given = self.headers.get("Authorization", "")
        if expected is None or hmac.compare_digest(given.encode(), expected.encode()):
            return True
        self.close_connection = True  # the body is left unread
        self._send(401, {"error": "basic auth required"}, {"WWW-Authenticate": 'Basic realm="seglabel"'})
        return False

    def _read_body(self) -> dict[str, Any] | None:
        """The JSON object of the request, or None after answering 400/413."""
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if length < 0 or length > MAX_BODY:
            self.close_connection = True
            self._send(413 if length > MAX_BODY else 400, {"error": f"request body must be 0 to {MAX_BODY} bytes"})
            return None
        raw = self.rfile.read(length) if length else b""
        try:
            body = json.loads(raw or b"{}")
        except ValueError as e:
            self._send(400, {"error": f"the request is not JSON ({e})"})
            return None
        if not isinstance(body, dict):
            self._send(400, {"error": "the request must be a JSON object"})
            return None
        return body

    def _send(self, status: int, payload: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        data = json.dumps(payload, separators=(",", ":")).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's signature
        log.debug("%s - %s", self.address_string(), format % args)


class _BadRequest(SeglabelError):
    """A request that is not what Label Studio sends (answered 400)."""


def _text(body: dict[str, Any], key: str) -> str:
    value = body.get(key)
    if not isinstance(value, str) or not value.strip():
        raise _BadRequest(f"{key!r} must be the project's labeling interface (XML)")
    return value
