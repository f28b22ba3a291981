"""Job metrics: counted by the worker, exposed by the API in Prometheus format.

The worker and the API are separate processes. The worker keeps its counters in a small JSON
snapshot (``inbox/processing/.metrics.json``, replaced atomically after each job and reloaded at
start, so counters survive restarts), and its MQTT bridge counts the messages it refuses in
another (``inbox/mqtt/.metrics.json``); the API turns the snapshot, plus the queue it sees on disk,
into Prometheus metric families at each scrape.
"""

from __future__ import annotations

import bisect
import json
import logging
import threading
from pathlib import Path
from typing import Iterable

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from .inbox import Inbox, read_json, write_atomic

log = logging.getLogger(__name__)

SNAPSHOT_NAME = ".metrics.json"
BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


class JobMetrics:
    """The worker's counters: jobs by type, engine, transport and outcome; run durations."""

    def __init__(self, path: Path):
        self.path = path
        data = read_json(path)
        data = data if isinstance(data, dict) else {}
        self.jobs: dict[str, int] = dict(data.get("jobs", {}))
        self.durations: dict[str, dict] = dict(data.get("durations", {}))
        self.steps_per_second: float | None = data.get("steps_per_second")
        self.model_load_seconds: dict[str, float] = {}
        self.gpu: dict[str, float] = {}
        self._lock = threading.Lock()  # the engine's thread and the finisher's both record

    def record(self, *, job_type: str, engine: str, transport: str, outcome: str, run_s: float,
               steps: int | None) -> None:
        """Count one job. ``run_s`` is the engine's time alone (the completion record's
        ``timings.run_s``), and ``steps`` the progress it reported: denoising steps for FLUX, but
        tiles for the upscaler and stages for LaMa, so only FLUX's set the steps per second."""
        with self._lock:
            self._record(job_type, engine, transport, outcome, run_s, steps)

    def _record(self, job_type: str, engine: str, transport: str, outcome: str, run_s: float,
                steps: int | None) -> None:
        key = f"{job_type}|{engine}|{transport}|{outcome}"
        self.jobs[key] = self.jobs.get(key, 0) + 1
        if outcome == "rejected":
            return
        hist = self.durations.setdefault(f"{job_type}|{engine}", {"buckets": [0] * len(BUCKETS), "count": 0,
                                                                     "sum": 0.0})
        index = bisect.bisect_left(BUCKETS, run_s)
        for i in range(index, len(BUCKETS)):
            hist["buckets"][i] += 1
        hist["count"] += 1
        hist["sum"] += run_s
        if steps and run_s > 0 and outcome == "done" and job_type == "generate" and engine == "flux":
            self.steps_per_second = steps / run_s
        self.gpu = _gpu_memory()

    def sample_gpu(self) -> None:
        """Take the CUDA memory figures now (say, once the models are loaded), not only after a job."""
        with self._lock:
            self.gpu = _gpu_memory()

    def count_rejected(self, transport: str, job_type: str = "unknown") -> None:
        """One more message or file refused before it became a job; saved at once."""
        self.record(job_type=job_type, engine="none", transport=transport, outcome="rejected", run_s=0.0,
                    steps=None)
        try:
            self.save()
        except OSError as exc:
            log.warning("cannot save the job metrics: %s", exc)

    def save(self) -> None:
        with self._lock:
            data = json.dumps({
                "jobs": self.jobs, "durations": self.durations, "steps_per_second": self.steps_per_second,
                "model_load_seconds": self.model_load_seconds, "gpu": self.gpu,
            }).encode()
            write_atomic(self.path, data, durable=False)


def _gpu_memory() -> dict[str, float]:
    import torch

    if not torch.cuda.is_available():
        return {}
    return {"allocated_bytes": float(torch.cuda.memory_allocated()),
            "reserved_bytes": float(torch.cuda.memory_reserved()),
            "max_allocated_bytes": float(torch.cuda.max_memory_allocated())}


class _SnapshotCollector:
    def __init__(self, inbox: Inbox):
        self.inbox = inbox

    def collect(self) -> Iterable:
        data = read_json(self.inbox.processing / SNAPSHOT_NAME)
        data = data if isinstance(data, dict) else {}
        counts = dict(data.get("jobs", {}))
        # The MQTT bridge counts the messages it refuses in a snapshot of its own.
        bridge = read_json(self.inbox.root / "mqtt" / SNAPSHOT_NAME)
        for key, value in (bridge.get("jobs", {}) if isinstance(bridge, dict) else {}).items():
            counts[key] = counts.get(key, 0) + value
        jobs = CounterMetricFamily("fluxworker_jobs", "Jobs finished, by type, engine, transport and outcome.",
                                   labels=["type", "engine", "transport", "outcome"])
        for key, value in sorted(counts.items()):
            jobs.add_metric(key.split("|"), value)
        yield jobs

        durations = HistogramMetricFamily("fluxworker_job_run_seconds", "Time a job ran on its engine.",
                                          labels=["type", "engine"])
        for key, hist in sorted(data.get("durations", {}).items()):
            buckets = [(f"{bound:g}", count) for bound, count in zip(BUCKETS, hist["buckets"])]
            buckets.append(("+Inf", hist["count"]))
            durations.add_metric(key.split("|"), buckets, hist["sum"])
        yield durations

        queue = GaugeMetricFamily("fluxworker_queue_depth", "Jobs waiting in the inbox.")
        queue.add_metric([], len(self.inbox.scan()))
        yield queue

        status = self.inbox.read_status() or {}
        running = GaugeMetricFamily("fluxworker_job_running", "1 while the worker runs a job.")
        running.add_metric([], 1 if status.get("state") == "running" else 0)
        yield running
        ready = GaugeMetricFamily("fluxworker_worker_ready", "1 when the worker has loaded its models.")
        ready.add_metric([], 1 if status.get("ready") else 0)
        yield ready

        if data.get("steps_per_second") is not None:
            speed = GaugeMetricFamily("fluxworker_steps_per_second", "Denoising steps per second of the last FLUX job.")
            speed.add_metric([], data["steps_per_second"])
            yield speed
        load = GaugeMetricFamily("fluxworker_model_load_seconds", "Time each engine took to load.",
                                 labels=["engine"])
        for engine, seconds in sorted(data.get("model_load_seconds", {}).items()):
            load.add_metric([engine], seconds)
        yield load
        if data.get("gpu"):
            gpu = GaugeMetricFamily("fluxworker_gpu_memory_bytes", "CUDA memory of the worker after its last job.",
                                    labels=["kind"])
            for kind, value in sorted(data["gpu"].items()):
                gpu.add_metric([kind.removesuffix("_bytes")], value)
            yield gpu


def render(inbox: Inbox) -> bytes:
    """The Prometheus text exposition of the worker's snapshot and the queue."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_SnapshotCollector(inbox))
    return generate_latest(registry)
