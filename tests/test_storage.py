"""The storage layer (seglabel.storage) against a real S3 API (moto's server on 127.0.0.1): URLs
and credentials, listing, reading (ranges too), whole-object and conditional writes, the retry
rule, and the one line each failure gives (missing bucket, missing credentials, 403, dropped
connection)."""
from __future__ import annotations

import multiprocessing
import subprocess
import sys

import pytest

from seglabel.errors import UsageError
from seglabel.storage import (StorageError, check_url, create, delete, exists, filesystem, info, is_url, list_files,
                              local_path, read_bytes, redact, relative, replace, safe_relative, write_bytes)
from seglabel.storage.problems import DENIED, NO_BUCKET, NO_CREDENTIALS, NOT_FOUND, TRANSIENT

SUFFIXES = (".jpg", ".jpeg", ".png")


# --- URLs and credentials (no server) ---------------------------------------------------------

def test_what_is_a_url():
    assert is_url("s3://bucket/photos") and is_url("gs://b/x.jpg") and is_url("https://host/a.jpg")
    assert is_url("az://container/x") and is_url("file:///data/a.jpg")
    assert not is_url("/data/photos") and not is_url("photos/a.jpg") and not is_url("C://x") and not is_url(3)
    assert local_path("file:///data/a%20b.jpg") == "/data/a b.jpg"
    assert local_path("/data/a.jpg") == "/data/a.jpg"
    assert local_path("s3://bucket/a.jpg") is None and local_path("file://otherhost/a.jpg") is None


@pytest.mark.parametrize("url, secret", [
    ("s3://AKIAEXAMPLE:wJalrXUtnFEMI@bucket/photos", "wJalrXUtnFEMI"),
    ("https://user:hunter2@example.org/a.jpg", "hunter2"),
    ("https://bucket.s3.amazonaws.com/a.jpg?X-Amz-Credential=AKIAEXAMPLE&X-Amz-Signature=deadbeef", "deadbeef"),
    ("https://acct.blob.core.windows.net/c/a.jpg?sv=2022-11-02&sig=c2VjcmV0", "c2VjcmV0"),
    ("https://example.org/a.jpg?token=abc123secret", "abc123secret"),
])
def test_urls_with_credentials_are_refused_without_showing_them(url, secret):
    with pytest.raises(UsageError) as e:
        check_url(url, "--out")
    message = str(e.value)
    assert secret not in message and "\n" not in message
    assert message.startswith("--out ") and "***" in message and "environment" in message
    assert secret not in redact(url)
    with pytest.raises(UsageError):
        filesystem(url)  # nothing reads it either


def test_urls_without_credentials_pass_unchanged():
    for url in ("s3://bucket/photos", "https://example.org/photos/a.jpg?width=300", "gs://b/x"):
        assert check_url(url) == url and redact(url) == url


def test_paths_under_a_url_prefix():
    assert relative("s3://b/photos/x/a.jpg", "s3://b/photos") == "x/a.jpg"
    assert relative("s3://b/photos/x/a.jpg", "s3://b/photos/") == "x/a.jpg"
    assert relative("s3://b/photos", "s3://b/photos") == ""
    assert relative("s3://b/photosets/a.jpg", "s3://b/photos") is None  # a prefix of the name is not a folder
    assert relative("s3://b/photos/../etc/a.jpg", "s3://b/photos") is None
    assert relative("s3://b/photos//a.jpg", "s3://b/photos") is None
    assert safe_relative("x/a.jpg") and not safe_relative("/x") and not safe_relative("a/./b")


def test_an_unknown_scheme_is_one_line():
    with pytest.raises(UsageError, match=r"nosuchscheme://.*no fsspec filesystem"):
        filesystem("nosuchscheme://bucket/a.jpg")


@pytest.mark.parametrize("url, extra, blocked", [("s3://bucket/a.jpg", "s3", "s3fs"),
                                                 ("gs://bucket/a.jpg", "gcs", "gcsfs"),
                                                 ("az://container/a.jpg", "azure", "adlfs")])
def test_a_missing_filesystem_names_the_pip_command(url, extra, blocked):
    # a fresh interpreter in which the filesystem's package cannot be imported
    code = (f"import sys; sys.modules[{blocked!r}] = None\n"
            "from seglabel.storage import filesystem\n"
            "from seglabel.errors import UsageError\n"
            f"try:\n    filesystem({url!r})\nexcept UsageError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("\n") == 1 and f"pip install 'seglabel[{extra}]'" in out.stdout
    assert out.stdout.startswith(url)


# --- against the S3 server ------------------------------------------------------------------------

def _bucket(s3, name="photos", objects=None):
    client = s3.client()
    client.create_bucket(Bucket=name)
    for key, data in (objects or {}).items():
        client.put_object(Bucket=name, Key=key, Body=data)
    return client


def test_listing_is_recursive_sorted_and_filtered_by_suffix(s3):
    _bucket(s3, objects={"set/b.JPG": b"bb", "set/a.png": b"a", "set/sub/c.jpeg": b"ccc", "set/notes.txt": b"x",
                         "set/sub/deeper/d.jpg": b"dddd", "other/e.jpg": b"e", "setx/f.jpg": b"f"})
    found = list_files("s3://photos/set", SUFFIXES)
    assert [f.rel for f in found] == ["a.png", "b.JPG", "sub/c.jpeg", "sub/deeper/d.jpg"]
    assert [f.url for f in found][-1] == "s3://photos/set/sub/deeper/d.jpg"
    assert [f.size for f in found] == [1, 2, 3, 4]
    assert all(f.etag and f.mtime_ns for f in found)
    assert list_files("s3://photos/set/", SUFFIXES) == found
    assert [f.rel for f in list_files("s3://photos/set")] == ["a.png", "b.JPG", "notes.txt", "sub/c.jpeg",
                                                              "sub/deeper/d.jpg"]
    assert list_files("s3://photos/nothing-here", SUFFIXES) == []
    one = list_files("s3://photos/set/a.png", SUFFIXES)
    assert [(f.url, f.rel) for f in one] == [("s3://photos/set/a.png", "a.png")]


def test_read_write_and_ranges(s3):
    _bucket(s3)
    write_bytes("s3://photos/out/masks/a.png", b"0123456789")
    assert read_bytes("s3://photos/out/masks/a.png") == b"0123456789"
    assert read_bytes("s3://photos/out/masks/a.png", 2, 5) == b"234"
    assert exists("s3://photos/out/masks/a.png") and not exists("s3://photos/out/masks/b.png")
    assert info("s3://photos/out/masks/a.png").size == 10
    write_bytes("s3://photos/out/masks/a.png", b"new")  # a whole object replaces the old one
    assert read_bytes("s3://photos/out/masks/a.png") == b"new"
    delete("s3://photos/out/masks/a.png")
    delete("s3://photos/out/masks/a.png")  # already gone: fine
    assert not exists("s3://photos/out/masks/a.png")


def test_conditional_writes(s3):
    _bucket(s3)
    url = "s3://photos/out/.lease"
    first = create(url, b"one")
    assert first and create(url, b"two") is None
    assert read_bytes(url) == b"one"
    assert replace(url, b"three", '"0123456789abcdef0123456789abcdef"') is None  # not the version read
    assert read_bytes(url) == b"one"
    second = replace(url, b"four", first)
    assert second and second != first and read_bytes(url) == b"four"
    assert replace(url, b"five", first) is None  # the old version is gone
    with pytest.raises(UsageError, match="conditional writes"):
        create("memory://somewhere/.lease", b"x")  # no store seglabel can rely on for them


def test_a_missing_bucket_is_one_line(s3):
    with pytest.raises(StorageError) as e:
        list_files("s3://no-such-bucket/photos", SUFFIXES)
    assert e.value.kind == NO_BUCKET and str(e.value).startswith("s3://no-such-bucket/photos: the bucket does not exist")
    with pytest.raises(StorageError) as e:
        read_bytes("s3://no-such-bucket/a.jpg")
    assert e.value.kind == NO_BUCKET and "\n" not in str(e.value)


def test_a_missing_object_is_not_found(s3):
    _bucket(s3)
    with pytest.raises(StorageError) as e:
        read_bytes("s3://photos/none.jpg")
    assert e.value.kind == NOT_FOUND and str(e.value) == "s3://photos/none.jpg: not found"


def test_missing_credentials_are_one_line_that_says_where_to_put_them(s3, monkeypatch):
    _bucket(s3, objects={"a.jpg": b"x"})
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(StorageError) as e:
        read_bytes("s3://photos/a.jpg")
    assert e.value.kind == NO_CREDENTIALS and "\n" not in str(e.value)
    assert "no credentials found" in str(e.value) and "AWS_ACCESS_KEY_ID" in str(e.value)


def test_access_denied_is_one_line(s3):
    _bucket(s3, objects={"a.jpg": b"x"})
    s3.auth(True)  # the server now checks credentials: the test keys are unknown to it
    for attempt in (lambda: read_bytes("s3://photos/a.jpg"), lambda: write_bytes("s3://photos/b.jpg", b"y"),
                    lambda: list_files("s3://photos", SUFFIXES)):
        with pytest.raises(StorageError) as e:
            attempt()
        assert e.value.kind == DENIED and "access denied (" in str(e.value) and "\n" not in str(e.value)
    s3.auth(False)
    assert not exists("s3://photos/b.jpg")  # the refused write wrote nothing
    assert read_bytes("s3://photos/a.jpg") == b"x"


@pytest.fixture
def one_try_per_seglabel_try(monkeypatch):
    """botocore and s3fs retry inside each of seglabel's tries; with theirs at one, every
    connection the proxy counts is one of seglabel's tries."""
    import s3fs

    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    monkeypatch.setattr(s3fs.S3FileSystem, "retries", 1)
    monkeypatch.setenv("SEGLABEL_STORAGE_TRIES", "3")
    monkeypatch.setenv("SEGLABEL_STORAGE_BACKOFF", "0.01")


def _through_proxy(s3, monkeypatch, drop, tries, attempt):
    """``attempt()`` with the store behind a proxy that drops ``drop`` connections (None: all) and
    ``tries`` tries per operation: (what it returned or the StorageError, connections made)."""
    import s3fs
    from s3server import DroppingProxy

    proxy = DroppingProxy(s3.port, drop=drop)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
    s3fs.S3FileSystem.clear_instance_cache()  # a cached filesystem keeps the endpoint it was made with
    monkeypatch.setenv("SEGLABEL_STORAGE_TRIES", str(tries))
    try:
        got = attempt()
    except StorageError as e:
        got = e
    finally:
        proxy.close()
        monkeypatch.setenv("AWS_ENDPOINT_URL", s3.endpoint)
        s3fs.S3FileSystem.clear_instance_cache()
    return got, proxy.connections


def test_dropped_connections_are_retried(s3, monkeypatch, one_try_per_seglabel_try):
    _bucket(s3, objects={"a.jpg": b"photo bytes"})
    read = lambda: read_bytes("s3://photos/a.jpg")  # noqa: E731
    failed, _ = _through_proxy(s3, monkeypatch, 2, 1, read)
    assert isinstance(failed, StorageError) and failed.kind == TRANSIENT  # one try: the drops win
    got, _ = _through_proxy(s3, monkeypatch, 2, 3, read)
    assert got == b"photo bytes"  # three tries: seglabel's retries get through


def test_a_connection_that_keeps_dropping_is_one_line_after_the_documented_tries(s3, monkeypatch,
                                                                                 one_try_per_seglabel_try):
    _bucket(s3, objects={"a.jpg": b"x"})
    error, once = _through_proxy(s3, monkeypatch, None, 1, lambda: read_bytes("s3://photos/a.jpg"))
    error, thrice = _through_proxy(s3, monkeypatch, None, 3, lambda: read_bytes("s3://photos/a.jpg"))
    assert isinstance(error, StorageError) and error.kind == TRANSIENT and "\n" not in str(error)
    assert str(error).startswith("s3://photos/a.jpg: connection failed") and "gave up after 3 tries" in str(error)
    assert thrice == 3 * once  # each of seglabel's tries made the client's attempts again
    failed, _ = _through_proxy(s3, monkeypatch, None, 2, lambda: write_bytes("s3://photos/b.jpg", b"y"))
    assert isinstance(failed, StorageError) and failed.kind == TRANSIENT
    assert read_bytes("s3://photos/a.jpg") == b"x" and not exists("s3://photos/b.jpg")  # nothing lost, nothing half-written


def test_a_bad_retry_setting_is_refused(s3, monkeypatch):
    monkeypatch.setenv("SEGLABEL_STORAGE_TRIES", "0")
    with pytest.raises(UsageError, match="SEGLABEL_STORAGE_TRIES"):
        read_bytes("s3://photos/a.jpg")


def _read_in_child(url, queue):
    queue.put(read_bytes(url))


def test_reading_works_in_a_forked_loader_process(s3):
    """Loader processes are forked from a process that has used the store already."""
    _bucket(s3, objects={"a.jpg": b"first", "b.jpg": b"second"})
    assert read_bytes("s3://photos/a.jpg") == b"first"
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_read_in_child, args=("s3://photos/b.jpg", queue))
    child.start()
    got = queue.get(timeout=60)
    child.join(timeout=60)
    assert got == b"second" and child.exitcode == 0
