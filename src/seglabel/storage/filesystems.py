"""The fsspec filesystem behind a URL, with a one-line refusal when its package is missing.

Credentials and endpoints are left to the filesystem and the usual places: for S3, botocore reads
the environment (``AWS_ACCESS_KEY_ID``..., ``AWS_PROFILE``, ``AWS_ENDPOINT_URL`` /
``AWS_ENDPOINT_URL_S3`` for an S3-compatible store such as MinIO), profiles and instance roles;
fsspec's own configuration (``~/.config/fsspec/*.json``, ``FSSPEC_<PROTOCOL>_<OPTION>``) gives any
filesystem its options. seglabel passes no option of its own, so a URL behaves as it does in
pandas, datasets or webdataset on the same machine.
"""
from __future__ import annotations

from typing import Any

from ..errors import UsageError
from .urls import check_url, redact, scheme

# scheme -> (the seglabel extra that installs its filesystem, the package)
EXTRAS = {
    "s3": ("s3", "s3fs"), "s3a": ("s3", "s3fs"),
    "gs": ("gcs", "gcsfs"), "gcs": ("gcs", "gcsfs"),
    "az": ("azure", "adlfs"), "abfs": ("azure", "adlfs"), "abfss": ("azure", "adlfs"), "adl": ("azure", "adlfs"),
    "http": ("http", "aiohttp"), "https": ("http", "aiohttp"),
}


def install_hint(url: str) -> str:
    """The pip command that brings the filesystem for ``url``."""
    extra, package = EXTRAS.get(scheme(url) or "", ("", ""))
    return f"pip install 'seglabel[{extra}]'" if extra else f"install the fsspec filesystem for {scheme(url)}://"


def filesystem(url: str) -> tuple[Any, str]:
    """(fsspec filesystem, path within it) for ``url``; ``UsageError`` (one line) for a URL that
    holds credentials, a scheme fsspec does not know, or a filesystem whose package is missing."""
    check_url(url)
    try:
        import fsspec.core
    except ImportError:
        raise UsageError(f"{redact(url)}: reading URLs needs fsspec: {install_hint(url)}") from None
    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as e:
        extra, package = EXTRAS.get(scheme(url) or "", ("", "its filesystem"))
        raise UsageError(f"{redact(url)}: {scheme(url)}:// URLs need {package} ({' '.join(str(e).split())}): "
                         f"{install_hint(url)}") from None
    except ValueError as e:
        if "not known" in str(e) or "protocol" in str(e).lower():
            raise UsageError(f"{redact(url)}: no fsspec filesystem knows {scheme(url)}:// URLs") from None
        raise UsageError(f"{redact(url)}: {' '.join(str(e).split())}") from None


def protocol(fs: Any) -> str:
    """The filesystem's main protocol name (``s3``, ``gcs``, ``memory``, ``file``...)."""
    found = fs.protocol
    return found if isinstance(found, str) else found[0]


def full_url(fs: Any, path: str) -> str:
    """The URL of ``path`` in ``fs`` (what listing returns is a path without its scheme)."""
    return fs.unstrip_protocol(path)
