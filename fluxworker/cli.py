"""Command line: ``fluxworker worker | api | serve | submit | status | info | check-config | tiny-models | demo``."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from . import __version__
from .config import Config, ConfigError, load_config

log = logging.getLogger("fluxworker")

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_TIMEOUT = 3


def _setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(
        stream=sys.stderr,
        level=getattr(logging, level),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # Library chatter (load reports, deprecation notes) is not the service's log.
    for name in ("diffusers", "transformers", "accelerate", "watchdog", "PIL"):
        logging.getLogger(name).setLevel(max(logging.WARNING, getattr(logging, level)))
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def _config(args) -> Config:
    return load_config(args.config)


def cmd_check_config(args) -> int:
    """Print the effective config (secrets hidden), then what this machine still lacks for it:
    exits non-zero exactly when the worker would refuse to start."""
    config = _config(args)
    import yaml

    from .preflight import preflight

    print(f"# {config.source}: valid")
    print(yaml.safe_dump(config.dump(), sort_keys=False), end="")
    found = preflight(config)
    for line in found.warnings:
        print(f"warning: {line}", file=sys.stderr)
    for line in found.errors:
        print(f"error: {line}", file=sys.stderr)
    return EXIT_FAILED if found.errors else 0


def cmd_worker(args) -> int:
    config = _config(args)
    _setup_logging(config.worker.log_level)
    from .worker import run_worker

    return run_worker(config)


def cmd_api(args) -> int:
    config = _config(args)
    _setup_logging(config.worker.log_level)
    from .server import run_api

    return run_api(config, args.port)


def cmd_serve(args) -> int:
    config = _config(args)
    _setup_logging(config.worker.log_level)
    from .server import run_serve

    return run_serve(config, args.port)


def cmd_tiny_models(args) -> int:
    _setup_logging()
    from transformers.utils import logging as tlogging

    tlogging.disable_progress_bar()
    from .tiny import write_tiny_models

    started = time.monotonic()
    path = write_tiny_models(args.dir, with_lama=args.with_lama)
    print(f"tiny models written in {time.monotonic() - started:.1f}s; config: {path}")
    return 0


def _stop_with_parent() -> None:
    """In the demo's service process: a SIGTERM when the demo dies, however it dies (Linux), so
    that a killed demo leaves no service behind."""
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def cmd_status(args) -> int:
    """The queue, the running job and the last results, from the folders."""
    from .inbox import Inbox
    from .statusfile import process_alive

    config = _config(args)
    inbox = Inbox(config.paths.inbox, config.paths.outputs)
    status = inbox.read_status() or {}
    queue = inbox.scan()
    records = inbox.recent(args.last)
    pid = status.get("pid")
    alive = process_alive(pid)
    if args.json:
        # "alive" tells a worker that died without saying so (its last state stays "running").
        print(json.dumps({"worker": {**status, "alive": alive}, "queued": [e.name[:-5] for e in queue],
                          "recent": records}, indent=2))
        return 0
    state = status.get("state")
    if state is None:
        print("worker: never started (no status file)")
    elif alive or state == "stopped":
        print(f"worker: {state}" + (f", pid {pid}" if alive else ""))
    else:
        print(f"worker: {state} (process {pid} is gone)")
    for engine, reason in (status.get("unavailable") or {}).items():
        print(f"  {engine} unavailable: {reason}")
    job = status.get("job")
    if alive and job:
        print(f"running: {job['id']} ({job['type']}, {job['engine']}) step {job.get('step')}/{job.get('total') or '?'}")
    print(f"queued: {len(queue)}" + (": " + ", ".join(e.name[:-5] for e in queue[:10]) if queue else ""))
    if len(queue) > 10:
        print(f"  ... and {len(queue) - 10} more")
    print(f"last {len(records)} results:")
    for record in records:
        if record.get("status") == "done":
            detail = f"{record.get('url')} seed={record.get('seed')} in {record.get('timings', {}).get('run_s', 0):.2f}s"
        else:
            error = record.get("error") or {}
            detail = f"{error.get('code')}: {error.get('message')}"
        print(f"  {record.get('finished_at', '?')}  {record.get('id')}  {record.get('status')}  {detail}")
    return 0


def cmd_info(args) -> int:
    """The parameters stored in an image, and the job that makes it again."""
    from .metadata import read_parameters

    try:
        found = read_parameters(args.image)
    except (OSError, ValueError) as exc:
        print(f"cannot read {args.image}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    document = found["fluxworker"]
    if args.job:
        if not document:
            print(f"{args.image} carries no fluxworker parameters", file=sys.stderr)
            return EXIT_FAILED
        print(json.dumps(document["job"], indent=2))
        return 0
    if found["parameters"] is None and document is None:
        print(f"{args.image} carries no generation parameters", file=sys.stderr)
        return EXIT_FAILED
    if found["parameters"] is not None:
        print(found["parameters"])
    if document is not None:
        if document.get("model"):
            settings = ", ".join(f"{k}={str(v).lower()}" for k, v in sorted((document.get("settings") or {}).items()))
            print(f"\nmade with model {document['model']}" + (f" ({settings})" if settings else "")
                  + ": the same job gives the same image with the same model and settings")
        print()
        print("job (fluxworker info --job IMAGE > job.json; fluxworker submit job.json):")
        print(json.dumps(document["job"], indent=2))
        if document.get("inputs"):
            print("input images (SHA-256; add them back as image/mask to rerun):")
            for name, digest in document["inputs"].items():
                print(f"  {name}: {digest}")
    return 0


class _ProgressBar:
    """One line on a terminal: queue position, then steps."""

    def __init__(self, stream):
        self.stream = stream
        self.enabled = stream.isatty()
        self._seen = (0, 0)  # the furthest step shown: between the last step and the record, the
        # job is still in processing/ but the status no longer names it, and the bar must not go back

    def __call__(self, state: dict) -> None:
        if not self.enabled:
            return
        if state["status"] == "queued":
            text = f"queued (position {state['position']})"
        else:
            step, total = state.get("step") or 0, state.get("total") or 0
            if step < self._seen[0]:
                step, total = self._seen
            self._seen = (step, total)
            filled = int(30 * step / total) if total else 0
            text = f"running [{'#' * filled}{'.' * (30 - filled)}] {step}/{total or '?'}"
        self.stream.write(f"\r\x1b[2K{state['id']}: {text}")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\r\x1b[2K")
            self.stream.flush()


def cmd_submit(args) -> int:
    from .errors import JobError
    from .inbox import Inbox
    from .jobs import parse_job, parse_json

    config = _config(args)
    try:
        raw = sys.stdin.buffer.read() if args.job == "-" else Path(args.job).read_bytes()
    except OSError as exc:
        print(f"cannot read {args.job}: {exc.strerror}", file=sys.stderr)
        return EXIT_USAGE
    try:
        job = parse_job(parse_json(raw, config.limits.max_job_bytes), config.limits)
    except JobError as exc:
        print(json.dumps({"error": exc.to_dict()}), file=sys.stderr)
        return EXIT_USAGE
    inbox = Inbox(config.paths.inbox, config.paths.outputs)
    inbox.ensure()
    if inbox.completion(job.id) is None:
        inbox.submit(job.spec)
        print(f"submitted {job.id} to {inbox.root}", file=sys.stderr)
    else:
        print(f"{job.id} already has a completion record", file=sys.stderr)
    if not args.wait:
        print(job.id)
        return 0
    from .waiter import CompletionWaiter

    bar = _ProgressBar(sys.stderr)
    try:
        with CompletionWaiter(inbox) as waiter:
            record = waiter.wait(job.id, args.timeout, on_state=bar)
    finally:
        bar.close()
    if record is None:
        print(f"{job.id}: no result after {args.timeout:.0f}s (the job stays queued)", file=sys.stderr)
        return EXIT_TIMEOUT
    print(json.dumps(record, indent=2))
    if record["status"] == "done":
        print(f"image: {inbox.outputs / record['file']}", file=sys.stderr)
        return 0
    return EXIT_FAILED


DEMO_REQUEST = {"prompt": "A neon sign in a rainy street", "no_text": True, "width": 512, "height": 512, "seed": 42}


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _http(method: str, url: str, body: dict | None = None, timeout: float = 30.0) -> tuple[int, bytes]:
    import urllib.error
    import urllib.request

    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method,
                                     headers={"Content-Type": "application/json"} if data else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def cmd_demo(args) -> int:
    """Serve the tiny models, POST the API document's example, and save the image it returns."""
    _setup_logging()
    root = Path(args.dir).resolve()
    config_file = root / "config.yaml"
    if not config_file.exists():
        from transformers.utils import logging as tlogging

        tlogging.disable_progress_bar()
        from .tiny import write_tiny_models

        write_tiny_models(root)
        log.info("tiny models written to %s", root)
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "fluxworker", "serve", "--config", str(config_file),
                               "--port", str(port)], preexec_fn=_stop_with_parent)
    try:
        deadline = time.monotonic() + args.timeout
        while True:
            if server.poll() is not None:
                log.error("the service exited with status %s", server.returncode)
                return EXIT_FAILED
            try:
                status, body = _http("GET", f"{base}/ready", timeout=2)
                ready = json.loads(body) if body.startswith(b"{") else {}
                if status == 200:
                    break
                if ready.get("worker") in ("idle", "running"):  # loaded, but a model failed to load
                    if "flux" in ready.get("engines", []):
                        log.warning("serving without %s", ", ".join(ready.get("unavailable") or {}) or "?")
                        break
                    log.error("FLUX is unavailable: %s", (ready.get("unavailable") or {}).get("flux"))
                    return EXIT_FAILED
            except OSError:
                pass
            if time.monotonic() > deadline:
                log.error("the service was not ready after %.0fs", args.timeout)
                return EXIT_FAILED
            time.sleep(0.2)
        log.info("POST %s/generate %s", base, json.dumps(DEMO_REQUEST))
        status, body = _http("POST", f"{base}/generate", DEMO_REQUEST, timeout=args.timeout)
        print(f"HTTP {status}: {body.decode()}")
        if status != 200:
            return EXIT_FAILED
        url = json.loads(body)["url"]
        status, image = _http("GET", base + url)
        if status != 200 or not image.startswith(b"\x89PNG"):
            log.error("GET %s answered %s", url, status)
            return EXIT_FAILED
        config = load_config(config_file)
        print(f"image: {config.paths.outputs / url.rsplit('/', 1)[1]} ({len(image)} bytes, served at {base}{url})")
        return 0
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                server.kill()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fluxworker", description=__doc__)
    parser.add_argument("--version", action="version", version=f"fluxworker {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(p):
        p.add_argument("--config", help="config file (default: $FLUXWORKER_CONFIG, else ./config.yaml)")
        return p

    p = with_config(sub.add_parser("worker", help="run the resident worker on the inbox"))
    p.set_defaults(func=cmd_worker)

    for name, func, text in (("api", cmd_api, "serve the HTTP API (the worker runs separately)"),
                             ("serve", cmd_serve, "run the worker and the HTTP API together")):
        p = with_config(sub.add_parser(name, help=text))
        p.add_argument("--port", type=int, help="TCP port (default: http.port from the config)")
        p.set_defaults(func=func)

    p = with_config(sub.add_parser("submit", help="drop a job file into the inbox atomically"))
    p.add_argument("job", help="job JSON file, or - for standard input")
    p.add_argument("--wait", action="store_true", help="wait for the result, with progress on a terminal")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait with --wait (default 3600)")
    p.set_defaults(func=cmd_submit)

    p = with_config(sub.add_parser("check-config", help="validate the config and print the effective values"))
    p.set_defaults(func=cmd_check_config)

    p = with_config(sub.add_parser("status", help="print the queue, the running job and the last results"))
    p.add_argument("--last", type=int, default=5, help="how many recent results (default 5)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("info", help="print the parameters stored in an output image")
    p.add_argument("image")
    p.add_argument("--job", action="store_true", help="print only the job JSON that makes the image again")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("tiny-models", help="write tiny random models and DIR/config.yaml")
    p.add_argument("dir")
    p.add_argument("--with-lama", action="store_true", help="also write a LaMa with random weights (about 205 MB)")
    p.set_defaults(func=cmd_tiny_models)

    p = sub.add_parser("demo", help="serve the tiny models, send a real request, print the image path")
    p.add_argument("--dir", default="demo", help="where the tiny models and the demo's folders go")
    p.add_argument("--timeout", type=float, default=300.0)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"fluxworker: {exc}", file=sys.stderr)
        return EXIT_USAGE
