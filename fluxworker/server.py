"""Running the HTTP API: alone (``fluxworker api``) or beside the worker (``fluxworker serve``).

The API runs on cheroot, a multi-threaded WSGI server that hands the body to the application as
a stream, so an oversized body is refused from its Content-Length before it is uploaded. Signals
only set flags; the main thread then closes the API, whose waiting requests answer 503 with their
job id (the jobs stay queued).
"""

from __future__ import annotations

import ctypes
import logging
import signal
import sys
import threading

from cheroot import server as cheroot_server
from cheroot import wsgi

from .config import Config
from .http import Api, read_api_key
from .replies import error_json
from .systemd import notify
from .wakeup import Waker
from .worker import run_worker

log = logging.getLogger(__name__)

_M_MMAP_THRESHOLD = -3  # mallopt() parameter, from glibc's malloc.h
_MMAP_THRESHOLD = 128 * 1024  # glibc's initial value, kept fixed


def give_back_freed_memory() -> None:
    """Keep glibc from holding on to memory the API's request threads have freed.

    glibc raises its mmap threshold whenever a large block is freed (up to 32 MiB); from then on
    blocks below it come from per-thread arenas, and each arena keeps up to twice the threshold of
    freed memory. With a thread per request, the API's resident memory grew by megabytes every few
    hundred jobs. A fixed threshold maps large blocks on their own (unmapped when freed) and keeps
    the arenas trimmed. Other C libraries (musl) have no such threshold: nothing to do there.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)


_CODE_OF_STATUS = {
    400: "bad_request", 405: "method_not_allowed", 408: "request_timeout", 413: "too_large",
    414: "uri_too_long", 500: "internal_error", 501: "not_implemented", 503: "unavailable",
    505: "http_version_not_supported",
}


class _JsonErrorRequest(cheroot_server.HTTPRequest):
    """cheroot answers the requests it cannot parse (a bad request line, a malformed header) by
    itself, in plain text: here in JSON with the CORS headers, like every other answer."""

    def simple_response(self, status, msg=""):
        status = str(status)
        code = int(status[:3])
        if code in (413, 414) and self.response_protocol != "HTTP/1.1":
            status, code = "400 Bad Request", 400  # HTTP/1.0 has neither
        message = (msg.decode("latin-1") if isinstance(msg, bytes) else msg) or status[4:]
        error_code = _CODE_OF_STATUS.get(code, "http_error")
        if "Content-Length" in message:
            error_code = "invalid_body"
        origin = self.inheaders.get(b"Origin")
        cors = getattr(self.server.wsgi_app, "cors", None)
        headers = cors.headers(origin.decode("latin-1") if origin else None) if cors is not None else []
        body = error_json(error_code, message).encode()
        head = [f"{self.server.protocol} {status}", f"Content-Length: {len(body)}", "Content-Type: application/json",
                *(f"{name}: {value}" for name, value in headers), "Connection: close"]
        # Every caller of simple_response ends the connection after it.
        self.close_connection = True
        try:
            self.conn.wfile.write("\r\n".join(head).encode("latin-1") + b"\r\n\r\n" + body)
        except OSError as exc:
            if exc.args[0] not in cheroot_server.errors.socket_errors_to_ignore:
                raise

    def send_headers(self):
        # An answer that says "Connection: close" (a body that could not be read) must close it:
        # what is left of that body would otherwise be read as the next request.
        if any(name.lower() == b"connection" and value.lower() == b"close" for name, value in self.outheaders):
            self.close_connection = True
        super().send_headers()


class _JsonErrorConnection(cheroot_server.HTTPConnection):
    RequestHandlerClass = _JsonErrorRequest


class ApiServer:
    """The API on its own thread, started and stopped by the caller."""

    def __init__(self, config: Config, port: int | None = None):
        self.config = config
        self.port = port or config.http.port
        self.api = Api(config, read_api_key(config))
        self.server = wsgi.Server(
            (config.http.host, self.port), self.api, numthreads=config.http.threads,
            server_name="fluxworker", timeout=30, shutdown_timeout=5, accepted_queue_timeout=5,
        )
        self.server.ConnectionClass = _JsonErrorConnection
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Bind the port (``OSError`` when it is taken), then serve on a background thread."""
        self.api.start()
        self.server.prepare()
        self._thread = threading.Thread(target=self.server.serve, name="http", daemon=True)
        self._thread.start()
        key = "on, with an API key" if self.api.api_key else "open (no API key)"
        log.info("API listening on http://%s:%d (%s)", self.config.http.host, self.port, key)

    def stop(self) -> None:
        self.api.close()
        self.server.stop()
        if self._thread is not None:
            self._thread.join(timeout=10)
        log.info("API stopped")


def _start_or_explain(server: ApiServer) -> bool:
    try:
        server.start()
    except OSError as exc:
        log.error("cannot listen on %s:%d: %s (http.host / http.port, or --port)",
                  server.config.http.host, server.port, exc.strerror or exc)
        return False
    return True


def run_api(config: Config, port: int | None = None) -> int:
    """``fluxworker api``: serve until SIGTERM or SIGINT."""
    waker = Waker()
    stop = []

    def on_signal(signum, frame):
        stop.append(signum)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    waker.attach_signals()
    give_back_freed_memory()
    server = ApiServer(config, port)
    try:
        if not _start_or_explain(server):
            return 2
        notify(f"READY=1\nSTATUS=listening on port {server.port}")
        while not stop:
            waker.wait(3600)
        notify("STOPPING=1")
        server.stop()
        return 0
    finally:
        waker.close()


def run_serve(config: Config, port: int | None = None) -> int:
    """``fluxworker serve``: the worker in the main thread, the API beside it."""
    give_back_freed_memory()
    server = ApiServer(config, port)
    if not _start_or_explain(server):
        return 2
    try:
        return run_worker(config)
    finally:
        server.stop()
