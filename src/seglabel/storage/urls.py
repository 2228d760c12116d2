"""URLs of object stores and web servers as seglabel takes them: which text is a URL, which URLs
are refused (credentials written into them), how a URL is shown, and paths under a URL prefix.

Credentials come only from the usual places (environment, profiles, fsspec's configuration),
never from the URL: a URL that carries them (``s3://KEY:SECRET@bucket``,
``https://user:password@host``, a signed URL's ``X-Amz-Signature=...`` or an Azure SAS ``sig=...``)
would put a secret into run.json, the records and every message, and a signed URL expires, so a run
could not be resumed from it. Such URLs are refused in one line that shows them redacted.
"""
from __future__ import annotations

import re
from urllib.parse import parse_qsl, unquote, urlsplit, urlunsplit

from ..errors import UsageError

# scheme://... with a scheme of two letters or more, so a Windows drive (C:\\, C://) is no URL
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+)://")
HIDDEN = "***"
# query parameters that carry a secret or a signature (compared in lower case)
SECRET_PARAMETERS = frozenset({
    "x-amz-signature", "x-amz-credential", "x-amz-security-token", "awsaccesskeyid", "signature",
    "x-goog-signature", "x-goog-credential", "googleaccessid", "sig", "token", "access_token",
    "api_key", "apikey", "key", "password", "secret", "client_secret", "sas", "code",
})


def scheme(text: str) -> str | None:
    """The URL scheme in lower case (``s3``, ``gs``, ``https``...), None for a local path."""
    found = _URL.match(text)
    return found.group(1).lower() if found else None


def is_url(text: object) -> bool:
    """Whether ``text`` names something to read through fsspec rather than a local path
    (``file://`` URLs included; ``local_path`` turns those into paths)."""
    return isinstance(text, str) and _URL.match(text) is not None


def is_remote(text: object) -> bool:
    """A URL read through the storage layer: any URL but ``file://`` (a local path)."""
    return is_url(text) and local_path(text) is None  # type: ignore[arg-type]


def local_path(text: str) -> str | None:
    """The local path of a ``file://`` URL (or of a plain path), None for any other URL."""
    if not is_url(text):
        return text
    if scheme(text) != "file":
        return None
    parts = urlsplit(text)
    if parts.netloc not in ("", "localhost"):
        return None  # file://host/...: another machine's file
    return unquote(parts.path)


def redact(url: str) -> str:
    """``url`` safe to show or store: a user name and password, and the values of query parameters
    that carry secrets, replaced by ``***``. Anything else (a local path) unchanged."""
    if not is_url(url):
        return url
    try:
        parts = urlsplit(url)
    except ValueError:  # e.g. a malformed IPv6 host: show the scheme only
        return f"{scheme(url)}://{HIDDEN}"
    netloc = parts.netloc
    if "@" in netloc:
        netloc = f"{HIDDEN}@{netloc.rsplit('@', 1)[1]}"
    query = parts.query
    if query:
        shown = []
        for name, value in parse_qsl(query, keep_blank_values=True):
            shown.append(f"{name}={HIDDEN if name.lower() in SECRET_PARAMETERS else value}")
        query = "&".join(shown)
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def secrets_in(url: str) -> list[str]:
    """What in ``url`` is a credential: ``user:password`` (or a user alone, as s3fs would take an
    access key), and the query parameters that carry secrets."""
    try:
        parts = urlsplit(url)
    except ValueError as e:
        raise UsageError(f"{redact(url)}: not a valid URL ({e})") from None
    found = []
    if "@" in parts.netloc:
        found.append("a user name and password" if ":" in parts.netloc.rsplit("@", 1)[0] else "a user name")
    found += [f"{name}=" for name, _ in parse_qsl(parts.query, keep_blank_values=True)
              if name.lower() in SECRET_PARAMETERS]
    return found


def check_url(url: str, what: str = "") -> str:
    """``url`` if seglabel may take it; a ``UsageError`` (one line, the URL redacted) if it carries
    credentials. ``what`` names where it was given (``--out``, ``--from-list line 3``...)."""
    found = secrets_in(url)
    if found:
        where = f"{what} " if what else ""
        raise UsageError(f"{where}{redact(url)}: the URL holds {', '.join(found)}; seglabel takes credentials only "
                         "from the environment, a profile or fsspec's configuration (a secret in the URL would be "
                         "written into run.json and every record, and a signed URL expires before a resumed run)")
    return url


def join(prefix: str, rel: str) -> str:
    """``prefix/rel`` for a URL prefix (one slash between)."""
    if not rel:
        return prefix
    return prefix + rel.lstrip("/") if prefix.endswith("://") else f"{prefix.rstrip('/')}/{rel.lstrip('/')}"


def relative(url: str, prefix: str) -> str | None:
    """``url`` relative to the URL ``prefix`` as a posix path ("" for the prefix itself), None when
    it is not under it. Compared as written: the same scheme, host and path prefix."""
    base = prefix.rstrip("/")
    if url.rstrip("/") == base:
        return ""
    if not url.startswith(base + "/"):
        return None
    rel = url[len(base) + 1:]
    return rel if safe_relative(rel) else None


def safe_relative(rel: str) -> bool:
    """Whether ``rel`` can name outputs under ``--out``: no empty, ``.`` or ``..`` part, no NUL, not
    absolute (a key of an object store, or a tar member's name, may hold any of those)."""
    if not rel or rel.startswith("/") or "\0" in rel:
        return False
    return all(part not in ("", ".", "..") for part in rel.split("/"))
