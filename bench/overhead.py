#!/usr/bin/env python3
"""The service's own cost on the CPU with the tiny models.

Measures a direct engine call, then the same job submitted through the inbox to a worker
subprocess (submit to completion record) and through the HTTP API (`fluxworker api` as its own
process: request to response), the throughput of a queue of jobs and the fraction of that time the
engine was busy, and the CPU use of the worker and the API while idle. What the HTTP facade adds
over the inbox alone is the difference of the HTTP and inbox quantiles of the same run.

    python bench/overhead.py [--jobs 100] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import psutil  # noqa: E402  (installed with accelerate)
import requests  # noqa: E402
import yaml  # noqa: E402

from fluxworker.config import load_config  # noqa: E402
from fluxworker.engines import RunContext  # noqa: E402
from fluxworker.engines.flux import FluxEngine  # noqa: E402
from fluxworker.images import png_bytes  # noqa: E402
from fluxworker.inbox import Inbox  # noqa: E402
from fluxworker.jobs import parse_job  # noqa: E402
from fluxworker.tiny import write_tiny_models  # noqa: E402
from fluxworker.waiter import CompletionWaiter  # noqa: E402
from services import free_port, percentile  # noqa: E402  (this folder is on the path when run as a script)

JOB = {"prompt": "a tiny benchmark", "width": 64, "height": 64, "num_inference_steps": 1, "seed": 1}


def direct_calls(config, count: int) -> list[float]:
    import torch

    engine = FluxEngine(config.models.flux, device="cpu", dtype=torch.float32,
                        no_text_suffix=config.worker.no_text_suffix)
    engine.load()
    times = []
    for n in range(count + 5):
        job = parse_job({**JOB, "id": f"direct-{n}"}, config.limits)
        started = time.perf_counter()
        png_bytes(engine.run(job, RunContext(seed=1)).image)
        if n >= 5:  # warm-up
            times.append(time.perf_counter() - started)
    engine.close()
    return times


def start(config_file: Path, *command: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "fluxworker", *command, "--config", str(config_file)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def wait_ready(url: str, procs: list[subprocess.Popen]) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs):
            raise SystemExit("a process exited early")
        try:
            if requests.get(url + "/ready", timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.05)
    raise SystemExit("the service did not become ready")


def http_latencies(url: str, count: int) -> list[float]:
    times = []
    with requests.Session() as session:
        for n in range(count + 5):
            started = time.perf_counter()
            response = session.post(url + "/generate", json={**JOB, "id": f"http-{n}"}, timeout=60)
            assert response.status_code == 200, response.text
            if n >= 5:
                times.append(time.perf_counter() - started)
    return times


def inbox_latencies(config, count: int) -> list[float]:
    inbox = Inbox(config.paths.inbox, config.paths.outputs)
    times = []
    with CompletionWaiter(inbox) as waiter:
        for n in range(count + 5):
            job = parse_job({**JOB, "id": f"lat-{n}"}, config.limits)
            started = time.perf_counter()
            inbox.submit(job.spec)
            record = waiter.wait(job.id, timeout=60)
            assert record and record["status"] == "done", record
            if n >= 5:
                times.append(time.perf_counter() - started)
    return times


def queue_throughput(config, count: int) -> tuple[float, float]:
    inbox = Inbox(config.paths.inbox, config.paths.outputs)
    started = time.perf_counter()
    ids = []
    for n in range(count):
        job = parse_job({**JOB, "id": f"q-{n}"}, config.limits)
        inbox.submit(job.spec)
        ids.append(job.id)
    with CompletionWaiter(inbox) as waiter:
        records = [waiter.wait(job_id, timeout=300) for job_id in ids]
    wall = time.perf_counter() - started
    busy = sum(r["timings"]["run_s"] for r in records)
    return count / wall, busy / wall


def idle_cpu(pids: list[int], seconds: float) -> float:
    """CPU used by these processes together, in percent of one core."""
    procs = [psutil.Process(pid) for pid in pids]
    before = [p.cpu_times() for p in procs]
    time.sleep(seconds)
    after = [p.cpu_times() for p in procs]
    used = sum((a.user - b.user) + (a.system - b.system) for a, b in zip(after, before))
    return 100.0 * used / seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=100)
    parser.add_argument("--idle-seconds", type=float, default=10.0)
    parser.add_argument("--json", help="write the figures to this file")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        config_file = write_tiny_models(root)
        data = yaml.safe_load(config_file.read_text())
        config_file.write_text(yaml.safe_dump(data))
        config = load_config(config_file)

        port = free_port()
        data["http"] = {"host": "127.0.0.1", "port": port, "max_queue": args.jobs + 10, "threads": args.jobs + 20}
        config_file.write_text(yaml.safe_dump(data))
        config = load_config(config_file)
        url = f"http://127.0.0.1:{port}"

        direct = direct_calls(config, args.jobs)
        procs = [start(config_file, "worker"), start(config_file, "api")]
        try:
            wait_ready(url, procs)
            time.sleep(1.0)
            idle = idle_cpu([p.pid for p in procs], args.idle_seconds)
            latency = inbox_latencies(config, args.jobs)
            http = http_latencies(url, args.jobs)
            throughput, busy = queue_throughput(config, args.jobs)
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                proc.wait(timeout=60)

    direct_p50 = statistics.median(direct)
    added = [t - direct_p50 for t in latency]
    http_added = [t - direct_p50 for t in http]
    inbox_p50, inbox_p99 = 1000 * statistics.median(latency), 1000 * percentile(latency, 99)
    http_p50, http_p99 = 1000 * statistics.median(http), 1000 * percentile(http, 99)
    figures = {
        "direct_ms_p50": 1000 * direct_p50,
        "direct_ms_p99": 1000 * percentile(direct, 99),
        "inbox_ms_p50": inbox_p50,
        "inbox_ms_p99": inbox_p99,
        "inbox_added_ms_p50": 1000 * statistics.median(added),
        "inbox_added_ms_p99": 1000 * percentile(added, 99),
        "http_ms_p50": http_p50,
        "http_ms_p99": http_p99,
        "http_added_ms_p50": 1000 * statistics.median(http_added),
        "http_added_ms_p99": 1000 * percentile(http_added, 99),
        # What the HTTP facade adds over the inbox alone. The inbox jobs and the HTTP jobs are
        # separate series (all of one, then all of the other), so no job has both times: this is a
        # difference of quantiles, not a quantile of per-job differences, and it can come out
        # negative when the two are within noise.
        "facade_added_ms_p50": http_p50 - inbox_p50,
        "facade_added_ms_p99": http_p99 - inbox_p99,
        "queue_jobs_per_s": throughput,
        "engine_busy_fraction": busy,
        "idle_cpu_percent": idle,
    }
    notes = {
        "facade_added_ms_p50": "http_ms_p50 - inbox_ms_p50 (a difference of quantiles)",
        "facade_added_ms_p99": "http_ms_p99 - inbox_ms_p99 (a difference of quantiles)",
    }
    width = max(map(len, figures))
    print(f"{'figure':<{width}}  {'value':>9}  note")
    for key, value in figures.items():
        print(f"{key:<{width}}  {value:9.3f}  {notes.get(key, '')}".rstrip())
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
