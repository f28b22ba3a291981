"""Command line: ``fluxworker worker | submit | check-config | tiny-models | demo``."""

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
    config = _config(args)
    print(f"# {config.source}: valid")
    import yaml

    print(yaml.safe_dump(config.dump(), sort_keys=False), end="")
    return 0


def cmd_worker(args) -> int:
    config = _config(args)
    _setup_logging(config.worker.log_level)
    from .worker import run_worker

    return run_worker(config)


def cmd_tiny_models(args) -> int:
    _setup_logging()
    from transformers.utils import logging as tlogging

    tlogging.disable_progress_bar()
    from .tiny import write_tiny_models

    started = time.monotonic()
    path = write_tiny_models(args.dir)
    print(f"tiny models written in {time.monotonic() - started:.1f}s; config: {path}")
    return 0


class _ProgressBar:
    """One line on a terminal: queue position, then steps."""

    def __init__(self, stream):
        self.stream = stream
        self.enabled = stream.isatty()

    def __call__(self, state: dict) -> None:
        if not self.enabled:
            return
        if state["status"] == "queued":
            text = f"queued (position {state['position']})"
        else:
            step, total = state.get("step") or 0, state.get("total") or 0
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


DEMO_JOB = {
    "prompt": "A neon sign in a rainy street",
    "no_text": True,
    "width": 512,
    "height": 512,
    "num_inference_steps": 4,
    "seed": 42,
}


def cmd_demo(args) -> int:
    """Start a worker on the tiny models, send it a real job, and print the image's path."""
    _setup_logging()
    root = Path(args.dir).resolve()
    config_file = root / "config.yaml"
    if not config_file.exists():
        from transformers.utils import logging as tlogging

        tlogging.disable_progress_bar()
        from .tiny import write_tiny_models

        write_tiny_models(root)
        log.info("tiny models written to %s", root)
    config = load_config(config_file)
    from .inbox import Inbox
    from .jobs import new_job_id, parse_job
    from .waiter import CompletionWaiter

    worker = subprocess.Popen([sys.executable, "-m", "fluxworker", "worker", "--config", str(config_file)])
    try:
        job = parse_job({**DEMO_JOB, "id": f"demo-{new_job_id()}"}, config.limits)
        inbox = Inbox(config.paths.inbox, config.paths.outputs)
        inbox.ensure()
        inbox.submit(job.spec)
        log.info("job %s submitted: %s", job.id, json.dumps(DEMO_JOB))
        with CompletionWaiter(inbox) as waiter:
            record = waiter.wait(job.id, args.timeout)
        if record is None or worker.poll() is not None:
            log.error("no result from the worker (exit status %s)", worker.poll())
            return EXIT_FAILED
        print(json.dumps(record, indent=2))
        if record["status"] != "done":
            return EXIT_FAILED
        print(f"image: {inbox.outputs / record['file']}")
        return 0
    finally:
        if worker.poll() is None:
            worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(timeout=60)
            except subprocess.TimeoutExpired:
                worker.kill()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fluxworker", description=__doc__)
    parser.add_argument("--version", action="version", version=f"fluxworker {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(p):
        p.add_argument("--config", help="config file (default: $FLUXWORKER_CONFIG, else ./config.yaml)")
        return p

    p = with_config(sub.add_parser("worker", help="run the resident worker on the inbox"))
    p.set_defaults(func=cmd_worker)

    p = with_config(sub.add_parser("submit", help="drop a job file into the inbox atomically"))
    p.add_argument("job", help="job JSON file, or - for standard input")
    p.add_argument("--wait", action="store_true", help="wait for the result, with progress on a terminal")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait with --wait (default 3600)")
    p.set_defaults(func=cmd_submit)

    p = with_config(sub.add_parser("check-config", help="validate the config and print the effective values"))
    p.set_defaults(func=cmd_check_config)

    p = sub.add_parser("tiny-models", help="write tiny random models and DIR/config.yaml")
    p.add_argument("dir")
    p.set_defaults(func=cmd_tiny_models)

    p = sub.add_parser("demo", help="run a job on the tiny models and print the image path")
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
