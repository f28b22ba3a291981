"""Outputs full or read-only: jobs wait with a clear error, the worker stays up and resumes by
itself. A real tmpfs is mounted for outputs/ (needs root, as in CI)."""

import os
import subprocess
import time

import pytest
import requests

from conftest import drop, read_record, wait_for, wait_record, write_config

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")


@pytest.fixture
def small_outputs(tmp_path):
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(outputs)], check=True, timeout=30)
    yield outputs
    subprocess.run(["umount", "-l", str(outputs)], timeout=30)


def remount(path, options):
    subprocess.run(["mount", "-o", f"remount,{options}", str(path)], check=True, timeout=30)


def noisy_job(job_id):
    # 256x256 of noise makes a PNG far larger than 64 kB.
    return {"id": job_id, "prompt": "noise", "width": 256, "height": 256, "num_inference_steps": 1, "seed": 1}


def runs(worker, job_id) -> int:
    """How many times the worker ran a job to completion, once its log says so (the log line
    follows the completion record)."""
    def count():
        return worker.log().count(f"job {job_id} type=generate engine=flux done in")

    wait_for(count, timeout=10, what=f"{job_id} in the worker's log")
    time.sleep(1.0)  # two rescans: time for a second run, if any
    return count()


@needs_root
@pytest.mark.parametrize("fault", ["full", "read-only"])
def test_outputs_that_cannot_be_written_block_jobs_clearly_until_they_can(tmp_path, tiny_dir, small_outputs,
                                                                            server_factory, fault):
    config = write_config(tmp_path, tiny_dir, inbox={"scan_interval": 0.5})
    server = server_factory(config)
    if fault == "read-only":
        remount(small_outputs, "ro")
    response = requests.post(server.url + "/generate", json=noisy_job("blocked-1"), timeout=120)
    assert response.status_code == 503, response.text
    body = response.json()
    assert body["error"]["code"] == "outputs_unwritable" and body["id"] == "blocked-1"
    assert "outputs" in body["error"]["message"]
    ready = requests.get(server.url + "/ready", timeout=30)
    assert ready.status_code == 503 and ready.json()["error"]["code"] == "outputs_unwritable"
    refused = requests.post(server.url + "/generate", json=noisy_job("blocked-2"), timeout=60)
    assert refused.status_code == 503 and int(refused.headers["Retry-After"]) > 0
    assert requests.get(server.url + "/jobs/blocked-1", timeout=30).json()["status"] == "queued"
    # A job dropped straight into the inbox meanwhile waits in the queue too.
    drop(tmp_path / "inbox", noisy_job("dropped-1"))
    time.sleep(1.5)  # three rescans
    assert server.status()["state"] == "blocked"
    assert (tmp_path / "inbox" / "dropped-1.json").exists() and read_record(small_outputs, "dropped-1") is None
    assert server.proc.poll() is None

    remount(small_outputs, "rw,size=16m")
    record = wait_record(small_outputs, "blocked-1", timeout=60)
    assert record["status"] == "done"
    assert (small_outputs / "blocked-1.png").stat().st_size > 64 * 1024
    assert wait_record(small_outputs, "dropped-1", timeout=60)["status"] == "done"
    assert runs(server, "dropped-1") == 1
    wait_for(lambda: requests.get(server.url + "/ready", timeout=30).status_code == 200, timeout=30)
    assert requests.post(server.url + "/generate", json=noisy_job("after"), timeout=120).status_code == 200
    assert "can be written again" in server.log()


@needs_root
@pytest.mark.parametrize("fault", ["full", "read-only"])
def test_a_job_dropped_in_the_inbox_while_outputs_cannot_be_written_waits_then_runs_once(
        tmp_path, tiny_dir, small_outputs, worker_factory, fault):
    worker = worker_factory(write_config(tmp_path, tiny_dir, inbox={"scan_interval": 0.5}))
    if fault == "read-only":
        remount(small_outputs, "ro")
    inbox = tmp_path / "inbox"
    drop(inbox, noisy_job("dropped"))
    # It runs, its image does not fit: back to the queue, and the worker says why.
    status = wait_for(lambda: (now := worker.status()).get("state") == "blocked" and now, timeout=60,
                      what="the worker blocked")
    assert status["error"]["code"] == "outputs_unwritable" and str(small_outputs) in status["error"]["message"]
    assert status["ready"] is False
    time.sleep(1.5)  # three rescans: it stays queued and is not run again meanwhile
    assert (inbox / "dropped.json").exists() and not (inbox / "processing" / "dropped.json").exists()
    assert worker.status()["state"] == "blocked" and worker.proc.poll() is None
    assert read_record(small_outputs, "dropped") is None and not any((inbox / "failed").iterdir())
    assert worker.log().count("job dropped put back in the queue") == 1

    remount(small_outputs, "rw,size=16m")
    record = wait_record(small_outputs, "dropped", timeout=60)
    assert record["status"] == "done" and record["seed"] == 1
    assert runs(worker, "dropped") == 1
    assert worker.status()["state"] == "idle"
    assert sorted(os.listdir(small_outputs)) == ["dropped.json", "dropped.png"]
    assert not (inbox / "dropped.json").exists() and not any((inbox / "failed").iterdir())
    assert [name for name in os.listdir(inbox / "processing") if not name.startswith(".")] == []


def test_polling_mode_serves_the_inbox(tmp_path, tiny_dir, worker_factory):
    config = write_config(tmp_path, tiny_dir, inbox={"polling": True, "scan_interval": 30})
    worker = worker_factory(config)
    started = time.monotonic()
    drop(tmp_path / "inbox", {"id": "polled", "prompt": "x", "width": 64, "height": 64})
    assert wait_record(tmp_path / "outputs", "polled", timeout=60)["status"] == "done"
    assert time.monotonic() - started < 25  # found by the polling observer, not the 30 s rescan
    assert worker.proc.poll() is None
