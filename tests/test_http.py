"""The HTTP API on a real server (cheroot) on a free 127.0.0.1 port, with the tiny models."""

import base64
import http.client
import io
import json
import os
import signal
import socket
import threading

import numpy as np
import pytest
import requests
from PIL import Image

from conftest import ServerProcess, png_b64, wait_for, wait_record, write_config


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_dir, lama_file):
    folder = tmp_path_factory.mktemp("api")
    # threads and max_queue keep their defaults: the twenty concurrent requests below need no tuning
    config = write_config(folder, tiny_dir, http={"max_body_bytes": 1_000_000},
                          models={"esrgan": str(tiny_dir / "esrgan.pth"), "lama": str(lama_file)})
    server = ServerProcess(config).start()
    yield server
    server.kill()


def post(server, path, body, **kwargs):
    return requests.post(server.url + path, json=body, timeout=120, **kwargs)


def fetch_image(server, url) -> Image.Image:
    response = requests.get(server.url + url, timeout=30)
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "image/png"
    return Image.open(io.BytesIO(response.content))


def assert_error(response, status, code, field=None):
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"].startswith("application/json")
    assert response.headers["Access-Control-Allow-Origin"] == "*"
    error = response.json()["error"]
    assert error["code"] == code, error
    assert error["field"] == field
    assert error["message"]
    return error


def assert_done(server, job_id: str, **expected) -> dict:
    """GET /jobs/<id> answers the job's completion record: done, with the ``expected`` fields."""
    response = requests.get(server.url + f"/jobs/{job_id}", timeout=30)
    assert response.status_code == 200, response.text
    record = response.json()
    wanted = {"id": job_id, "status": "done", **expected}
    assert {key: record.get(key) for key in wanted} == wanted, record
    return record


def assert_documented(doc: dict, path: str, method: str, response) -> None:
    """The answer is one /openapi.json describes: its status is listed, its content type is one the
    status lists, its JSON body matches the schema, and the headers it marks required are there."""
    import jsonschema_rs

    answers = doc["paths"][path][method]["responses"]
    assert str(response.status_code) in answers, (path, method, response.status_code, sorted(answers))
    documented = answers[str(response.status_code)]
    content = documented.get("content", {})
    media_type = response.headers.get("Content-Type", "").split(";")[0].strip()
    if content:
        assert media_type in content, (path, method, response.status_code, media_type, sorted(content))
    else:
        assert not response.content, (path, method, response.status_code, response.content[:200])
    schema = content.get("application/json", {}).get("schema")
    if schema is not None:
        validator = jsonschema_rs.validator_for({**schema, "components": doc["components"]})
        errors = [f"{list(e.instance_path)}: {e.message}" for e in validator.iter_errors(response.json())]
        assert not errors, (path, method, response.status_code, errors, response.text)
    for name, header in documented.get("headers", {}).items():
        assert not header.get("required") or name in response.headers, (path, name, dict(response.headers))


# -- the API document's own examples ------------------------------------------------------------


def test_the_documents_javascript_example(server):
    response = post(server, "/generate", {
        "prompt": "A neon sign in a rainy street", "no_text": True, "width": 512, "height": 512})
    assert response.status_code == 200
    body = response.json()
    assert set(body) >= {"url", "seed"}
    assert body["url"].startswith("/outputs/") and body["url"].endswith(".png")
    assert isinstance(body["seed"], int)
    assert fetch_image(server, body["url"]).size == (512, 512)


def test_the_documents_python_example_uses_the_default_size(server):
    response = post(server, "/generate", {
        "prompt": "An oil painting of a cat", "num_inference_steps": 4, "performance_mode": "fast"})
    assert response.status_code == 200
    assert fetch_image(server, response.json()["url"]).size == (1024, 1024)


def test_the_documents_upscale_example(server):
    response = post(server, "/upscale", {"image": png_b64((32, 24))})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["url"].startswith("/outputs/upscale_") and body["url"].endswith(".png")
    assert "seed" not in body
    assert fetch_image(server, body["url"]).size == (128, 96)
    assert_done(server, body["id"], type="upscale", model="esrgan", width=128, height=96, url=body["url"])


# -- fields and defaults -------------------------------------------------------------------------


def test_defaults_are_the_documented_ones(server):
    implicit = post(server, "/generate", {"prompt": "defaults", "seed": 5, "width": 64, "height": 64}).json()
    explicit = post(server, "/generate", {
        "prompt": "defaults", "seed": 5, "width": 64, "height": 64, "num_inference_steps": 4, "no_text": False,
        "performance_mode": "balanced", "image": None, "mask": None, "strength": 0.6, "model": "flux"}).json()
    assert implicit["url"] != explicit["url"]
    a = requests.get(server.url + implicit["url"], timeout=30).content
    b = requests.get(server.url + explicit["url"], timeout=30).content
    assert a == b


def test_the_returned_seed_reproduces_the_image(server):
    first = post(server, "/generate", {"prompt": "reproduce me", "width": 128, "height": 64}).json()
    again = post(server, "/generate", {"prompt": "reproduce me", "width": 128, "height": 64,
                                       "seed": first["seed"]}).json()
    other = post(server, "/generate", {"prompt": "reproduce me", "width": 128, "height": 64,
                                       "seed": (first["seed"] + 1) % 2**32}).json()
    images = [requests.get(server.url + r["url"], timeout=30).content for r in (first, again, other)]
    assert images[0] == images[1] != images[2]


def test_image_to_image_and_flux_inpainting(server):
    img2img = post(server, "/generate", {"prompt": "x", "image": png_b64((90, 60)), "strength": 0.5,
                                         "width": 128, "height": 64})
    assert img2img.status_code == 200, img2img.text
    assert fetch_image(server, img2img.json()["url"]).size == (128, 64)
    inpaint = post(server, "/generate", {"prompt": "x", "image": png_b64((64, 64)), "model": "flux",
                                         "mask": png_b64((64, 64), color=(255, 255, 255)), "width": 64, "height": 64})
    assert inpaint.status_code == 200, inpaint.text


def data_url(image: Image.Image) -> str:
    """``image`` as a PNG data URL, the way a browser sends a canvas."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def test_lama_erase_through_the_api(server):
    """A white rectangle in the mask: LaMa (random weights) fills it; every other pixel comes back
    as it was sent, at the image's own size (odd, and not the job's width and height)."""
    image = Image.effect_noise((41, 30), 60).convert("RGB")
    mask = Image.new("L", image.size, 0)
    mask.paste(255, (12, 8, 28, 21))
    response = post(server, "/generate", {"model": "lama", "image": data_url(image), "mask": data_url(mask)})
    assert response.status_code == 200, response.text
    body = response.json()
    assert isinstance(body["seed"], int)
    erased = fetch_image(server, body["url"])
    assert erased.size == image.size and erased.mode == "RGB"
    sent, got, hole = np.asarray(image), np.asarray(erased), np.asarray(mask) == 255
    assert np.array_equal(got[~hole], sent[~hole])
    assert not np.array_equal(got[hole], sent[hole])  # the model ran
    assert_done(server, body["id"], type="generate", model="lama", width=41, height=30, url=body["url"])


def test_a_generate_answer_always_has_an_integer_seed(server):
    """A LaMa record written before LaMa recorded its seed has "seed": null; the answer still
    carries an integer, as the API document and /openapi.json promise."""
    record = {"id": "old-lama", "type": "generate", "status": "done", "url": "/outputs/old-lama.png",
              "file": "old-lama.png", "seed": None, "model": "lama", "width": 40, "height": 30}
    (server.folder / "outputs" / "old-lama.json").write_text(json.dumps(record))
    response = post(server, "/generate", {"id": "old-lama", "model": "lama", "image": png_b64(), "mask": png_b64()})
    assert response.status_code == 200, response.text
    assert response.json() == {"url": "/outputs/old-lama.png", "id": "old-lama", "seed": 0}


def test_an_id_makes_a_post_idempotent(server):
    body = {"id": "idem-1", "prompt": "x", "width": 64, "height": 64}
    first = post(server, "/generate", body).json()
    second = post(server, "/generate", {**body, "seed": 1}).json()
    assert first == second


def test_an_id_of_one_endpoint_is_refused_by_the_other(server):
    upscaled = post(server, "/upscale", {"id": "cross-1", "image": png_b64((16, 16))})
    assert upscaled.status_code == 200, upscaled.text
    error = assert_error(post(server, "/generate", {"id": "cross-1", "prompt": "x"}), 409, "id_in_use", "id")
    assert "upscale" in error["message"]
    assert post(server, "/upscale", {"id": "cross-1", "image": png_b64((16, 16))}).json() == upscaled.json()
    generated = post(server, "/generate", {"id": "cross-2", "prompt": "x", "width": 64, "height": 64})
    assert generated.status_code == 200
    assert_error(post(server, "/upscale", {"id": "cross-2", "image": png_b64()}), 409, "id_in_use", "id")


def test_a_generate_id_may_not_take_the_upscale_output_prefix(server):
    error = assert_error(post(server, "/generate", {"id": "upscale_cross-1", "prompt": "x"}), 400, "invalid_id", "id")
    assert "upscale_" in error["message"]


def test_null_fields_take_their_defaults(server):
    """React forms send null for empty inputs: null is the same as leaving the field out."""
    plain = post(server, "/generate", {"prompt": "nulls", "seed": 9, "width": 64, "height": 64})
    nulls = post(server, "/generate", {
        "prompt": "nulls", "seed": 9, "width": 64, "height": 64, "num_inference_steps": None, "strength": None,
        "no_text": None, "performance_mode": None, "model": None, "wait": None, "type": None, "image": None,
        "mask": None, "id": None})
    assert nulls.status_code == 200, nulls.text
    assert requests.get(server.url + nulls.json()["url"], timeout=30).content == requests.get(
        server.url + plain.json()["url"], timeout=30).content
    assert_error(post(server, "/generate", {"prompt": "x", "seed": -1}), 400, "out_of_range", "seed")
    assert "null" in post(server, "/generate", {"prompt": "x", "seed": -1}).json()["error"]["message"]


# -- errors --------------------------------------------------------------------------------------


def test_malformed_json_is_400(server):
    response = requests.post(server.url + "/generate", data=b"{not json",
                             headers={"Content-Type": "application/json"}, timeout=30)
    assert_error(response, 400, "invalid_json")


def test_a_body_that_is_not_an_object_is_400(server):
    assert_error(post(server, "/generate", [1, 2]), 400, "invalid_job")


def test_a_wrong_content_type_is_415(server):
    response = requests.post(server.url + "/generate", data="prompt=x",
                             headers={"Content-Type": "application/x-www-form-urlencoded"}, timeout=30)
    assert_error(response, 415, "unsupported_media_type")


def test_an_oversized_body_is_413(server):
    response = post(server, "/generate", {"prompt": "x", "image": "A" * 1_200_000})
    assert_error(response, 413, "too_large")


def test_field_errors_are_400_with_the_field(server):
    assert_error(post(server, "/generate", {"prompt": "x", "num_inference_steps": 11}), 400, "out_of_range",
                 "num_inference_steps")
    assert_error(post(server, "/generate", {"prompt": "x", "width": 100}), 400, "not_multiple_of_64", "width")
    assert_error(post(server, "/generate", {}), 400, "missing_field", "prompt")
    assert_error(post(server, "/generate", {"prompt": "x", "image": "@@"}), 400, "invalid_base64", "image")
    assert_error(post(server, "/generate", {"prompt": "x", "wait": "no"}), 400, "invalid_type", "wait")
    assert_error(post(server, "/upscale", {"image": png_b64(), "prompt": "x"}), 400, "unexpected_field", "prompt")
    assert_error(post(server, "/upscale", {}), 400, "missing_field", "image")
    assert_error(post(server, "/generate", {"type": "upscale", "image": png_b64()}), 400, "unexpected_field", "type")


def test_unknown_fields_are_rejected(server):
    assert_error(post(server, "/generate", {"prompt": "x", "steps": 4}), 400, "unknown_field", "steps")


def test_unknown_paths_and_methods_are_json(server):
    assert_error(requests.get(server.url + "/nowhere", timeout=30), 404, "not_found")
    response = requests.put(server.url + "/generate", timeout=30)
    assert_error(response, 405, "method_not_allowed")
    assert response.headers["Allow"] == "POST, OPTIONS"
    response = requests.post(server.url + "/jobs/x", timeout=30)
    assert_error(response, 405, "method_not_allowed")
    assert response.headers["Allow"] == "GET, HEAD, OPTIONS"
    queued = requests.post(server.url + "/generate", timeout=30, json={
        "id": "head-1", "prompt": "x", "width": 64, "height": 64, "num_inference_steps": 1, "wait": False})
    assert queued.status_code == 202
    head = requests.head(server.url + "/jobs/head-1", timeout=30)
    assert head.status_code == 200 and head.content == b""
    options = requests.options(server.url + "/health", timeout=30)
    assert options.status_code == 204 and options.headers["Allow"] == "GET, HEAD, OPTIONS"


def raw_request(server, data: bytes, half_close: bool = False) -> tuple[int, dict, bytes]:
    """Send bytes as they are (clients such as requests only send well-formed HTTP) and read the
    answer: status, headers (lower-case names) and body. Bounded by the socket timeout."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=60) as sock:
        sock.sendall(data)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        answer = b""
        for _ in range(10_000):
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines[1:])}
    length = int(headers.get("content-length", len(body)))
    return int(lines[0].split()[1]), headers, body[:length]


POST_HEAD = b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"


@pytest.mark.parametrize("request_bytes, half_close, status, code", [
    (POST_HEAD + b"Content-Length: -5\r\n\r\n{}", False, 400, "invalid_body"),
    (POST_HEAD + b'Content-Length: 50\r\n\r\n{"prompt": "x", "wait": false}', True, 400, "invalid_body"),
    (POST_HEAD + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n", False, 400, "invalid_body"),
    (POST_HEAD + b"Content-Length: abc\r\n\r\n{}", False, 400, "invalid_body"),
    (b"POST //generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}",
     False, 400, "bad_request"),
    (b"GET /outputs/a%00.png HTTP/1.1\r\nHost: x\r\n\r\n", False, 404, "not_found"),
    (b"GET /jobs/%ff HTTP/1.1\r\nHost: x\r\n\r\n", False, 404, "unknown_job"),
    (b"GET /jobs/%ffidem-1 HTTP/1.1\r\nHost: x\r\n\r\n", False, 404, "unknown_job"),
    (b"GET /nowhere HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\n", True, 404, "not_found"),
])
def test_malformed_requests_get_a_json_error_and_never_a_500(server, request_bytes, half_close, status, code):
    answer_status, headers, body = raw_request(server, request_bytes, half_close)
    assert answer_status == status, body
    assert headers["content-type"] == "application/json"
    assert headers["access-control-allow-origin"] == "*"
    assert json.loads(body)["error"]["code"] == code
    if status == 400:
        assert headers["connection"] == "close"  # what is left of the body is not a request
    assert "Traceback" not in server.log()
    assert requests.get(server.url + "/health", timeout=30).status_code == 200


def test_a_body_the_client_stops_sending_is_400(tmp_path, tiny_dir):
    """The body read ends with the socket timeout (30 s on the real server): the same answer as a
    short body, through the WSGI interface so the test does not wait for it."""
    from wsgiref.util import setup_testing_defaults

    from fluxworker.config import load_config
    from fluxworker.http import Api

    class Stalled(io.RawIOBase):
        def read(self, size=-1):
            raise TimeoutError("timed out")

    api = Api(load_config(write_config(tmp_path, tiny_dir)))
    environ = {"REQUEST_METHOD": "POST", "PATH_INFO": "/generate", "CONTENT_TYPE": "application/json",
               "CONTENT_LENGTH": "50"}
    setup_testing_defaults(environ)
    environ["wsgi.input"] = Stalled()
    answer = {}
    body = b"".join(api(environ, lambda status, headers, exc_info=None: answer.update(status=status,
                                                                                    headers=dict(headers))))
    assert answer["status"].startswith("400") and answer["headers"]["Connection"] == "close"
    assert json.loads(body)["error"]["code"] == "invalid_body"
    assert not list((tmp_path / "inbox").glob("*.json"))


def wsgi_request(api, method: str, path: str, **environ) -> requests.Response:
    """One request straight through the API's WSGI interface (no server, no socket), answered as a
    ``requests`` response."""
    from wsgiref.util import setup_testing_defaults

    from requests.structures import CaseInsensitiveDict

    environ.update(REQUEST_METHOD=method, PATH_INFO=path)
    setup_testing_defaults(environ)
    response = requests.Response()

    def start_response(status, headers, exc_info=None):
        response.status_code = int(status.split()[0])
        response.headers = CaseInsensitiveDict(headers)

    response._content = b"".join(api(environ, start_response))
    return response


def test_a_bug_in_a_handler_answers_a_logged_json_500_with_cors(tmp_path, tiny_dir, monkeypatch, caplog):
    """An unexpected exception in a handler (here, listing the records breaks) answers 500
    internal_error in JSON with the CORS headers, as /openapi.json says; its traceback goes to the
    log, not to the client."""
    from fluxworker.config import load_config
    from fluxworker.http import Api
    from fluxworker.openapi import openapi_document

    config = load_config(write_config(tmp_path, tiny_dir))
    api = Api(config)

    def broken(limit, status=None):
        raise RuntimeError("the records vanished")

    monkeypatch.setattr(api.inbox, "recent", broken)
    with caplog.at_level("ERROR", logger="fluxworker.http"):
        response = wsgi_request(api, "GET", "/jobs", HTTP_ORIGIN="http://elsewhere.example")
    assert_error(response, 500, "internal_error")
    assert "Access-Control-Expose-Headers" in response.headers
    assert "vanished" not in response.text
    logged = [r for r in caplog.records if r.name == "fluxworker.http" and r.levelname == "ERROR"]
    assert len(logged) == 1 and "GET /jobs" in logged[0].getMessage()
    assert "Traceback" in logged[0].getMessage() and "RuntimeError: the records vanished" in logged[0].getMessage()
    assert_documented(openapi_document(config), "/jobs", "get", response)


def test_a_trailing_slash_routes_like_the_path_without_it(server):
    assert requests.get(server.url + "/health/", timeout=30).json()["status"] == "ok"
    response = post(server, "/generate/", {"prompt": "slash", "width": 64, "height": 64})
    assert response.status_code == 200, response.text
    assert requests.get(server.url + "/jobs/" + response.json()["id"] + "/", timeout=30).json()["status"] == "done"


def raw_get(server, path):
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    connection.request("GET", path)
    response = connection.getresponse()
    body = response.read()
    connection.close()
    return response.status, body


@pytest.mark.parametrize("path", [
    "/outputs/../config.yaml", "/outputs/..%2Fconfig.yaml", "/outputs/%2e%2e/config.yaml",
    "/outputs/%2e%2e%2fconfig.yaml", "/outputs//etc/passwd", "/outputs/%2Fetc%2Fpasswd",
    "/outputs/..%5cconfig.yaml", "/outputs/.status.json", "/outputs/escape.png", "/outputs/inside-link.png",
])
def test_outputs_never_leave_the_outputs_folder(server, path):
    outputs = server.folder / "outputs"
    if not (outputs / "escape.png").is_symlink():
        (server.folder / "secret.png").write_bytes(b"secret")
        os.symlink(server.folder / "secret.png", outputs / "escape.png")
        (outputs / "sub").mkdir(exist_ok=True)
        (outputs / "sub" / "x.png").write_bytes(b"x")
        os.symlink(outputs / "sub", outputs / "inside-link.png")
    status, body = raw_get(server, path)
    assert status == 404, (path, body)
    assert json.loads(body)["error"]["code"] == "not_found"
    assert b"secret" not in body


def test_outputs_have_content_type_and_cache_headers(server):
    body = post(server, "/generate", {"prompt": "cache me", "width": 64, "height": 64}).json()
    response = requests.get(server.url + body["url"], timeout=30)
    assert response.headers["Content-Type"] == "image/png"
    assert "immutable" in response.headers["Cache-Control"]
    again = requests.get(server.url + body["url"], headers={"If-Modified-Since": response.headers["Last-Modified"]},
                         timeout=30)
    assert again.status_code == 304
    record = requests.get(server.url + body["url"].replace(".png", ".json"), timeout=30)
    assert record.headers["Content-Type"].startswith("application/json") and record.json()["status"] == "done"


# -- jobs, health, readiness, description --------------------------------------------------------


def test_wait_false_answers_202_and_the_job_can_be_followed(server):
    response = post(server, "/generate", {"prompt": "follow me", "width": 1024, "height": 1024,
                                          "num_inference_steps": 10, "wait": False})
    assert response.status_code == 202
    body = response.json()
    assert body["status"] == "queued" and response.headers["Location"] == body["status_url"]
    seen = []

    def state():
        current = requests.get(server.url + body["status_url"], timeout=30).json()
        seen.append(current)
        return current["status"] in ("done", "failed") and current

    final = wait_for(state, timeout=120, interval=0.05, what="job done")
    assert final["status"] == "done" and final["url"] == f"/outputs/{body['id']}.png"
    running = [s for s in seen if s["status"] == "running"]
    assert running and all(s["total"] in (None, 10) for s in running)
    assert any(s["step"] >= 1 for s in running)


def test_unknown_job_is_404_and_distinct_from_pending(server):
    assert_error(requests.get(server.url + "/jobs/never-submitted", timeout=30), 404, "unknown_job", "id")
    assert_error(requests.get(server.url + "/jobs/bad%20id", timeout=30), 404, "unknown_job", "id")


def test_failed_jobs_are_reported_with_their_error(server):
    (server.folder / "inbox" / "bad-drop.json").write_text('{"id": "bad-drop", "prompt": "x", "width": 100}')
    wait_record(server.folder / "outputs", "bad-drop")
    state = requests.get(server.url + "/jobs/bad-drop", timeout=30).json()
    assert state["status"] == "failed" and state["error"]["field"] == "width"


def test_recent_jobs_list(server):
    post(server, "/generate", {"prompt": "listed", "width": 64, "height": 64, "id": "listed-1"})
    jobs = requests.get(server.url + "/jobs?status=done&limit=5", timeout=30).json()["jobs"]
    assert 1 <= len(jobs) <= 5 and all(j["status"] == "done" for j in jobs)
    assert jobs[0]["id"] == "listed-1"
    assert_error(requests.get(server.url + "/jobs?limit=0", timeout=30), 400, "out_of_range", "limit")


def test_health_ready_and_openapi(server):
    assert requests.get(server.url + "/health", timeout=30).json()["status"] == "ok"
    ready = requests.get(server.url + "/ready", timeout=30)
    assert ready.status_code == 200 and ready.json()["ready"] is True
    doc = requests.get(server.url + "/openapi.json", timeout=30).json()
    assert doc["openapi"].startswith("3.")
    assert {"/generate", "/upscale", "/jobs/{id}", "/outputs/{name}", "/health", "/ready"} <= set(doc["paths"])
    props = doc["components"]["schemas"]["GenerateRequest"]["properties"]
    assert props["num_inference_steps"]["default"] == 4 and props["strength"]["default"] == 0.6
    assert props["width"]["maximum"] == 1024


def test_real_answers_match_the_openapi_document(server):
    doc = requests.get(server.url + "/openapi.json", timeout=30).json()
    generated = post(server, "/generate", {"prompt": "documented", "width": 64, "height": 64, "seed": None})
    upscaled = post(server, "/upscale", {"image": png_b64((16, 16)), "type": "upscale"})
    answers = [
        ("/generate", "post", generated),
        ("/generate", "post", post(server, "/generate", {"model": "lama", "image": png_b64(), "mask": png_b64()})),
        ("/upscale", "post", upscaled),
        ("/generate", "post", post(server, "/generate", {"prompt": "later", "width": 64, "height": 64,
                                                         "wait": False})),
        ("/generate", "post", post(server, "/generate", {"prompt": "x", "width": 100})),
        ("/generate", "post", post(server, "/generate", {"id": upscaled.json()["id"], "prompt": "x"})),
        ("/upscale", "post", post(server, "/upscale", {"image": None})),
        ("/upscale", "post", requests.post(server.url + "/upscale", data="x", timeout=30)),
        ("/generate", "post", post(server, "/generate", {"prompt": "x", "image": "A" * 1_200_000})),
        ("/jobs", "get", requests.get(server.url + "/jobs?limit=3", timeout=30)),
        ("/jobs", "get", requests.get(server.url + "/jobs?limit=0", timeout=30)),
        ("/jobs/{id}", "get", requests.get(server.url + "/jobs/" + generated.json()["id"], timeout=30)),
        ("/jobs/{id}", "get", requests.get(server.url + "/jobs/" + upscaled.json()["id"], timeout=30)),
        ("/jobs/{id}", "get", requests.get(server.url + "/jobs/never-seen", timeout=30)),
        ("/outputs/{name}", "get", requests.get(server.url + "/outputs/never-seen.png", timeout=30)),
        ("/health", "get", requests.get(server.url + "/health", timeout=30)),
        ("/ready", "get", requests.get(server.url + "/ready", timeout=30)),
        ("/openapi.json", "get", requests.get(server.url + "/openapi.json", timeout=30)),
        ("/metrics", "get", requests.get(server.url + "/metrics", timeout=30)),
        ("/", "get", requests.get(server.url + "/", timeout=30)),
        ("/playground.js", "get", requests.get(server.url + "/playground.js", timeout=30)),
    ]
    image_url = generated.json()["url"]
    image = requests.get(server.url + image_url, timeout=30)
    for url, headers in [(image_url.replace(".png", ".json"), {}), (image_url, {"Range": "bytes=0-7"}),
                         (image_url, {"Range": "bytes=999999-"}),
                         (image_url, {"If-None-Match": image.headers["ETag"]})]:
        answers.append(("/outputs/{name}", "get", requests.get(server.url + url, headers=headers, timeout=30)))
    answers.append(("/outputs/{name}", "get", image))
    # Every path answers 405, with Allow, to the methods it does not take.
    for path, operations in doc["paths"].items():
        method = next(iter(operations))
        other = "PUT" if method == "post" else "POST"
        response = requests.request(other, server.url + path.format(id="x", name="x.png"), timeout=30)
        assert response.status_code == 405, (other, path, response.text)
        answers.append((path, method, response))
    assert {path for path, _, _ in answers} == set(doc["paths"])
    assert {response.status_code for _, _, response in answers} >= {200, 202, 206, 304, 400, 404, 405, 409, 413,
                                                                    415, 416}
    for path, method, response in answers:
        assert_documented(doc, path, method, response)
    request_schema = doc["components"]["schemas"]["GenerateRequest"]
    assert request_schema["properties"]["type"]["enum"] == ["generate", None]
    assert doc["components"]["schemas"]["UpscaleRequest"]["properties"]["image"]["type"] == "string"
    assert request_schema["properties"]["prompt"]["anyOf"][0]["maxLength"] == 2000
    for name in ("num_inference_steps", "strength", "width", "height", "no_text", "performance_mode", "model"):
        assert "null" in request_schema["properties"][name]["type"], name


def test_twenty_concurrent_requests_all_complete(server):
    """With the default threads and max_queue."""
    import yaml

    assert set(yaml.safe_load(server.config_file.read_text())["http"]) == {"host", "max_body_bytes"}
    results = [None] * 20

    def call(n):
        results[n] = post(server, "/generate", {"prompt": f"crowd {n}", "width": 64, "height": 64, "seed": n})

    threads = [threading.Thread(target=call, args=(n,)) for n in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=180)
    assert [r.status_code for r in results] == [200] * 20
    assert len({r.json()["url"] for r in results}) == 20


def test_cors_preflight_and_headers_on_errors(server):
    response = requests.options(server.url + "/generate", headers={
        "Origin": "http://elsewhere.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type"}, timeout=30)
    assert response.status_code == 204
    assert response.headers["Access-Control-Allow-Origin"] == "*"
    assert "POST" in response.headers["Access-Control-Allow-Methods"]
    assert "content-type" in response.headers["Access-Control-Allow-Headers"].lower()


def test_a_preflight_allows_the_headers_the_page_asks_for(server):
    response = requests.options(server.url + "/generate", headers={
        "Origin": "http://elsewhere.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type,x-requested-with,authorization"}, timeout=30)
    allowed = {name.strip() for name in response.headers["Access-Control-Allow-Headers"].split(",")}
    assert allowed == {"content-type", "x-requested-with", "authorization"}
    assert "Access-Control-Request-Headers" in response.headers["Vary"]
    # Anything but a list of header names gets the default list.
    odd = requests.options(server.url + "/generate", headers={
        "Origin": "http://x", "Access-Control-Request-Headers": "a b; c"}, timeout=30)
    assert odd.headers["Access-Control-Allow-Headers"] == "Content-Type, Authorization, X-API-Key"


def test_scripts_on_other_origins_may_read_retry_after_location_and_www_authenticate(server):
    for response in (requests.get(server.url + "/health", headers={"Origin": "http://x"}, timeout=30),
                     requests.get(server.url + "/nowhere", headers={"Origin": "http://x"}, timeout=30)):
        exposed = {name.strip() for name in response.headers["Access-Control-Expose-Headers"].split(",")}
        assert exposed == {"Retry-After", "Location", "WWW-Authenticate"}


# -- configurations of their own -----------------------------------------------------------------


def test_queue_limit_answers_503_with_retry_after(tmp_path, tiny_dir, server_factory):
    config = write_config(tmp_path, tiny_dir, http={"max_queue": 2, "threads": 8})
    api = server_factory(config, command="api")  # no worker: jobs stay queued
    for n in range(2):
        assert post(api, "/generate", {"prompt": f"q{n}", "wait": False}).status_code == 202
    response = post(api, "/generate", {"prompt": "one too many", "wait": False})
    error = assert_error(response, 503, "queue_full")
    assert response.headers["Retry-After"] == "4"  # http.retry_after_per_job (2 s) for each of the 2 queued jobs
    assert "2 jobs" in error["message"]
    waiting = post(api, "/generate", {"prompt": "one too many"})  # a request that would wait: the same answer
    assert waiting.status_code == 503 and waiting.headers["Retry-After"] == "4"
    ready = requests.get(api.url + "/ready", timeout=30)
    assert ready.status_code == 503
    doc = requests.get(api.url + "/openapi.json", timeout=30).json()
    assert_documented(doc, "/generate", "post", response)
    assert_documented(doc, "/ready", "get", ready)


def test_the_queue_limit_holds_under_concurrent_posts(tmp_path, tiny_dir, server_factory):
    config = write_config(tmp_path, tiny_dir, http={"max_queue": 2, "threads": 24})
    api = server_factory(config, command="api")  # no worker: jobs stay queued
    start = threading.Barrier(12, timeout=60)
    statuses = []

    def call(n):
        start.wait()
        statuses.append(post(api, "/generate", {"prompt": f"race {n}", "wait": False}).status_code)

    threads = [threading.Thread(target=call, args=(n,)) for n in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert sorted(statuses) == [202] * 2 + [503] * 10
    assert len(list((tmp_path / "inbox").glob("*.json"))) == 2


def test_waiting_requests_leave_threads_for_everything_else(tmp_path, tiny_dir, server_factory):
    """Requests waiting on a job already queued do not count against the queue, yet each holds a
    thread: at most threads - 4 wait, the next one gets 503, and /health still answers."""
    config = write_config(tmp_path, tiny_dir, http={"max_queue": 2, "threads": 8, "wait_timeout": 60})
    api = server_factory(config, command="api")  # no worker: the job stays queued
    job = {"id": "held", "prompt": "x", "width": 64, "height": 64}
    assert post(api, "/generate", {**job, "wait": False}).status_code == 202
    answers = []
    waiters = [threading.Thread(target=lambda: answers.append(post(api, "/generate", job))) for _ in range(4)]
    for thread in waiters:
        thread.start()
    wait_for(lambda: requests.get(api.url + "/ready", timeout=30).json()["waiting"] == 4, timeout=60,
             what="four waiting requests")
    error = assert_error(post(api, "/generate", job, ), 503, "too_many_waiting")
    assert "wait" in error["message"]
    assert int(requests.post(api.url + "/generate", json=job, timeout=30).headers["Retry-After"]) >= 1
    assert requests.get(api.url + "/health", timeout=30).status_code == 200
    assert requests.get(api.url + "/jobs/held", timeout=30).json()["status"] == "queued"
    # The job finishes: every waiting request gets its answer.
    (tmp_path / "outputs" / "held.json").write_text(json.dumps(
        {"id": "held", "type": "generate", "status": "done", "url": "/outputs/held.png", "seed": 3}))
    for thread in waiters:
        thread.join(timeout=60)
    assert [answer.status_code for answer in answers] == [200] * 4
    assert requests.get(api.url + "/ready", timeout=30).json()["waiting"] == 0


def test_a_job_file_over_the_job_limit_is_413(tmp_path, tiny_dir, server_factory):
    """The worker would refuse a job file over limits.max_job_bytes: the API answers 413 instead of
    queueing it."""
    from fluxworker.config import HttpConfig, LimitsConfig

    assert HttpConfig().max_body_bytes <= LimitsConfig().max_job_bytes
    config = write_config(tmp_path, tiny_dir, limits={"max_job_bytes": 4096})
    api = server_factory(config, command="api")
    buffer = io.BytesIO()
    Image.effect_noise((64, 64), 80).convert("RGB").save(buffer, format="PNG")
    image = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    error = assert_error(post(api, "/generate", {"prompt": "x", "image": image, "wait": False}), 413, "too_large")
    assert "limits.max_job_bytes" in error["message"]
    assert not list((tmp_path / "inbox").glob("*.json"))
    assert post(api, "/generate", {"prompt": "x", "wait": False}).status_code == 202


def test_cors_origins_are_normalised_or_refused(tmp_path, tiny_dir):
    from fluxworker.config import ConfigError, load_config

    config = load_config(write_config(tmp_path, tiny_dir, http={"cors_origins": ["http://App.lan:5173/", "*"]}))
    assert config.http.cors_origins == ["http://app.lan:5173", "*"]
    for bad in ("http://app.lan:5173/app", "app.lan:5173", "http://app.lan?x=1", "ftp://app.lan"):
        with pytest.raises(ConfigError) as caught:
            load_config(write_config(tmp_path, tiny_dir, http={"cors_origins": [bad]}))
        assert "http.cors_origins.0" in str(caught.value) and bad in str(caught.value)


def test_a_job_that_outlasts_the_wait_gets_504_and_still_finishes(tmp_path, tiny_dir, server_factory,
                                                                    worker_factory):
    config = write_config(tmp_path, tiny_dir, http={"wait_timeout": 0.5})
    api = server_factory(config, command="api")
    response = post(api, "/generate", {"prompt": "late", "width": 64, "height": 64})
    assert_error(response, 504, "timeout")
    assert_documented(requests.get(api.url + "/openapi.json", timeout=30).json(), "/generate", "post", response)
    job_id = response.json()["id"]
    assert requests.get(api.url + f"/jobs/{job_id}", timeout=30).json()["status"] == "queued"
    worker_factory(config)
    assert wait_record(tmp_path / "outputs", job_id)["status"] == "done"
    assert requests.get(api.url + f"/jobs/{job_id}", timeout=30).json()["status"] == "done"


def test_api_key(tmp_path, tiny_dir, server_factory):
    config = write_config(tmp_path, tiny_dir, http={"api_key": "s3cret-key"})
    api = server_factory(config, command="api")
    assert_error(requests.get(api.url + "/jobs", timeout=30), 401, "unauthorized")
    assert requests.get(api.url + "/jobs", headers={"Authorization": "Bearer wrong-key"}, timeout=30).status_code == 401
    assert requests.get(api.url + "/jobs", headers={"Authorization": "Bearer s3cret-key"}, timeout=30).status_code == 200
    assert requests.get(api.url + "/jobs", headers={"X-API-Key": "s3cret-key"}, timeout=30).status_code == 200
    assert requests.get(api.url + "/health", timeout=30).status_code == 200
    assert requests.options(api.url + "/generate", headers={"Origin": "http://x"}, timeout=30).status_code == 204
    assert requests.get(api.url + "/", timeout=30).status_code == 200
    assert post(api, "/generate", {"prompt": "x", "wait": False}).status_code == 401
    assert post(api, "/generate", {"prompt": "x", "wait": False},
                headers={"X-API-Key": "s3cret-key"}).status_code == 202
    doc = requests.get(api.url + "/openapi.json", headers={"X-API-Key": "s3cret-key"}, timeout=30).json()
    for path in ("/openapi.json", "/jobs", "/ready", "/metrics"):
        assert_documented(doc, path, "get", requests.get(api.url + path, timeout=30))
    assert_documented(doc, "/generate", "post", post(api, "/generate", {"prompt": "x"}))


def test_api_key_from_the_environment_and_a_systemd_credential(tmp_path, tiny_dir):
    from fluxworker.config import load_config
    from fluxworker.http import read_api_key

    config = load_config(write_config(tmp_path, tiny_dir))
    assert read_api_key(config) is None
    (tmp_path / "creds").mkdir()
    (tmp_path / "creds" / "api_key").write_text("from-credential\n")
    os.environ["CREDENTIALS_DIRECTORY"] = str(tmp_path / "creds")
    try:
        assert read_api_key(config) == "from-credential"
        os.environ["FLUXWORKER_API_KEY"] = "from-env"
        assert read_api_key(config) == "from-env"
    finally:
        os.environ.pop("CREDENTIALS_DIRECTORY", None)
        os.environ.pop("FLUXWORKER_API_KEY", None)


def test_cors_origins_can_be_restricted(tmp_path, tiny_dir, server_factory):
    config = write_config(tmp_path, tiny_dir, http={"cors_origins": ["http://app.lan:5173/"]})
    api = server_factory(config, command="api")
    allowed = requests.get(api.url + "/health", headers={"Origin": "http://app.lan:5173"}, timeout=30)
    assert allowed.headers["Access-Control-Allow-Origin"] == "http://app.lan:5173"
    other = requests.get(api.url + "/health", headers={"Origin": "http://evil.example"}, timeout=30)
    assert "Access-Control-Allow-Origin" not in other.headers


def test_serve_stops_cleanly_on_sigterm(tmp_path, tiny_dir, server_factory):
    server = server_factory(write_config(tmp_path, tiny_dir))
    assert post(server, "/generate", {"prompt": "x", "width": 64, "height": 64}).status_code == 200
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(timeout=60) == 0
    assert "API stopped" in server.log()


def test_api_alone_stops_cleanly_on_sigterm(tmp_path, tiny_dir, server_factory):
    api = server_factory(write_config(tmp_path, tiny_dir), command="api")
    api.proc.send_signal(signal.SIGTERM)
    assert api.proc.wait(timeout=60) == 0


def test_a_taken_port_is_a_clear_error(tmp_path, tiny_dir, server_factory):
    first = server_factory(write_config(tmp_path / "a", tiny_dir), command="api")
    second = ServerProcess(write_config(tmp_path / "b", tiny_dir), command="api")
    second.port, second.url = first.port, first.url
    second.start(wait_ready=False)
    assert second.proc.wait(timeout=60) == 2
    assert "cannot listen" in second.log()


def test_the_readme_demo_command_makes_a_real_image_through_the_api(tmp_path, tiny_dir):
    import shutil
    import subprocess
    import sys

    shutil.copytree(tiny_dir / "flux", tmp_path / "demo" / "flux")
    from fluxworker.tiny import tiny_config
    import yaml

    (tmp_path / "demo" / "config.yaml").write_text(yaml.safe_dump(tiny_config(tmp_path / "demo")))
    result = subprocess.run([sys.executable, "-m", "fluxworker", "demo", "--dir", str(tmp_path / "demo")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("HTTP 200")
    path = result.stdout.split("image: ", 1)[1].split(" (", 1)[0]
    assert Image.open(path).size == (512, 512)


def test_the_recent_jobs_list_reads_only_the_records_it_shows(tmp_path, tiny_dir, monkeypatch):
    """outputs/ keeps every record: GET /jobs must read the newest few, not all of them (the
    playground lists recent outputs after every job)."""
    from wsgiref.util import setup_testing_defaults

    from fluxworker import inbox as inbox_module
    from fluxworker.config import load_config
    from fluxworker.http import Api

    api = Api(load_config(write_config(tmp_path, tiny_dir)))
    outputs = tmp_path / "outputs"
    for n in range(300):
        path = outputs / f"old-{n:03d}.json"
        path.write_text(json.dumps({"id": f"old-{n:03d}", "status": "done" if n % 3 else "failed",
                                    "finished_at": f"2026-01-01T00:{n // 60:02d}:{n % 60:02d}.000+00:00"}))
        os.utime(path, ns=(n * 10**9, n * 10**9))
    reads = []
    read_json = inbox_module.read_json
    monkeypatch.setattr(inbox_module, "read_json", lambda path: reads.append(path) or read_json(path))

    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/jobs", "QUERY_STRING": "status=done&limit=5"}
    setup_testing_defaults(environ)
    answer = {}
    body = b"".join(api(environ, lambda status, headers, exc_info=None: answer.update(status=status)))
    assert answer["status"].startswith("200")
    assert [job["id"] for job in json.loads(body)["jobs"]] == ["old-299", "old-298", "old-296", "old-295", "old-293"]
    assert len(reads) <= 20, len(reads)
