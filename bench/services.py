"""The service's processes for the reliability benchmarks: a worker and an API that can be killed
and started again, a config on the tiny models, and a few shared helpers.

Each start of a process logs to a file of its own (``logs/worker-3.log``), so what every run did can
be read afterwards, crashes included. Processes are only ever signalled by the pid this module
started.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import requests
import yaml

from fluxworker import tiny

ROOT = Path(__file__).resolve().parent.parent

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile by nearest rank; 0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def json_body(response: requests.Response) -> dict:
    """A response's JSON object, or {} when the body is not one."""
    try:
        body = response.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def options_parser(description: str, defaults) -> argparse.ArgumentParser:
    """A command line with an option for each field of the ``defaults`` dataclass
    (``--worker-kills`` for ``worker_kills``), plus ``--models`` and ``--json``."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, value in asdict(defaults).items():
        parser.add_argument("--" + name.replace("_", "-"), type=type(value), default=value)
    parser.add_argument("--models", type=Path, help="a folder of tiny models (written when missing)")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    return parser


def parsed_options(args: argparse.Namespace, defaults):
    """The ``defaults`` dataclass with the values ``args`` gave."""
    return type(defaults)(**{name: getattr(args, name) for name in asdict(defaults)})


def print_report(report: dict, json_path: Path | None) -> None:
    """Print a run's figure lines, and write all its figures to ``json_path`` when given."""
    if json_path:
        json_path.write_text(json.dumps(report, indent=2))
    for line in report["lines"]:
        print(line)


def child_env() -> dict[str, str]:
    """The environment of the service's processes: offline, unbuffered logs, and one torch thread
    (the worker shares a small machine with its clients, the API and the broker)."""
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", HF_HUB_DISABLE_PROGRESS_BARS="1", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    path = env.get("PYTHONPATH", "")
    if str(ROOT) not in path.split(os.pathsep):
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), path) if p)
    return env


def tiny_models(folder: Path) -> Path:
    """The tiny models in ``folder``, written there unless they already are."""
    from fluxworker.tiny import write_tiny_models

    if not (folder / "flux" / "model_index.json").exists():
        write_tiny_models(folder)
    return folder


def write_config(folder: Path, model_dir: Path, **sections) -> Path:
    """``folder/config.yaml``: the tiny models from ``model_dir``, inbox and outputs in ``folder``,
    the API on 127.0.0.1; ``sections`` override keys."""
    return tiny.write_config(folder, {
        "paths": {"inbox": "inbox", "outputs": "outputs"},
        "models": {"flux": str(model_dir / "flux"), "esrgan": str(model_dir / "esrgan.pth"), "lama": None,
                   "device": "cpu", "dtype": "float32"},
        "limits": {"max_width": 1024, "max_height": 1024},
        "inbox": {"scan_interval": 1.0, "settle_seconds": 2.0},
        "worker": {"stop_timeout": 10.0, "log_level": "INFO"},
        "http": {"host": "127.0.0.1", "port": free_port()},
    }, **sections)


class Service:
    """``fluxworker <command>`` as a subprocess that may be killed and started again any number of
    times; ``runs`` counts the starts."""

    def __init__(self, command: str, config: Path, logs: Path):
        self.command = command
        self.config = config
        self.folder = config.parent
        self.logs = logs
        self.logs.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen | None = None
        self.runs = 0
        self.started_at = 0.0

    def argv(self) -> list[str]:
        return [sys.executable, "-m", "fluxworker", self.command, "--config", str(self.config)]

    def start(self) -> "Service":
        self.runs += 1
        with open(self.logs / f"{self.command}-{self.runs}.log", "wb") as log:
            self.proc = subprocess.Popen(self.argv(), stdout=log, stderr=subprocess.STDOUT, cwd=self.folder,
                                         env=child_env())
        self.started_at = time.monotonic()
        return self

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, signum: int, timeout: float = 60.0) -> int | None:
        """Send ``signum`` to this process and wait for it to end; its exit status (negative: the
        signal that ended it)."""
        if not self.alive():
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signum)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(timeout=30)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)

    def stop(self, timeout: float = 60.0) -> int | None:
        return self.signal(signal.SIGTERM, timeout)

    def ready(self) -> bool:
        raise NotImplementedError

    def wait_ready(self, timeout: float = 120.0) -> bool:
        """Wait until the process serves; False when it exited or ``timeout`` passed."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                return False
            if self.ready():
                return True
            time.sleep(0.05)
        return False

    def log_texts(self) -> list[str]:
        """The logs of every run, oldest first."""
        return [(self.logs / f"{self.command}-{n}.log").read_text(errors="replace") for n in range(1, self.runs + 1)]


class WorkerService(Service):
    def __init__(self, config: Path, logs: Path):
        super().__init__("worker", config, logs)
        self.status_path = self.folder / "inbox" / "processing" / ".status.json"

    def status(self) -> dict:
        try:
            status = json.loads(self.status_path.read_text())
        except (OSError, ValueError):
            return {}
        return status if isinstance(status, dict) else {}

    def ready(self) -> bool:
        status = self.status()
        return status.get("pid") == self.pid and bool(status.get("ready"))


class ApiService(Service):
    """``fluxworker api`` (ready once it answers /health), or ``serve`` (ready once /ready says the
    worker beside it has loaded its models)."""

    def __init__(self, config: Path, logs: Path, command: str = "api"):
        super().__init__(command, config, logs)
        self.port = yaml.safe_load(config.read_text())["http"]["port"]
        self.url = f"http://127.0.0.1:{self.port}"

    def argv(self) -> list[str]:
        return super().argv() + ["--port", str(self.port)]

    def ready(self) -> bool:
        try:
            path = "/health" if self.command == "api" else "/ready"
            return requests.get(self.url + path, timeout=2).status_code == 200
        except requests.RequestException:
            return False


def rss_bytes(pid: int) -> int:
    """Resident memory of a process."""
    import psutil

    return psutil.Process(pid).memory_info().rss
