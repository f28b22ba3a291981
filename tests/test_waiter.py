"""Waiting on completion records through file events, on real folders."""

import threading
import time

import pytest

from fluxworker.config import LimitsConfig
from fluxworker.inbox import Inbox
from fluxworker.jobs import parse_job
from fluxworker.waiter import CompletionWaiter


@pytest.fixture
def inbox(tmp_path):
    box = Inbox(tmp_path / "inbox", tmp_path / "outputs")
    box.ensure()
    return box


def submit(inbox, job_id):
    inbox.submit(parse_job({"prompt": "x", "id": job_id}, LimitsConfig()).spec)


def test_wait_returns_none_after_the_timeout(inbox):
    with CompletionWaiter(inbox) as waiter:
        started = time.monotonic()
        assert waiter.wait("never", timeout=0.3) is None
        assert time.monotonic() - started >= 0.3


def test_wait_wakes_on_the_record_and_reports_states_on_the_way(inbox):
    submit(inbox, "later")
    seen = []

    def worker_side():
        time.sleep(0.2)
        path = inbox.claim("later.json")
        inbox.write_status({"state": "running", "job": {"id": "later", "step": 1, "total": 2}})
        time.sleep(0.2)
        inbox.finish(path, {"id": "later", "status": "done"})

    thread = threading.Thread(target=worker_side)
    # A poll interval far longer than the test proves that file events, not polling, wake it.
    with CompletionWaiter(inbox, poll_interval=30) as waiter:
        thread.start()
        record = waiter.wait("later", timeout=10, on_state=seen.append)
    thread.join()
    assert record["status"] == "done"
    assert seen[0] == {"id": "later", "status": "queued", "position": 1}
    assert {"id": "later", "status": "running", "step": 1, "total": 2} in seen


def test_many_threads_wait_on_one_watcher(inbox):
    ids = [f"many-{n}" for n in range(10)]
    for job_id in ids:
        submit(inbox, job_id)
    results = {}
    with CompletionWaiter(inbox, poll_interval=30) as waiter:
        threads = [threading.Thread(target=lambda j=j: results.__setitem__(j, waiter.wait(j, timeout=10)))
                   for j in ids]
        for thread in threads:
            thread.start()
        for job_id in ids:
            inbox.finish(inbox.claim(f"{job_id}.json"), {"id": job_id, "status": "done"})
        for thread in threads:
            thread.join(timeout=15)
    assert {job_id: r["status"] for job_id, r in results.items()} == {job_id: "done" for job_id in ids}
