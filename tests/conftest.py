"""Shared fixtures: tiny real models, per-test configs and folders, and worker subprocesses.

Nothing here is faked: the models are real diffusers models at toy sizes, the folders are real,
and workers run as real subprocesses. Only the GPU is absent; everything runs on the CPU.
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from fluxworker import tiny

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """Tiny models written once per test session by the project's own writer."""
    from fluxworker.tiny import write_tiny_models

    root = tmp_path_factory.mktemp("tiny")
    write_tiny_models(root)
    return root


def tiny_flux_pipeline():
    """The tiny FLUX in memory with more transformer blocks (2 double, 4 single), so that balanced
    mode can stream some and keep others; every module in eval mode. Deterministic."""
    import torch
    from diffusers import FluxTransformer2DModel

    from fluxworker.tiny import build_tiny_flux

    pipe = build_tiny_flux(0)
    torch.manual_seed(1)
    pipe.transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=2, num_single_layers=4, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=False,
        axes_dims_rope=(4, 4, 8))
    for module in pipe.components.values():
        if hasattr(module, "eval"):
            module.eval()
    return pipe


def streaming_performance(pipe, **settings):
    """Performance settings whose balanced budget is just under everything resident, so that T5 and
    some transformer blocks stream (the tiny model's sizes, in GiB)."""
    from fluxworker.config import PerformanceConfig
    from fluxworker.engines.placement import GIB, encoder_places, pipeline_modules
    from fluxworker.engines.streaming import tensor_bytes

    encoder = sum(tensor_bytes(modules[i]) for modules, i in encoder_places(pipe.text_encoder_2))
    total = sum(tensor_bytes(module) for module in pipeline_modules(pipe))
    reserve = 256 * 1024
    values = dict(balanced_vram_gib=(total - encoder + reserve - 4096) / GIB, balanced_reserve_gib=reserve / GIB,
                  fuse_qkv=False, vae_channels_last=False)
    values.update(settings)
    return PerformanceConfig(**values)


def write_config(folder: Path, tiny_dir: Path, **sections) -> Path:
    """A config in ``folder`` that uses the session's tiny models; ``sections`` override keys."""
    return tiny.write_config(folder, {
        "paths": {"inbox": "inbox", "outputs": "outputs"},
        "models": {"flux": str(tiny_dir / "flux"), "device": "cpu", "dtype": "float32"},
        "limits": {"max_width": 1024, "max_height": 1024},
        "inbox": {"scan_interval": 1.0, "settle_seconds": 2.0},
        "worker": {"stop_timeout": 60.0, "log_level": "INFO"},
        "http": {"host": "127.0.0.1"},
    }, **sections)


@pytest.fixture
def config_file(tmp_path, tiny_dir) -> Path:
    return write_config(tmp_path, tiny_dir)


def png_b64(size=(64, 64), color=(200, 30, 30), mode="RGB", fmt="PNG", data_url=True) -> str:
    """A real encoded image as a data URL (or bare base64)."""
    buffer = io.BytesIO()
    Image.new(mode, size, color).save(buffer, format=fmt)
    encoded = base64.b64encode(buffer.getvalue()).decode()
    mime = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp", "GIF": "image/gif"}[fmt]
    return f"data:{mime};base64,{encoded}" if data_url else encoded


def drop(inbox: Path, job: dict, name: str | None = None) -> Path:
    """Drop a job file the way a producer should: temporary dotfile, then rename."""
    name = name or f"{job['id']}.json"
    tmp = inbox / f".{name}.tmp"
    tmp.write_text(json.dumps(job), encoding="utf-8")
    os.rename(tmp, inbox / name)
    return inbox / name


def wait_for(predicate, timeout: float = 60.0, interval: float = 0.05, what: str = "condition"):
    """Poll ``predicate`` until it returns something truthy; bounded in time."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def read_record(outputs: Path, job_id: str) -> dict | None:
    try:
        return json.loads((outputs / f"{job_id}.json").read_text())
    except (OSError, ValueError):
        return None


def wait_record(outputs: Path, job_id: str, timeout: float = 90.0) -> dict:
    return wait_for(lambda: read_record(outputs, job_id), timeout, what=f"completion record of {job_id}")


class WorkerProcess:
    """``fluxworker worker`` as a real subprocess, with its log captured to a file."""

    def __init__(self, config_file: Path):
        self.config_file = config_file
        self.folder = config_file.parent
        self.log_path = self.folder / f"worker-{time.monotonic_ns()}.log"
        self.proc: subprocess.Popen | None = None

    @property
    def status_path(self) -> Path:
        return self.folder / "inbox" / "processing" / ".status.json"

    def status(self) -> dict:
        try:
            return json.loads(self.status_path.read_text())
        except (OSError, ValueError):
            return {}

    def start(self, wait_ready: bool = True) -> "WorkerProcess":
        self.status_path.unlink(missing_ok=True)
        log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fluxworker", "worker", "--config", str(self.config_file)],
            stdout=log, stderr=subprocess.STDOUT, cwd=self.folder,
        )
        log.close()
        if wait_ready:
            wait_for(
                # Loading is over (ready, or serving without a model that failed to load).
                lambda: self.status().get("state") in ("idle", "running", "blocked") or self.proc.poll() is not None,
                timeout=120, what="worker started",
            )
            assert self.proc.poll() is None, self.log()
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def terminate(self, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)


@pytest.fixture
def worker_factory():
    """Start workers; every one still running at the end of the test is killed."""
    started: list[WorkerProcess] = []

    def start(config_file: Path, wait_ready: bool = True) -> WorkerProcess:
        worker = WorkerProcess(config_file).start(wait_ready)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.kill()


@pytest.fixture(scope="module")
def shared_worker(tmp_path_factory, tiny_dir):
    """One worker for a whole test module; tests use distinct job ids."""
    folder = tmp_path_factory.mktemp("shared")
    worker = WorkerProcess(write_config(folder, tiny_dir)).start()
    yield worker
    worker.kill()


def run_cli(*args: str, timeout: float = 120.0, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fluxworker", *args],
        capture_output=True, text=True, timeout=timeout, **kwargs,
    )


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess(WorkerProcess):
    """``fluxworker serve`` (worker and API) or ``fluxworker api`` as a subprocess on a free port."""

    def __init__(self, config_file: Path, command: str = "serve"):
        super().__init__(config_file)
        self.command = command
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"

    def start(self, wait_ready: bool = True) -> "ServerProcess":
        import requests

        log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fluxworker", self.command, "--config", str(self.config_file),
             "--port", str(self.port)],
            stdout=log, stderr=subprocess.STDOUT, cwd=self.folder,
        )
        log.close()

        def up():
            if self.proc.poll() is not None:
                return True
            try:
                if requests.get(self.url + "/health", timeout=2).status_code != 200:
                    return False
            except requests.RequestException:
                return False
            # serve: the worker beside the API must have loaded its models too
            return self.command != "serve" or self.status().get("state") in ("idle", "running", "blocked")

        if wait_ready:
            wait_for(up, timeout=120, interval=0.1, what=f"fluxworker {self.command} up")
            assert self.proc.poll() is None, self.log()
        return self


@pytest.fixture
def server_factory():
    """Start servers; every one still running at the end of the test is killed."""
    started: list[ServerProcess] = []

    def start(config_file: Path, command: str = "serve") -> ServerProcess:
        server = ServerProcess(config_file, command).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.kill()


@pytest.fixture(scope="session")
def lama_file(tmp_path_factory) -> Path:
    """LaMa with random weights (the real architecture, about 205 MB), written once per session
    into a temporary folder by the project's own writer."""
    from fluxworker.tiny import write_random_lama

    return write_random_lama(tmp_path_factory.mktemp("lama") / "lama.pth")


# -- MQTT: a real mosquitto per test, and recording clients --------------------------------------


@pytest.fixture
def broker(tmp_path):
    """A fresh mosquitto on a free port, with persistence in its own folder; killed at the end."""
    from brokers import Broker

    running = Broker(tmp_path / "broker").start()
    yield running
    running.kill()


@pytest.fixture
def probe_factory():
    """Start recording MQTT clients (``brokers.Probe``); all are closed at the end."""
    from brokers import Probe

    probes = []

    def make(broker, *args, **kwargs):
        probe = Probe(broker, *args, **kwargs)
        probes.append(probe)
        return probe

    yield make
    for probe in probes:
        probe.close()


def mqtt_section(broker, **overrides) -> dict:
    """The ``mqtt`` config section of a worker on ``broker``."""
    return {"enabled": True, "host": "127.0.0.1", "port": broker.port, "reconnect_min_delay": 1,
            "reconnect_max_delay": 2, **overrides}
