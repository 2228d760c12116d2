"""Object storage and URLs (S3, GCS, Azure, HTTP(S), any fsspec URL): the one place seglabel
touches them. Ground floor: imports only ``errors``, and fsspec and its filesystems lazily.

- ``urls``: which text is a URL, URLs refused for the credentials they hold, redaction, prefixes;
- ``filesystems``: the fsspec filesystem of a URL (a one-line refusal naming the extra to install);
- ``objects``: list, read (ranges too), write whole objects, conditional writes, each retried on
  transient errors as documented there;
- ``problems``: what went wrong, in one line (``StorageError``), and whether a retry may help;
- ``lease``: a lock over a prefix for runs on several machines (conditional writes);
- ``tar_shards``: WebDataset tar shards (local or URL) as photos to label.
"""
from .filesystems import filesystem, install_hint
from .lease import Lease, LeaseHeld, LeaseLost, check_conditional_writes
from .objects import Listed, create, delete, exists, info, list_files, read_bytes, replace, retry_policy, write_bytes
from .problems import StorageError, classify
from .urls import check_url, is_remote, is_url, join, local_path, redact, relative, safe_relative

__all__ = ["Lease", "LeaseHeld", "LeaseLost", "Listed", "StorageError", "check_conditional_writes", "check_url",
           "classify", "create", "delete", "exists", "filesystem", "info", "install_hint", "is_remote", "is_url", "join",
           "list_files", "local_path", "read_bytes", "redact", "relative", "replace", "retry_policy",
           "safe_relative", "write_bytes"]
