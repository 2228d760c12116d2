"""Where the ML backend may read a task's image: a file under the document root, or Label Studio's
own address with its token. Nothing else.

A task's image is a URL that Label Studio wrote: ``/data/local-files/?d=REL`` (a Local files
storage, REL relative to its document root), ``/data/upload/...`` (an uploaded file), or an
absolute URL. Every other URL, every path that leaves the document root (``..``, a symbolic
link pointing outside), and every absolute URL of another host is refused: the backend must
not become a way to read any file or any address its machine can reach. Label Studio is asked
without following redirects (a redirect could lead anywhere) and with a size cap, with a legacy
API token or a personal access token (exchanged for an access token, renewed when it expires).
"""
from __future__ import annotations

import json
import os
import tempfile
import threading
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator
from urllib.parse import parse_qs, urljoin, urlsplit

from ..errors import SeglabelError, UsageError

LOCAL_FILES = "/data/local-files/"
MAX_DOWNLOAD = 512 * 1024 * 1024  # bytes of one image fetched from Label Studio
TIMEOUT = 60.0  # seconds for one image from Label Studio


class ImageRefused(SeglabelError):
    """A task's image that the backend will not or cannot read (one line: which and why)."""


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: D102 - urllib's hook
        raise ImageRefused(f"{req.full_url}: Label Studio redirected to {newurl}; redirects are not followed")


class ImageSource:
    """Reads images from ``document_root`` (Label Studio's LOCAL_FILES_DOCUMENT_ROOT, when the
    backend runs on the same machine) and from Label Studio at ``url`` with ``token``."""

    def __init__(self, document_root: str | Path | None = None, url: str | None = None, token: str | None = None,
                 max_bytes: int = MAX_DOWNLOAD, timeout: float = TIMEOUT) -> None:
        self.root = Path(os.path.realpath(document_root)) if document_root else None
        if self.root is not None and not self.root.is_dir():
            raise UsageError(f"--document-root {document_root}: not a folder")
        self.url = _base_url(url) if url else None
        if self.url and not token:
            raise UsageError("--labelstudio-url needs Label Studio's API token (--labelstudio-token or "
                             "LABEL_STUDIO_API_KEY) to read images through it")
        self.token, self.max_bytes, self.timeout = token, max_bytes, timeout
        self._opener = urllib.request.build_opener(_NoRedirects)
        self._access: str | None = None  # from a personal access token
        self._lock = threading.Lock()

    def describe(self) -> str:
        where = ([f"files under {self.root}"] if self.root else []) + ([f"Label Studio at {self.url}"] if self.url else [])
        return " and ".join(where) or "nowhere"

    @contextmanager
    def open(self, url: str) -> Iterator[Path]:
        """The image of ``url`` as a local file for the length of the ``with`` block."""
        if not isinstance(url, str) or not url:
            raise ImageRefused(f"{url!r}: not an image URL")
        parts = urlsplit(url)
        if parts.scheme or parts.netloc:
            if not self.url or not _same_site(url, self.url):
                raise ImageRefused(f"{url}: not an address of Label Studio ({self.url or 'no --labelstudio-url'}); "
                                   "refused")
            with self._download(url) as path:
                yield path
            return
        if not parts.path.startswith("/"):
            raise ImageRefused(f"{url}: not a Label Studio data URL; refused")
        if parts.path.startswith(LOCAL_FILES) and self.root is not None:
            yield self._local(url, parts.query)
            return
        if self.url is None:
            raise ImageRefused(f"{url}: served by Label Studio, and this backend has no --labelstudio-url"
                               + ("" if self.root else " or --document-root"))
        with self._download(urljoin(self.url, url.lstrip("/"))) as path:
            yield path

    def _local(self, url: str, query: str) -> Path:
        rel = parse_qs(query).get("d", [""])[0]  # decoded once, as Label Studio decodes it
        if not rel:
            raise ImageRefused(f"{url}: no file named (d=)")
        path = Path(os.path.realpath(self.root / rel.lstrip("/")))
        if os.path.commonpath([path, self.root]) != str(self.root) or path == self.root:
            raise ImageRefused(f"{url}: outside the document root {self.root}; refused")
        if not path.is_file():
            raise ImageRefused(f"{url}: no such file under the document root ({path})")
        return path

    @contextmanager
    def _download(self, url: str) -> Iterator[Path]:
        fd, name = tempfile.mkstemp(prefix="seglabel-serve-", suffix=Path(urlsplit(url).path).suffix[:8])
        try:
            with os.fdopen(fd, "wb") as f:
                self._fetch_into(url, f)
            yield Path(name)
        finally:
            os.unlink(name)

    def _fetch_into(self, url: str, f) -> None:
        try:
            try:
                self._fetch(url, f)
            except urllib.error.HTTPError as e:
                if e.code != 401 or not _is_jwt(self.token):
                    raise
                with self._lock:
                    self._access = None  # the access token expired: a new one, once
                f.seek(0)
                f.truncate()
                self._fetch(url, f)
        except urllib.error.HTTPError as e:
            raise ImageRefused(f"{url}: Label Studio answered {e.code} {e.reason}") from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", None) or e
            raise ImageRefused(f"{url}: cannot reach Label Studio ({reason})") from None

    def _fetch(self, url: str, f) -> None:
        request = urllib.request.Request(url, headers={"Authorization": self._authorization()})
        with self._opener.open(request, timeout=self.timeout) as response:
            left = self.max_bytes
            while chunk := response.read(min(1 << 20, left + 1)):
                left -= len(chunk)
                if left < 0:
                    raise ImageRefused(f"{url}: larger than {self.max_bytes} bytes; refused")
                f.write(chunk)

    def _authorization(self) -> str:
        """A legacy token as it is; a personal access token (a JWT, Label Studio 1.23's default)
        is exchanged for a short-lived access token first, as Label Studio's SDK does."""
        if not _is_jwt(self.token):
            return f"Token {self.token}"
        with self._lock:
            if self._access is None:
                request = urllib.request.Request(urljoin(self.url, "api/token/refresh/"), method="POST",
                                                 data=json.dumps({"refresh": self.token}).encode(),
                                                 headers={"Content-Type": "application/json"})
                try:
                    with self._opener.open(request, timeout=self.timeout) as response:
                        self._access = json.loads(response.read(1 << 20))["access"]
                except urllib.error.HTTPError as e:
                    raise ImageRefused(f"Label Studio refused the personal access token ({e.code} {e.reason})") from None
                except (ValueError, KeyError, TypeError):
                    raise ImageRefused("Label Studio's token refresh gave no access token") from None
            return f"Bearer {self._access}"


def _base_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
        raise UsageError(f"--labelstudio-url {url}: give Label Studio's address, e.g. http://localhost:8080")
    return url.rstrip("/") + "/"


def _same_site(url: str, base: str) -> bool:
    """``url`` is on Label Studio's scheme, host and port, under its path."""
    a, b = urlsplit(url), urlsplit(base)
    return (a.scheme, a.hostname, a.port or _PORTS.get(a.scheme)) == (b.scheme, b.hostname, b.port or _PORTS.get(b.scheme)) \
        and (a.path + "/").startswith(b.path) and "@" not in a.netloc


def _is_jwt(token: str | None) -> bool:
    return bool(token) and token.count(".") == 2


_PORTS = {"http": 80, "https": 443}
