"""The folder protocol on real folders, without a worker process."""

import json
import os
import threading

import pytest

from fluxworker.config import LimitsConfig
from fluxworker.errors import JobError
from fluxworker.inbox import Inbox, WorkerBusy, is_job_name, write_atomic
from fluxworker.jobs import parse_job


@pytest.fixture
def inbox(tmp_path):
    box = Inbox(tmp_path / "inbox", tmp_path / "outputs")
    box.ensure()
    return box


def spec(job_id, **fields):
    return parse_job({"prompt": "x", "id": job_id, **fields}, LimitsConfig()).spec


def test_job_names_exclude_dotfiles_and_other_extensions():
    assert is_job_name("abc.json")
    assert not is_job_name(".abc.json")
    assert not is_job_name(".tmp-1-abc.json")
    assert not is_job_name("abc.json.tmp")
    assert not is_job_name("abc.txt")
    assert not is_job_name(".json")


def test_submit_writes_atomically_and_scan_lists_oldest_first(inbox):
    inbox.submit(spec("b"))
    inbox.submit(spec("a"))
    os.utime(inbox.root / "a.json", (1, 1))
    (inbox.root / ".partial.json").write_text("{")
    (inbox.root / "notes.txt").write_text("x")
    assert [entry.name for entry in inbox.scan()] == ["a.json", "b.json"]
    assert not [p for p in inbox.root.iterdir() if p.name.startswith(".tmp")]
    assert json.loads((inbox.root / "a.json").read_text()) == {"prompt": "x", "id": "a", "type": "generate"}


def test_only_one_of_many_claimers_wins(inbox):
    inbox.submit(spec("race"))
    wins = []
    barrier = threading.Barrier(8)

    def claim():
        barrier.wait()
        wins.append(inbox.claim("race.json"))

    threads = [threading.Thread(target=claim) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert len([w for w in wins if w is not None]) == 1
    assert (inbox.processing / "race.json").exists()


def test_recover_requeues_jobs_left_in_processing_and_gives_up_after_repeated_crashes(inbox):
    inbox.submit(spec("crashy"))
    for attempt in range(1, 3):
        assert inbox.claim("crashy.json") is not None
        requeued, poisoned = inbox.recover(max_attempts=3)
        assert requeued == ["crashy.json"] and poisoned == []
    inbox.claim("crashy.json")
    requeued, poisoned = inbox.recover(max_attempts=3)
    assert requeued == [] and poisoned == [inbox.processing / "crashy.json"]


def test_finish_writes_the_record_then_releases_the_job(inbox):
    inbox.submit(spec("ok"))
    path = inbox.claim("ok.json")
    inbox.finish(path, {"id": "ok", "status": "done", "url": "/outputs/ok.png"})
    assert inbox.completion("ok")["status"] == "done"
    assert not path.exists()
    assert inbox.state_of("ok")["status"] == "done"


def test_reject_moves_to_failed_with_the_error_beside_it(inbox):
    (inbox.root / "bad.json").write_text("[1, 2]")
    path = inbox.claim("bad.json")
    inbox.reject(path, JobError("invalid_job", "a job must be a JSON object"), "bad")
    assert (inbox.failed / "bad.json").read_text() == "[1, 2]"
    error = json.loads((inbox.failed / "bad.json.error.json").read_text())
    assert error == {"error": {"code": "invalid_job", "message": "a job must be a JSON object", "field": None}}
    assert inbox.completion("bad")["error"]["code"] == "invalid_job"


def test_failed_names_never_overwrite_each_other(inbox):
    for _ in range(2):
        (inbox.root / "dup.json").write_text("nope")
        inbox.reject(inbox.claim("dup.json"), JobError("invalid_json", "not valid JSON"), None)
    assert len([p for p in inbox.failed.iterdir() if not p.name.endswith(".error.json")]) == 2


def test_state_of_reports_queue_position_running_progress_and_unknown(inbox):
    for name in ("q1", "q2", "q3"):
        inbox.submit(spec(name))
    for index, name in enumerate(("q1", "q2", "q3")):
        os.utime(inbox.root / f"{name}.json", (index + 1, index + 1))
    inbox.claim("q1.json")
    inbox.write_status({"state": "running", "job": {"id": "q1", "step": 2, "total": 4}})
    assert inbox.state_of("q1") == {"id": "q1", "status": "running", "step": 2, "total": 4}
    assert inbox.state_of("q2") == {"id": "q2", "status": "queued", "position": 1}
    assert inbox.state_of("q3") == {"id": "q3", "status": "queued", "position": 2}
    assert inbox.state_of("nope") is None
    assert inbox.state_of("../etc/passwd") is None


def test_a_job_put_back_in_the_queue_while_it_is_looked_up_is_found(inbox, monkeypatch):
    """A worker starting up moves the job a crash left in processing/ back to the queue; a client
    asking about that job at that moment must hear "queued", not "unknown"."""
    inbox.submit(spec("back"))
    inbox.claim("back.json")
    scan = inbox.scan

    def scan_while_a_worker_recovers():
        entries = scan()
        inbox.recover(max_attempts=3)
        return entries

    monkeypatch.setattr(inbox, "scan", scan_while_a_worker_recovers)
    assert inbox.state_of("back") == {"id": "back", "status": "queued", "position": 1}


def test_a_second_worker_cannot_take_the_same_inbox(inbox, tmp_path):
    inbox.lock()
    try:
        with pytest.raises(WorkerBusy, match=str(os.getpid())):
            Inbox(tmp_path / "inbox", tmp_path / "outputs").lock()
    finally:
        inbox.unlock()
    other = Inbox(tmp_path / "inbox", tmp_path / "outputs")
    other.lock()
    other.unlock()


def test_write_atomic_leaves_no_temporary_file(tmp_path):
    write_atomic(tmp_path / "a.json", b"{}")
    write_atomic(tmp_path / "a.json", b'{"x": 1}', durable=False)
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]
    assert (tmp_path / "a.json").read_bytes() == b'{"x": 1}'


def test_a_claimed_file_is_parsed_once_unless_it_changed_after_the_ready_check(inbox, tmp_path, monkeypatch):
    from fluxworker import jobfiles
    from fluxworker.config import parse_config
    from fluxworker.metrics import JobMetrics

    parsed = []
    real_parse = jobfiles.parse_json
    monkeypatch.setattr(jobfiles, "parse_json", lambda raw, limit: parsed.append(raw) or real_parse(raw, limit))
    files = jobfiles.JobFiles(parse_config({}, tmp_path), inbox, JobMetrics(tmp_path / "m.json"),
                              lambda: None, 1 << 20)

    write_atomic(inbox.root / "same.json", b'{"prompt": "a fox"}')
    assert files.ready("same.json", os.stat(inbox.root / "same.json").st_mtime)
    assert files.read(inbox.claim("same.json")) == {"prompt": "a fox"}
    assert len(parsed) == 1  # the ready check's parse is reused

    # Replaced between the check and the claim (another inode): read again.
    write_atomic(inbox.root / "changed.json", b'{"prompt": "old"}')
    assert files.ready("changed.json", os.stat(inbox.root / "changed.json").st_mtime)
    write_atomic(inbox.root / "changed.json", b'{"prompt": "new"}')
    assert files.read(inbox.claim("changed.json")) == {"prompt": "new"}
    assert len(parsed) == 3
