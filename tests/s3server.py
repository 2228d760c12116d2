"""A real S3 API for tests: moto's server, in this process, on 127.0.0.1 at a free port.

``s3`` (fixture, conftest.py) gives each test an empty server and an environment in which seglabel
(and any process it starts) reaches it the standard way and nothing else: AWS_ENDPOINT_URL,
test credentials, no profile files, no instance metadata. ``S3Server.auth(True)`` makes the server
check credentials (then the test keys are unknown to it: 403), ``DroppingProxy`` stands between
seglabel and the server and drops connections.

Needs ``moto[server]`` and ``s3fs[boto3]`` (the ``test`` extra); tests skip without them.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
import urllib.request

import pytest

NEEDS = "needs moto[server] and s3fs: pip install 'moto[server]' 's3fs[boto3]'"


def free_port() -> int:
    """A port nothing listens on at 127.0.0.1 now (bound and released; checked by the caller's bind)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _reachable(port: int, deadline: float) -> None:
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


class S3Server:
    def __init__(self) -> None:
        try:
            from moto.server import ThreadedMotoServer
            import s3fs  # noqa: F401 - seglabel reads through it
        except ImportError:
            pytest.skip(NEEDS)
        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
        for _ in range(5):  # a port taken between free_port() and the bind: try another
            self.port = free_port()
            self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
            try:
                self._server.start()
                _reachable(self.port, time.monotonic() + 10)
                break
            except OSError:
                continue
        else:
            pytest.skip("no free port for the S3 server on 127.0.0.1")
        self.endpoint = f"http://127.0.0.1:{self.port}"

    def env(self, home: str) -> dict[str, str]:
        """The environment of a client of this server; ``home`` holds no AWS profile."""
        return {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_EC2_METADATA_DISABLED": "true", "AWS_ENDPOINT_URL": self.endpoint,
                "AWS_SHARED_CREDENTIALS_FILE": os.path.join(home, "no-credentials"),
                "AWS_CONFIG_FILE": os.path.join(home, "no-config")}

    def _post(self, path: str, data: bytes = b"") -> None:
        # text/plain: a form content type would have the server parse the body as a form, not read it
        request = urllib.request.Request(self.endpoint + path, data=data, method="POST",
                                         headers={"Content-Type": "text/plain"})
        with urllib.request.urlopen(request, timeout=10) as reply:
            reply.read()

    def reset(self) -> None:
        """Every bucket and object gone, credentials unchecked."""
        self.auth(False)
        self._post("/moto-api/reset")

    def auth(self, on: bool) -> None:
        """Check credentials from the next request on (the test keys are then unknown: 403)."""
        self._post("/moto-api/reset-auth", b"0" if on else b"inf")

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id="test", aws_secret_access_key="test")

    def stop(self) -> None:
        self._server.stop()


class DroppingProxy:
    """A TCP proxy on 127.0.0.1 to ``port`` that drops the first ``drop`` connections (reads the
    request, then closes without a reply), or every one with ``drop=None``; counts them."""

    def __init__(self, port: int, drop: int | None = None) -> None:
        self.target, self.drop, self.connections = port, drop, 0
        self._listener = socket.socket()
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self.port = self._listener.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._closed = False
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            self.connections += 1
            if self.drop is None or self.connections <= self.drop:
                try:
                    conn.settimeout(2)
                    conn.recv(65536)
                except OSError:
                    pass
                conn.close()
                continue
            threading.Thread(target=self._forward, args=(conn,), daemon=True).start()

    def _forward(self, conn: socket.socket) -> None:
        try:
            upstream = socket.create_connection(("127.0.0.1", self.target))
        except OSError:
            conn.close()
            return

        def pump(a: socket.socket, b: socket.socket) -> None:
            try:
                while data := a.recv(65536):
                    b.sendall(data)
            except OSError:
                pass
            finally:
                for s in (a, b):
                    try:
                        s.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass

        threading.Thread(target=pump, args=(upstream, conn), daemon=True).start()
        pump(conn, upstream)
        conn.close()
        upstream.close()

    def close(self) -> None:
        self._closed = True
        self._listener.close()
