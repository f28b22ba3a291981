"""The HTTP API: a Bottle facade over the inbox.

Each request is validated with the shared job model, written into the inbox atomically, and
answered from its completion record. Every answer, errors included, is JSON (except the
playground page and the images), and every answer carries the CORS headers.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import re
import threading
from importlib import resources

import bottle

from . import __version__
from .body import read_json_object
from .config import Config
from .cors import Cors
from .credentials import read_secret
from .errors import JobError
from .inbox import Inbox, read_json
from .jobs import is_valid_id, parse_job, spec_json
from .openapi import openapi_document
from .replies import ApiError, error_json, json_response
from .statusfile import process_alive
from .waiter import CompletionWaiter

log = logging.getLogger(__name__)

_OUTPUT_NAME = re.compile(r"[A-Za-z0-9_-]{1,80}\.(png|json)")
_MIME = {"png": "image/png", "json": "application/json"}
_STATUS_OF_FAILURE = {
    "engine_unavailable": 503,
    "model_not_found": 503,
    "out_of_memory": 503,
    "internal_error": 500,
    "worker_crashed": 500,
}
_PUBLIC_PATHS = {"/health", "/", "/playground.js"}
# Request threads kept free of waiting requests, for /health, /ready, status polls and new jobs.
_THREADS_NOT_WAITING = 4


class JsonBottle(bottle.Bottle):
    """Bottle, with JSON error bodies instead of its HTML error pages."""

    def allowed_methods(self, path: str) -> list[str]:
        """The methods ``path`` answers, for ``Allow``: HEAD wherever GET is, OPTIONS everywhere."""
        methods = []
        for method in ("GET", "POST"):
            try:
                self.router.match({"REQUEST_METHOD": method, "PATH_INFO": path})
            except bottle.HTTPError:
                continue
            methods.append(method)
        if "GET" in methods:
            methods.insert(1, "HEAD")
        return methods + ["OPTIONS"] if methods else []

    def default_error_handler(self, res: bottle.HTTPError):
        if res.status_code >= 500:
            log.error("HTTP %s on %s %s: %s\n%s", res.status_code, bottle.request.method, bottle.request.path,
                      res.exception, res.traceback or "")
        if res.status_code == 405:
            bottle.response.set_header("Allow", ", ".join(self.allowed_methods(bottle.request.path)))
        codes = {404: "not_found", 405: "method_not_allowed", 413: "too_large", 500: "internal_error"}
        messages = {404: "no such resource", 405: "method not allowed on this path",
                    500: "internal error: see the server's log"}
        bottle.response.content_type = "application/json"
        code = codes.get(res.status_code, "http_error")
        message = messages.get(res.status_code, str(res.body or res.status_line))
        return error_json(code, message)


class Api:
    """Routes and their state: one inbox, one shared waiter, the config."""

    def __init__(self, config: Config, api_key: str | None = None):
        self.config = config
        self.http = config.http
        self.inbox = Inbox(config.paths.inbox, config.paths.outputs)
        self.inbox.ensure()
        self.waiter = CompletionWaiter(self.inbox)
        self.cors = Cors(self.http.cors_origins)
        self.api_key = api_key
        self.closing = False
        # Counting the queue and adding a job is one step; so is taking a place to wait.
        self._submitting = threading.Lock()
        self.waiting = 0
        self.max_waiting = self.http.threads - _THREADS_NOT_WAITING
        self.app = self._routes()

    def start(self) -> None:
        self.waiter.start()

    def close(self) -> None:
        """Stop taking jobs; requests still waiting answer 503 with their job id."""
        self.closing = True
        self.waiter.notify()
        self.waiter.close()

    # -- WSGI: CORS, preflight, path and authentication around every request -----------------

    def __call__(self, environ, start_response):
        origin = environ.get("HTTP_ORIGIN")
        cors = self.cors.headers(origin)

        def start(status, headers, exc_info=None):
            return start_response(status, headers + cors, exc_info)

        try:
            path = _route_path(environ.get("PATH_INFO") or "/")
            if environ["REQUEST_METHOD"] == "OPTIONS":
                return self._options(start, environ, path)
            self._authenticate(environ, path)
            if path is None:
                raw = environ.get("PATH_INFO", "")
                if raw.startswith("/jobs/"):
                    raise ApiError(404, "unknown_job", "no job with that id (it is not UTF-8)", "id")
                raise ApiError(404, "not_found", "no such resource (the path is not UTF-8)")
        except ApiError as exc:
            return self._reply(start, exc.status, exc.body(), exc.headers)
        environ["PATH_INFO"] = path.encode("utf-8").decode("latin-1")  # WSGI carries paths as latin-1
        return self.app(environ, start)

    def _options(self, start, environ, path: str | None):
        """A preflight (any path, as browsers send them before authenticating), or a plain OPTIONS
        that asks what a path allows."""
        allowed = self.app.allowed_methods(path) if path is not None else []
        headers = {"Allow": ", ".join(allowed)} if allowed else {}
        if environ.get("HTTP_ORIGIN") is not None:
            return self._reply(start, 204, None, {**headers, **self.cors.preflight(
                environ.get("HTTP_ACCESS_CONTROL_REQUEST_HEADERS"))})
        if not allowed:
            raise ApiError(404, "not_found", "no such resource")
        return self._reply(start, 204, None, headers)

    @staticmethod
    def _reply(start, status: int, body: dict | None, headers: dict | None = None):
        data = b"" if body is None else json.dumps(body).encode()
        head = [("Content-Length", str(len(data)))]
        if body is not None:
            head.append(("Content-Type", "application/json"))
        head += list((headers or {}).items())
        start(f"{status} {bottle.HTTP_CODES.get(status, '')}".strip(), head)
        return [data]

    def _authenticate(self, environ, path: str | None) -> None:
        if not self.api_key or path in _PUBLIC_PATHS:
            return
        given = environ.get("HTTP_X_API_KEY")
        auth = environ.get("HTTP_AUTHORIZATION", "")
        if given is None and auth[:7].lower() == "bearer ":
            given = auth[7:].strip()
        if given is None or not hmac.compare_digest(given.encode(), self.api_key.encode()):
            raise ApiError(401, "unauthorized", "missing or wrong API key: send Authorization: Bearer <key> "
                           "or X-API-Key", headers={"WWW-Authenticate": 'Bearer realm="fluxworker"'})

    # -- routes -------------------------------------------------------------------------------

    def _routes(self) -> bottle.Bottle:
        app = JsonBottle(catchall=True)

        def handle(method):
            def wrapper(*args, **kwargs):
                try:
                    return method(*args, **kwargs)
                except ApiError as exc:
                    return exc.response()
            return wrapper

        app.route("/generate", "POST", handle(self.generate))
        app.route("/upscale", "POST", handle(self.upscale))
        app.route("/jobs", "GET", handle(self.list_jobs))
        app.route("/jobs/<job_id>", "GET", handle(self.job_state))
        app.route("/outputs/<name:path>", "GET", handle(self.output))
        app.route("/health", "GET", handle(self.health))
        app.route("/ready", "GET", handle(self.ready))
        app.route("/openapi.json", "GET", handle(self.openapi))
        app.route("/metrics", "GET", handle(self.metrics))
        app.route("/", "GET", handle(self.playground))
        app.route("/playground.js", "GET", handle(self.playground_script))
        return app

    def generate(self):
        return self._submit(self._job_body("generate"))

    def upscale(self):
        return self._submit(self._job_body("upscale"))

    def _job_body(self, job_type: str) -> dict:
        body = read_json_object(bottle.request.environ, self.http.max_body_bytes)
        if body.get("type") not in (None, job_type):
            raise ApiError(400, "unexpected_field", f"type: POST /{job_type} makes {job_type} jobs", "type")
        body["type"] = job_type
        return body

    def _submit(self, body: dict):
        wait = body.pop("wait", None)
        if wait is None:
            wait = True
        elif not isinstance(wait, bool):
            raise ApiError(400, "invalid_type", "wait: must be true, false or null", "wait")
        if "transport" in body:
            raise ApiError(400, "unknown_field", "transport: unknown field", "transport")
        body["transport"] = "http"
        try:
            job = parse_job(body, self.config.limits)
        except JobError as exc:
            raise ApiError.from_job_error(exc) from None
        text = spec_json(job.spec)
        size, limit = len(text), self.config.limits.max_job_bytes
        if size > limit:  # the worker would refuse the job file
            raise ApiError(413, "too_large", f"the job would be {size} bytes, over the limit of {limit} bytes "
                           "(limits.max_job_bytes)")
        if self.closing:
            raise ApiError(503, "shutting_down", "the service is stopping; try again shortly",
                           headers={"Retry-After": "5"})
        self._raise_if_blocked()
        with self._submitting:
            record = self._existing_record(job.id, job.type)
            must_wait = wait and record is None
            if must_wait and self.waiting >= self.max_waiting:
                raise ApiError(503, "too_many_waiting", f"{self.waiting} requests are already waiting for their "
                               "jobs; try again later, or send \"wait\": false and follow the job at /jobs/<id>",
                               headers={"Retry-After": "5"})
            if record is None and self.inbox.presence(job.id) is None:
                queued = len(self.inbox.scan())
                if queued >= self.http.max_queue:
                    retry = max(1, round(queued * self.http.retry_after_per_job))
                    raise ApiError(503, "queue_full", f"{queued} jobs are waiting; try again later",
                                   headers={"Retry-After": str(retry)})
                self.inbox.submit(job.spec, text)
            if must_wait:
                self.waiting += 1
        status_url = f"/jobs/{job.id}"
        if not wait and record is None:
            return json_response(202, {"id": job.id, "status": "queued", "status_url": status_url},
                                 {"Location": status_url})
        if must_wait:
            try:
                record = self.waiter.wait(job.id, self.http.wait_timeout,
                                          until=lambda: self.closing or self._blocked() is not None)
            finally:
                with self._submitting:
                    self.waiting -= 1
        if record is None:
            self._raise_if_blocked({"id": job.id, "status_url": status_url})
            if self.closing:
                raise ApiError(503, "shutting_down", "the service stopped before the job finished; it stays "
                               "queued", headers={"Retry-After": "5"}, extra={"id": job.id, "status_url": status_url})
            raise ApiError(504, "timeout", f"the job did not finish within {self.http.wait_timeout:g}s; it goes on",
                           extra={"id": job.id, "status_url": status_url})
        return self._answer(record)

    def _existing_record(self, job_id: str, job_type: str) -> dict | None:
        """The job's completion record (``None`` while it has none); 409 when the id belongs to a
        job of the other type, finished or queued."""
        record = self.inbox.completion(job_id)
        if record is not None:
            existing = record.get("type")
        else:
            queued = read_json(self.inbox.root / f"{job_id}.json") or read_json(
                self.inbox.processing / f"{job_id}.json")
            existing = queued.get("type", "generate") if isinstance(queued, dict) else None
        if existing is not None and existing != job_type:
            raise ApiError(409, "id_in_use", f"id: {job_id!r} belongs to an {existing} job; a job id always "
                           "answers with its own job: send this one under a new id", "id")
        return record

    def _blocked(self) -> dict | None:
        """The worker's error when it cannot write its results (outputs/ full or read-only)."""
        status = self.inbox.read_status() or {}
        return status.get("error") if status.get("state") == "blocked" else None

    def _raise_if_blocked(self, extra: dict | None = None) -> None:
        error = self._blocked()
        if error is not None:
            raise ApiError(503, error.get("code", "outputs_unwritable"), error.get("message", "outputs blocked"),
                           headers={"Retry-After": "30"}, extra=extra)

    @staticmethod
    def _answer(record: dict):
        if record.get("status") == "done":
            body = {"url": record["url"], "id": record["id"]}
            if record.get("type") != "upscale":
                seed = record.get("seed")
                # LaMa records from before it recorded a seed have none; LaMa does not use the
                # seed, so any value reproduces the image, and the API promises an integer.
                body["seed"] = seed if isinstance(seed, int) else 0
            return json_response(200, body)
        error = record.get("error") or {}
        status = _STATUS_OF_FAILURE.get(error.get("code"), 400)
        return json_response(status, {"error": error, "id": record.get("id")})

    def job_state(self, job_id: str):
        state = self.inbox.state_of(job_id) if is_valid_id(job_id) else None
        if state is None:
            raise ApiError(404, "unknown_job", f"no job with id {job_id!r}", "id")
        return json_response(200, state)

    def list_jobs(self):
        """Recent completion records, newest first: ``?limit=N`` (1..100, default 20) and
        ``?status=done|failed``."""
        query = bottle.request.query
        try:
            limit = int(query.get("limit", "20"))
        except ValueError:
            raise ApiError(400, "invalid_type", "limit: must be an integer", "limit") from None
        if not 1 <= limit <= 100:
            raise ApiError(400, "out_of_range", "limit: must be from 1 to 100", "limit")
        status = query.get("status")
        if status not in (None, "done", "failed"):
            raise ApiError(400, "invalid_choice", "status: must be done or failed", "status")
        return json_response(200, {"jobs": self.inbox.recent(limit, status)})

    def output(self, name: str):
        match = _OUTPUT_NAME.fullmatch(name)
        if not match:  # checked first: realpath refuses some names (a NUL byte) with an exception
            raise ApiError(404, "not_found", f"no output named {name!r}", "name")
        root = os.path.realpath(self.inbox.outputs)
        path = os.path.realpath(os.path.join(root, name))
        if os.path.dirname(path) != root or not os.path.isfile(path):
            raise ApiError(404, "not_found", f"no output named {name!r}", "name")
        return bottle.static_file(
            os.path.basename(path), root=root, mimetype=_MIME[match.group(1)],
            headers={"Cache-Control": "public, max-age=31536000, immutable"},
        )

    def health(self):
        return json_response(200, {"status": "ok", "version": __version__})

    def ready(self):
        status = self.inbox.read_status() or {}
        pid = status.get("pid")
        alive = process_alive(pid)
        body = {
            "ready": bool(alive and status.get("ready")),
            "worker": status.get("state") if alive else "down",
            "engines": status.get("engines", []) if alive else [],
            "unavailable": status.get("unavailable", {}) if alive else {},
            "error": status.get("error") if alive else None,
            "queued": len(self.inbox.scan()),
            "waiting": self.waiting,
        }
        return json_response(200 if body["ready"] else 503, body)

    def metrics(self):
        from .metrics import render

        return bottle.HTTPResponse(render(self.inbox), headers={
            "Content-Type": "text/plain; version=0.0.4; charset=utf-8"})

    def openapi(self):
        return json_response(200, openapi_document(self.config))

    def playground(self):
        return self._static("playground.html", "text/html; charset=utf-8")

    def playground_script(self):
        return self._static("playground.js", "text/javascript; charset=utf-8")

    @staticmethod
    def _static(name: str, mimetype: str):
        data = resources.files("fluxworker.static").joinpath(name).read_bytes()
        return bottle.HTTPResponse(data, headers={"Content-Type": mimetype, "Cache-Control": "no-cache"})


def _route_path(raw: str) -> str | None:
    """The path to route: decoded as UTF-8 (``None`` when it is not), without a trailing slash."""
    try:
        path = raw.encode("latin-1").decode("utf-8")
    except UnicodeError:
        return None
    return path.rstrip("/") or "/"


def read_api_key(config: Config) -> str | None:
    """The API key: ``http.api_key``, else ``$FLUXWORKER_API_KEY``, else the systemd credential
    ``api_key``. None: no key, the API is open."""
    return config.http.api_key or read_secret("api_key", "FLUXWORKER_API_KEY")
