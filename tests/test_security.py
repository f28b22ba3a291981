"""Security properties that cut across the transports: secrets stay out of logs, ids and paths
cannot steer the worker outside its folders, and what a request may cost is bounded."""

import json
import os
import subprocess
import sys

import requests

from conftest import drop, wait_for, png_b64, wait_record, write_config
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


def test_ids_that_would_leave_the_folders_are_refused_on_every_way_in(tmp_path, tiny_dir, server_factory):
    server = server_factory(write_config(tmp_path, tiny_dir))
    for bad in ("../escape", "a/b", "..", ".hidden", "x" * 65, "a\u0000b", "C:\\x"):
        response = requests.post(server.url + "/generate", json={"id": bad, "prompt": "x"}, timeout=30)
        assert response.status_code == 400 and response.json()["error"]["field"] == "id", bad
    for bad in ("..%2F..%2Fconfig", "%2e%2e", "a%00b"):
        assert requests.get(f"{server.url}/jobs/{bad}", timeout=30).status_code == 404
    # An inbox file with a hostile id inside: refused into failed/, nothing written elsewhere.
    drop(tmp_path / "inbox", {"id": "../../outside", "prompt": "x"}, name="hostile.json")
    record = wait_record(tmp_path / "outputs", "hostile")
    assert record["status"] == "failed" and record["error"]["field"] == "id"
    assert not (tmp_path.parent / "outside.json").exists() and not (tmp_path / "outside.json").exists()
    assert sorted(os.listdir(tmp_path / "outputs")) == sorted(
        name for name in os.listdir(tmp_path / "outputs") if not name.startswith("..")
    )


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
