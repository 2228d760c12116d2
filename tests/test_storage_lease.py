"""The lease that keeps runs on different machines apart on an object store (storage/lease.py),
against a real S3 API (moto's server on 127.0.0.1). Staleness is tested through the clock offset
(the store's clock said to be ahead), never by waiting."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading

import pytest

from seglabel.errors import UsageError
from seglabel.storage import Lease, LeaseHeld, LeaseLost, check_conditional_writes, exists, list_files, read_bytes
from seglabel.storage.lease import machine_id

URL = "s3://labels/run/.lock"


@pytest.fixture
def bucket(s3):
    s3.client().create_bucket(Bucket="labels")
    return s3


def test_the_store_is_checked_once_and_its_clock_measured(bucket):
    offset = check_conditional_writes("s3://labels/run")
    assert abs(offset) < 120  # the server runs on this machine: its clock is ours, to its 1 s resolution
    assert list_files("s3://labels/run") == []  # the probe is gone


def test_a_store_without_conditional_writes_is_refused():
    with pytest.raises(UsageError, match="conditional writes"):
        check_conditional_writes("memory://labels/run")


def test_a_second_run_is_refused_while_the_first_holds_the_lease(bucket):
    first = Lease(URL, "annotate")
    first.take()
    try:
        holder = json.loads(read_bytes(URL))
        assert holder["pid"] == os.getpid() and holder["what"] == "annotate"
        with pytest.raises(LeaseHeld) as e:
            Lease(URL, "shard 1 of 2").take()
        message = str(e.value)
        assert message.startswith("s3://labels/run/.lock: another seglabel run is writing here (annotate, ")
        assert f"pid {os.getpid()}" in message and "\n" not in message
        assert e.value.exit_code == 2
        first.check()
    finally:
        first.release()
    assert not exists(URL)
    with Lease(URL, "shard 1 of 2") as second:  # released: the next run takes it
        second.check()
    assert not exists(URL)


def test_a_lease_not_renewed_for_its_ttl_is_taken_over(bucket, caplog):
    stalled = Lease(URL, "annotate", ttl=60)
    stalled.take()
    stalled._stop.set()  # as if its process hung: no more renewals
    late = Lease(URL, "annotate", ttl=60, clock_offset=120)  # the store's clock 2 minutes on
    with caplog.at_level(logging.INFO, logger="seglabel"):
        late.take()
    assert "took over a stale lease" in caplog.text and "not renewed for" in caplog.text
    assert json.loads(read_bytes(URL))["token"] == late.token
    assert stalled.renew() is False  # the stalled run finds out at its next beat...
    with pytest.raises(LeaseLost, match="another run took over this lease"):
        stalled.check()  # ...and stops before its next write
    stalled.release()
    assert exists(URL)  # a lost lease is not the stalled run's to delete
    late.release()
    assert not exists(URL)


def test_a_lease_of_a_process_of_this_machine_that_ended_is_taken_at_once(bucket):
    if not machine_id():
        pytest.skip("this system does not say which machine and PID namespace a process runs in")
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(ended.stdout)
    bucket.client().put_object(Bucket="labels", Key="run/.lock", Body=json.dumps(
        {"seglabel_lease": 1, "token": "old", "what": "annotate", "host": "here", "pid": dead,
         "machine": machine_id(), "ttl_s": 60}).encode())
    with Lease(URL, "annotate") as lease:
        assert json.loads(read_bytes(URL))["token"] == lease.token


def test_a_lease_of_another_machine_is_not_taken_while_fresh(bucket):
    bucket.client().put_object(Bucket="labels", Key="run/.lock", Body=json.dumps(
        {"seglabel_lease": 1, "token": "other", "what": "shard 0 of 4", "host": "node17", "pid": 1,
         "machine": "node17/boot/1", "ttl_s": 60}).encode())
    with pytest.raises(LeaseHeld, match=r"\(shard 0 of 4, node17 pid 1, renewed \d+ s ago\)"):
        Lease(URL, "annotate").take()
    assert json.loads(read_bytes(URL))["token"] == "other"


def test_of_many_runs_starting_at_once_exactly_one_holds_the_lease(bucket):
    results: list[str] = []
    start = threading.Barrier(6)

    def run() -> None:
        lease = Lease(URL, "annotate")
        start.wait()
        try:
            lease.take()
            results.append(lease.token)
        except LeaseHeld:
            results.append("refused")

    threads = [threading.Thread(target=run) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    winners = [r for r in results if r != "refused"]
    assert len(results) == 6 and len(winners) == 1
    assert json.loads(read_bytes(URL))["token"] == winners[0]


def test_of_runs_replacing_one_stale_version_at_once_exactly_one_wins(bucket):
    """What taking over a stale lease rests on: replacing the version read is decided by the store."""
    from seglabel.storage import create, replace

    stale = create(URL, b"stale")
    results: list[str | None] = []
    start = threading.Barrier(6)

    def run(i: int) -> None:
        start.wait()
        results.append(replace(URL, f"run {i}".encode(), stale))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(results) == 6 and sum(r is not None for r in results) == 1
    assert read_bytes(URL).startswith(b"run ")


def test_renewal_keeps_the_lease_and_changes_its_version(bucket):
    lease = Lease(URL, "annotate")
    lease.take()
    try:
        before = lease.etag
        assert lease.renew() and lease.etag != before
        lease.check()
    finally:
        lease.release()


def test_a_bad_ttl_setting_is_refused(monkeypatch):
    monkeypatch.setenv("SEGLABEL_LEASE_SECONDS", "soon")
    with pytest.raises(UsageError, match="SEGLABEL_LEASE_SECONDS"):
        Lease(URL, "annotate")
