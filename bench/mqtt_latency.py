#!/usr/bin/env python3
"""Publish-to-result latency over MQTT with the tiny models.

Starts a mosquitto (its own config, port and folder) and a worker subprocess with MQTT on, then
publishes jobs one at a time and times each from the publish call to the arrival of its result
message, next to the worker's own run time for the job (``timings.run_s`` in the result). With
``--pause`` each job is sent that long after the previous result (an idle worker); without it,
at once (a busy one).

    python bench/mqtt_latency.py [--jobs 50] [--pause 0.5] [--json FILE]
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

import yaml  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from brokers import Broker, Probe  # noqa: E402
from services import percentile  # noqa: E402  (this folder is on the path when run as a script)

from fluxworker.tiny import write_tiny_models  # noqa: E402

JOB = {"prompt": "a tiny benchmark", "width": 64, "height": 64, "num_inference_steps": 1, "seed": 1}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=50)
    parser.add_argument("--pause", type=float, default=0.0, help="seconds between a result and the next job")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        config_file = write_tiny_models(root / "tiny")
        broker = Broker(root / "broker").start()
        config = yaml.safe_load(config_file.read_text())
        config["mqtt"] = {"enabled": True, "host": "127.0.0.1", "port": broker.port}
        config_file.write_text(yaml.safe_dump(config))
        worker = subprocess.Popen([sys.executable, "-m", "fluxworker", "worker", "--config", str(config_file)],
                                  stderr=subprocess.DEVNULL)
        probe = Probe(broker, topics=["fluxworker/status", "fluxworker/jobs/+/result"])
        try:
            probe.wait_message("fluxworker/status", lambda m: m.payload == b"online", timeout=120)
            latencies, runs = [], []
            for n in range(args.jobs + 3):
                job_id = f"bench-{n}"
                topic = f"fluxworker/jobs/{job_id}/result"
                time.sleep(args.pause)
                started = time.perf_counter()
                probe.publish("fluxworker/jobs", {**JOB, "id": job_id}, wait=False)
                result = probe.wait_message(topic, timeout=120)
                elapsed = time.perf_counter() - started
                if n >= 3:  # the first jobs warm the engine up
                    latencies.append(elapsed)
                    runs.append(result.json()["timings"]["run_s"])
        finally:
            probe.close()
            worker.terminate()
            worker.wait(timeout=60)
            broker.kill()

    figures = {
        "jobs": args.jobs,
        "pause_s": args.pause,
        "publish_to_result_p50_ms": round(1000 * statistics.median(latencies), 1),
        "publish_to_result_p99_ms": round(1000 * percentile(latencies, 99), 1),
        "worker_run_p50_ms": round(1000 * statistics.median(runs), 1),
        "mqtt_and_queue_overhead_p50_ms": round(1000 * (statistics.median(latencies) - statistics.median(runs)), 1),
    }
    print(json.dumps(figures, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
