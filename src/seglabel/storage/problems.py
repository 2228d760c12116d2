"""What went wrong with a store, in one line, and whether trying again may help.

fsspec's filesystems raise their own exceptions (s3fs turns S3's error codes into ``OSError``
subclasses; botocore, aiohttp, gcsfs and adlfs have theirs). ``classify`` sorts any of them into a
few kinds the user can act on, by class name where a class belongs to an optional package, so this
module imports none of them.
"""
from __future__ import annotations

import asyncio
import errno
import socket

from ..errors import SeglabelError, one_line
from .urls import redact, scheme

NOT_FOUND, NO_BUCKET, DENIED, NO_CREDENTIALS, EXISTS, CHANGED, TRANSIENT, OTHER = (
    "not found", "no bucket", "denied", "no credentials", "exists", "changed", "transient", "other")

# errnos of a connection or a server that may work on the next try
_TRANSIENT_ERRNOS = {errno.ECONNRESET, errno.ECONNREFUSED, errno.ECONNABORTED, errno.ETIMEDOUT, errno.EPIPE,
                     errno.EAGAIN, errno.EBUSY, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ENETDOWN,
                     getattr(errno, "EREMOTEIO", errno.EIO)}
# exception classes (by name, anywhere in the class's ancestry) of a connection that failed or a
# server that asked to slow down: botocore, aiohttp, requests, urllib3, google, azure
_TRANSIENT_CLASSES = {"HTTPClientError", "ConnectionError", "EndpointConnectionError", "ConnectionClosedError",
                      "ReadTimeoutError", "ConnectTimeoutError", "ClientConnectionError", "ServerDisconnectedError",
                      "ClientPayloadError", "ServerTimeoutError", "IncompleteRead", "ResponseParserError",
                      "ProtocolError", "TransportError", "ServiceRequestError", "ServiceResponseError",
                      "FSTimeoutError", "RetryError"}
_CREDENTIAL_CLASSES = {"NoCredentialsError", "PartialCredentialsError", "DefaultCredentialsError",
                       "ClientAuthenticationError", "CredentialRetrievalError", "NoAuthTokenError"}
_CREDENTIAL_HINTS = {
    "s3": "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE, or give a role to the machine",
    "gs": "set GOOGLE_APPLICATION_CREDENTIALS, or run `gcloud auth application-default login`",
    "az": "set AZURE_STORAGE_CONNECTION_STRING, or AZURE_STORAGE_ACCOUNT_NAME with a key or an Azure login",
}
_SCHEME_FAMILY = {"s3a": "s3", "gcs": "gs", "abfs": "az", "abfss": "az", "adl": "az"}


class StorageError(SeglabelError):
    """An operation on a store failed: ``str()`` is the URL (redacted) and a one-line reason;
    ``kind`` is one of this module's kinds (``transient``: trying again may help)."""

    def __init__(self, url: str, reason: str, kind: str = OTHER) -> None:
        self.url, self.reason, self.kind = redact(url), one_line(reason), kind
        super().__init__(f"{self.url}: {self.reason}")

    @property
    def transient(self) -> bool:
        return self.kind == TRANSIENT


def _names(exc: BaseException) -> set[str]:
    return {cls.__name__ for cls in type(exc).__mro__}


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and what caused it (s3fs raises its ``OSError`` from botocore's error)."""
    seen, out = set(), []
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        out.append(exc)
        exc = exc.__cause__ or exc.__context__
    return out


def _status(exc: BaseException) -> int | None:
    """The HTTP status of an error response, where the exception carries one."""
    for e in _chain(exc):
        status = getattr(e, "status", None) or getattr(e, "status_code", None)
        response = getattr(e, "response", None)
        if status is None and isinstance(response, dict):
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if isinstance(status, int):
            return status
    return None


def _code(exc: BaseException) -> str:
    for e in _chain(exc):
        response = getattr(e, "response", None)
        if isinstance(response, dict) and response.get("Error", {}).get("Code"):
            return str(response["Error"]["Code"])
    return ""


def classify(exc: BaseException, url: str = "") -> tuple[str, str]:
    """(kind, one-line reason) of an exception raised by a store."""
    chain = _chain(exc)
    names = set().union(*(_names(e) for e in chain))
    text = one_line(" ".join(str(exc).split())) or type(exc).__name__
    status, code = _status(exc), _code(exc)
    if names & _CREDENTIAL_CLASSES:
        family = _SCHEME_FAMILY.get(scheme(url) or "", scheme(url) or "")
        hint = _CREDENTIAL_HINTS.get(family, "configure credentials for this store the usual way")
        return NO_CREDENTIALS, f"no credentials found ({text}); {hint}"
    if isinstance(exc, FileExistsError) or (code == "PreconditionFailed" and "If-None-Match" in text):
        return EXISTS, "already exists"
    if code == "PreconditionFailed" or status == 412:
        return CHANGED, "changed by another writer since it was read (precondition failed)"
    if code == "NoSuchBucket" or "bucket does not exist" in text.lower():
        return NO_BUCKET, "the bucket does not exist (create it, or check the name and the endpoint)"
    if isinstance(exc, FileNotFoundError) or status == 404:
        return NOT_FOUND, "not found"
    if isinstance(exc, PermissionError) or status in (401, 403):
        return DENIED, (f"access denied ({code or status or 403}: {text}); the credentials in use may not do "
                        "this here: check their permissions, the bucket policy and the endpoint")
    if (status is not None and (status >= 500 or status in (408, 429))) or code in ("SlowDown", "Throttling"):
        return TRANSIENT, f"the server failed or asked to slow down ({code or status}: {text})"
    if names & _TRANSIENT_CLASSES or isinstance(exc, (TimeoutError, socket.timeout, asyncio.TimeoutError,
                                                      ConnectionError)):
        return TRANSIENT, f"connection failed ({type(exc).__name__}: {text})"
    if isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNOS:
        return TRANSIENT, f"the store failed ({text})"
    return OTHER, f"{type(exc).__name__}: {text}"


def storage_error(exc: BaseException, url: str, tries: int = 1) -> StorageError:
    kind, reason = classify(exc, url)
    if kind == TRANSIENT and tries > 1:
        reason = f"{reason}; gave up after {tries} tries"
    return StorageError(url, reason, kind)
