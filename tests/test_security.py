"""Security properties that cut across the transports: secrets stay out of logs, ids and paths
cannot steer the worker outside its folders, and what a request may cost is bounded."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import requests

from conftest import drop, mqtt_section, png_b64, read_record, wait_for, wait_record, write_config
from fluxworker.config import LimitsConfig
from fluxworker.errors import JobError
from fluxworker.jobs import JobSpec, parse_job

KEY = "correct-horse-battery-staple-4f1c"


def test_the_api_key_never_reaches_a_log(tmp_path, tiny_dir, server_factory):
    config = write_config(tmp_path, tiny_dir, http={"api_key": KEY}, worker={"log_level": "DEBUG"})
    server = server_factory(config)
    try:
        headers = {"Authorization": f"Bearer {KEY}"}
        assert requests.get(server.url + "/jobs", headers={"Authorization": "Bearer " + KEY[:-1] + "x"},
                            timeout=30).status_code == 401
        response = requests.post(server.url + "/generate", headers=headers, timeout=120,
                                 json={"prompt": "x", "width": 64, "height": 64})
        assert response.status_code == 200
        assert requests.get(server.url + "/metrics", headers={"X-API-Key": KEY}, timeout=30).status_code == 200
        wait_for(lambda: "done in" in server.log(), timeout=30, what="the job's log line")
    finally:
        server.kill()
    text = server.log()
    assert "job " in text  # the log has content
    assert KEY not in text and KEY[:-1] not in text
    check = subprocess.run([sys.executable, "-m", "fluxworker", "check-config", "--config", str(config)],
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 0 and "api_key: <hidden>" in check.stdout
    assert KEY not in check.stdout + check.stderr


def test_no_job_field_is_a_file_path():
    """Images travel as data, never as paths: a path in an image field is refused, not opened."""
    string_fields = {name for name, field in JobSpec.model_fields.items() if "str" in str(field.annotation)}
    assert string_fields == {"id", "prompt", "image", "mask"}
    for value in ("/etc/passwd", "file:///etc/passwd", "../../config.yaml", "~/.ssh/id_rsa"):
        try:
            parse_job({"prompt": "x", "image": value}, LimitsConfig())
        except JobError as error:
            assert error.field == "image" and error.code in ("invalid_base64", "invalid_image")
        else:
            raise AssertionError(f"{value!r} was accepted as an image")


def files_under(folder):
    """Every path under ``folder``, recursively (links are listed, not followed)."""
    return {Path(root, name) for root, dirs, files in os.walk(folder) for name in dirs + files}


HOSTILE_IDS = ("../escape", "a/b", "..", ".hidden", "x" * 65, "a\u0000b", "C:\\x")


def test_ids_that_would_leave_the_folders_are_refused_on_every_way_in(tmp_path, tiny_dir, server_factory, broker,
                                                                      probe_factory):
    server = server_factory(write_config(tmp_path, tiny_dir, mqtt=mqtt_section(broker)))
    probe = probe_factory(broker, topics=["fluxworker/#"])
    probe.wait_message("fluxworker/status", lambda m: m.payload == b"online", timeout=60)
    before = files_under(tmp_path.parent)
    for bad in HOSTILE_IDS:
        response = requests.post(server.url + "/generate", json={"id": bad, "prompt": "x"}, timeout=30)
        assert response.status_code == 400 and response.json()["error"]["field"] == "id", bad
    for bad in ("..%2F..%2Fconfig", "%2e%2e", "a%00b"):
        assert requests.get(f"{server.url}/jobs/{bad}", timeout=30).status_code == 404
    # MQTT: each refused on the errors topic, naming the field.
    for bad in ("../x", *HOSTILE_IDS):
        probe.publish("fluxworker/jobs", {"id": bad, "prompt": "x", "width": 64, "height": 64})
    errors = probe.wait_for(lambda p: len(p.payloads("fluxworker/errors")) == len(HOSTILE_IDS) + 1
                            and p.payloads("fluxworker/errors"), timeout=30, what="an error for each hostile id")
    assert [(e["id"], e["error"]["field"]) for e in errors] == [(None, "id")] * len(errors)
    assert all(e["error"]["code"] and e["error"]["message"] for e in errors)
    # An inbox file with a hostile id inside: refused into failed/, nothing written elsewhere.
    drop(tmp_path / "inbox", {"id": "../../outside", "prompt": "x"}, name="hostile.json")
    record = wait_record(tmp_path / "outputs", "hostile")
    assert record["status"] == "failed" and record["error"]["field"] == "id"
    # What the worker and the API wrote, they wrote into the inbox and outputs (the broker keeps its own).
    added = files_under(tmp_path.parent) - before
    allowed = [tmp_path / "inbox", tmp_path / "outputs", tmp_path / "broker"]
    assert added and all(any(path.is_relative_to(folder) for folder in allowed) for path in added), sorted(added)
    assert not any(part.startswith("..") or part in ("x", "x.json", "escape.json", "outside.json")
                   for path in added for part in path.relative_to(tmp_path).parts), sorted(added)
    assert not (tmp_path.parent / "outside.json").exists() and not (tmp_path / "x.json").exists()


def reads_change_atime(folder) -> bool:
    """Whether reading a file moves its access time on this file system (relatime does when the
    access time is older than the modification time; noatime never does)."""
    probe = folder / "atime-probe"
    probe.write_text("x")
    stat = probe.stat()
    os.utime(probe, (stat.st_mtime - 3600, stat.st_mtime))
    probe.read_text()
    return probe.stat().st_atime > stat.st_mtime - 3600


def test_a_symlink_in_the_inbox_is_neither_run_nor_read(tmp_path, tiny_dir, worker_factory):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    target = outside / "job.json"
    target.write_text(json.dumps({"id": "evil", "prompt": "x", "width": 64, "height": 64}))
    stat = target.stat()
    os.utime(target, (stat.st_mtime - 3600, stat.st_mtime))  # an access time any read would move
    before = target.stat()
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / "evil.json").symlink_to(target)  # there at start: the first scan sees it
    worker = worker_factory(write_config(tmp_path, tiny_dir))
    (inbox / "passwd.json").symlink_to("/etc/passwd")  # arrives while the worker runs: a file event
    time.sleep(2.5)  # two rescans
    drop(inbox, {"id": "next", "prompt": "x", "width": 64, "height": 64, "num_inference_steps": 1})
    assert wait_record(tmp_path / "outputs", "next")["status"] == "done"
    time.sleep(1.5)  # one more rescan after the job
    assert worker.proc.poll() is None and worker.status()["state"] == "idle"
    outputs = tmp_path / "outputs"
    assert sorted(p.name for p in outputs.iterdir()) == ["next.json", "next.png"]
    assert sorted(p.name for p in inbox.iterdir() if p.is_symlink()) == ["evil.json", "passwd.json"]
    assert not any((inbox / "failed").iterdir())
    assert [name for name in os.listdir(inbox / "processing") if not name.startswith(".")] == []
    after = target.stat()
    assert (after.st_mtime_ns, after.st_size) == (before.st_mtime_ns, before.st_size)
    assert json.loads(target.read_text())["id"] == "evil"
    if reads_change_atime(outside):
        assert after.st_atime_ns == before.st_atime_ns, "the worker read the file behind the link"
    assert "root:" not in worker.log()


def test_the_api_trusts_no_symlink_in_the_inbox_or_outputs(tmp_path, tiny_dir, server_factory):
    server = server_factory(write_config(tmp_path, tiny_dir))
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "job.json").write_text(json.dumps({"id": "evil", "type": "upscale", "image": "x"}))
    (outside / "record.json").write_text(json.dumps({"id": "gone", "status": "done", "url": "/outputs/gone.png"}))
    (tmp_path / "inbox" / "evil.json").symlink_to(outside / "job.json")
    (tmp_path / "outputs" / "gone.json").symlink_to(outside / "record.json")

    # Neither a queued job (which would refuse the id as another type's) nor a finished one.
    response = requests.post(server.url + "/generate", timeout=120, json={
        "id": "evil", "prompt": "x", "width": 64, "height": 64, "num_inference_steps": 1})
    assert response.status_code == 200, response.text
    assert read_record(tmp_path / "outputs", "evil")["status"] == "done"
    assert json.loads((outside / "job.json").read_text())["type"] == "upscale"
    assert requests.get(server.url + "/jobs/gone", timeout=30).status_code == 404


def test_request_costs_are_bounded_by_configuration(tmp_path, tiny_dir, server_factory):
    config = write_config(tmp_path, tiny_dir, http={"max_body_bytes": 200_000},
                          limits={"max_width": 256, "max_height": 256, "max_image_pixels": 128 * 128,
                                  "max_prompt_length": 100})
    server = server_factory(config)
    cases = [
        ({"prompt": "x", "width": 320}, 400, "out_of_range"),
        ({"prompt": "x" * 101, "width": 64, "height": 64}, 400, "invalid_length"),
        ({"prompt": "x", "width": 64, "height": 64, "image": png_b64((200, 200))}, 400, "image_too_large"),
        ({"prompt": "x", "width": 64, "height": 64, "num_inference_steps": 50}, 400, "out_of_range"),
        ({"prompt": "x", "image": "A" * 300_000}, 413, "too_large"),
    ]
    for body, status, code in cases:
        response = requests.post(server.url + "/generate", json=body, timeout=60)
        assert (response.status_code, response.json()["error"]["code"]) == (status, code), body
    # A declared length over the limit is refused before the body is read.
    import http.client

    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    connection.putrequest("POST", "/generate")
    connection.putheader("Content-Type", "application/json")
    connection.putheader("Content-Length", str(10**9))
    connection.endheaders()
    response = connection.getresponse()
    assert response.status == 413 and json.loads(response.read())["error"]["code"] == "too_large"
    connection.close()
