#!/usr/bin/env python3
"""Load and leaks: a burst of concurrent HTTP clients against a queue limit, then a long row of
tiny jobs while the resident memory of the worker and the API is sampled.

The service runs as two processes, ``fluxworker worker`` and ``fluxworker api``, on the tiny models.

1. Burst: ``--clients`` threads send ``--requests`` POST /generate in total (most wait for their
   image, some ask ``"wait": false``) to an API with ``http.max_queue`` = ``--max-queue``; a client
   answered 503 pauses 0.25 to 1 s (less than the Retry-After it gets) before its next one. Every
   answer must be 200, 202, or 503 with Retry-After, and none may take longer than the configured
   wait (``http.wait_timeout``, plus a few seconds of grace); every job answered 200 or 202 must end
   with a completion record. Prints the answer mix and p50/p99 latency.
2. Leaks: ``--jobs`` jobs in a row through the API (POST, then GET of the image and of the job),
   with the resident memory (RSS) of both processes sampled every ``--sample-every`` jobs. Growth
   is measured from the sample after ``--warmup`` jobs to the last one, and must stay under 5%.

    python bench/load.py [--requests 500] [--clients 20] [--jobs 1000] [--json FILE]
"""

from __future__ import annotations

import random
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

import requests  # noqa: E402

from services import (ApiService, WorkerService, json_body, options_parser, parsed_options, percentile,  # noqa: E402
                      print_report, rss_bytes, tiny_models, write_config)

GRACE = 5.0  # seconds past the configured wait that still count as an answer in time
MAX_GROWTH = 0.05


@dataclass
class LoadOptions:
    clients: int = 20
    requests: int = 500
    max_queue: int = 8
    wait_timeout: float = 30.0
    jobs: int = 1000
    warmup: int = 100
    sample_every: int = 25
    seed: int = 1


def tiny_job(rng: random.Random, job_id: str) -> dict:
    side = rng.choice((64, 128))
    return {"id": job_id, "prompt": f"load {job_id}", "width": side, "height": side,
            "num_inference_steps": rng.randint(1, 4), "seed": rng.randrange(2**32)}


def burst(url: str, outputs: Path, options: LoadOptions) -> dict:
    """Concurrent clients against the queue limit; the answers, their latencies, and whether every
    accepted job finished."""
    answers: list[dict] = []
    lock = threading.Lock()
    counter = iter(range(options.requests))

    def client(n: int) -> None:
        rng = random.Random(f"{options.seed}-{n}")
        with requests.Session() as session:
            while True:
                with lock:
                    index = next(counter, None)
                if index is None:
                    return
                job = {**tiny_job(rng, f"burst-{index:04d}"), "wait": rng.random() < 0.7}
                started = time.monotonic()
                try:
                    response = session.post(url + "/generate", json=job, timeout=options.wait_timeout + 60)
                    status, headers = response.status_code, response.headers
                    code = (json_body(response).get("error") or {}).get("code")
                except requests.RequestException as exc:
                    status, headers, code = 0, {}, type(exc).__name__
                answer = {"id": job["id"], "wait": job["wait"], "status": status, "code": code,
                          "retry_after": headers.get("Retry-After"), "seconds": time.monotonic() - started}
                with lock:
                    answers.append(answer)
                if status == 503 and _positive_int(answer["retry_after"]):
                    # Back off a little, less than asked: the queue stays under pressure.
                    time.sleep(min(float(answer["retry_after"]), rng.uniform(0.25, 1.0)))

    threads = [threading.Thread(target=client, args=(n,)) for n in range(options.clients)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=options.requests * (options.wait_timeout + 60))
    wall = time.monotonic() - started

    latencies = [a["seconds"] for a in answers]
    allowed = options.wait_timeout + GRACE
    bad = [a for a in answers if a["status"] not in (200, 202, 503)
           or (a["status"] == 503 and not _positive_int(a["retry_after"]))]
    accepted = [a["id"] for a in answers if a["status"] in (200, 202)]
    deadline = time.monotonic() + 120
    unfinished = accepted
    while unfinished and time.monotonic() < deadline:
        unfinished = [i for i in unfinished if not (outputs / f"{i}.json").exists()]
        time.sleep(0.2)
    return {
        "requests": len(answers),
        "seconds": round(wall, 1),
        "answers": dict(sorted(Counter(str(a["status"]) for a in answers).items())),
        "codes_503": dict(Counter(a["code"] for a in answers if a["status"] == 503)),
        "p50_ms": round(1000 * statistics.median(latencies), 1) if latencies else 0.0,
        "p99_ms": round(1000 * percentile(latencies, 99), 1),
        "max_ms": round(1000 * max(latencies, default=0.0), 1),
        "p50_ms_by_status": {str(s): round(1000 * statistics.median([a["seconds"] for a in answers
                                                                     if a["status"] == s]), 1)
                             for s in sorted({a["status"] for a in answers})},
        "wait_timeout_s": options.wait_timeout,
        "over_the_wait": sum(1 for a in answers if a["seconds"] > allowed),
        "unexpected": bad[:20],
        "unexpected_count": len(bad),
        "accepted": len(accepted),
        "accepted_unfinished": unfinished[:20],
    }


def leak(url: str, worker: WorkerService, api: ApiService, options: LoadOptions) -> dict:
    """Jobs in a row through the API, sampling the RSS of the worker and the API."""
    rng = random.Random(options.seed)
    samples: list[tuple[int, int, int]] = []  # (jobs done, worker RSS, API RSS)
    failures: list[str] = []
    started = time.monotonic()
    with requests.Session() as session:
        for n in range(1, options.jobs + 1):
            job = tiny_job(rng, f"row-{n:05d}")
            try:
                response = session.post(url + "/generate", json=job, timeout=options.wait_timeout + 60)
                body = json_body(response)
                if response.status_code != 200:
                    failures.append(f"{job['id']}: {response.status_code} {body}")
                    continue
                image = session.get(url + body["url"], timeout=30)
                state = session.get(f"{url}/jobs/{job['id']}", timeout=30)
                if image.status_code != 200 or state.json().get("status") != "done":
                    failures.append(f"{job['id']}: image {image.status_code}, job {state.text[:100]}")
                if n % 100 == 0:
                    session.get(url + "/jobs?limit=20", timeout=30).raise_for_status()
            except (requests.RequestException, ValueError, KeyError) as exc:
                failures.append(f"{job['id']}: {type(exc).__name__}: {exc}")
            if n % options.sample_every == 0 or n == options.jobs:
                samples.append((n, rss_bytes(worker.pid), rss_bytes(api.pid)))
    wall = time.monotonic() - started

    after = [s for s in samples if s[0] >= options.warmup] or samples[-1:]
    base, last = after[0], after[-1]
    mib = 1024 * 1024

    def figures(column: int) -> dict:
        return {
            "rss_mib_after_warmup": round(base[column] / mib, 1),
            "rss_mib_end": round(last[column] / mib, 1),
            "rss_mib_max": round(max(s[column] for s in after) / mib, 1),
            "growth_percent": round(100.0 * (last[column] - base[column]) / base[column], 2),
        }

    return {
        "jobs": options.jobs,
        "warmup_jobs": base[0],
        "seconds": round(wall, 1),
        "jobs_per_second": round(options.jobs / wall, 1),
        "worker": figures(1),
        "api": figures(2),
        "failures": failures[:20],
        "failure_count": len(failures),
        "samples": samples,
    }


def run_load(options: LoadOptions, work: Path, models: Path | None = None, say=print) -> dict:
    models = tiny_models(models or work / "models")
    config = write_config(work / "service", models, http={
        "max_queue": options.max_queue, "threads": max(32, options.clients + options.max_queue + 4),
        "wait_timeout": options.wait_timeout})
    worker, api = WorkerService(config, work / "logs"), ApiService(config, work / "logs")
    try:
        worker.start()
        api.start()
        if not (worker.wait_ready(180) and api.wait_ready(60)):
            raise RuntimeError("the service did not start:\n" + "\n".join(worker.log_texts()))
        say(f"load: burst of {options.requests} requests from {options.clients} clients")
        burst_figures = burst(api.url, config.parent / "outputs", options)
        say(f"load: {options.jobs} jobs in a row")
        leak_figures = leak(api.url, worker, api, options)
        alive = worker.alive() and api.alive()
    finally:
        worker.stop()
        api.stop()
    logs = worker.log_texts() + api.log_texts()
    report = {"options": asdict(options), "burst": burst_figures, "leak": leak_figures, "processes_alive": alive,
              "tracebacks": sum(log.count("Traceback") for log in logs)}
    report["ok"] = ok(report)
    report["lines"] = summary(report)
    return report


def ok(report: dict) -> bool:
    b, m = report["burst"], report["leak"]
    return (b["unexpected_count"] == 0 and b["over_the_wait"] == 0 and not b["accepted_unfinished"]
            and m["failure_count"] == 0 and report["processes_alive"] and report["tracebacks"] == 0
            and all(m[p]["growth_percent"] < 100 * MAX_GROWTH for p in ("worker", "api")))


def summary(r: dict) -> list[str]:
    b, m = r["burst"], r["leak"]
    mix = ", ".join(f"{status}: {count}" for status, count in b["answers"].items())
    lines = [
        f"burst: {b['requests']} requests from {r['options']['clients']} clients in {b['seconds']}s, "
        f"max_queue {r['options']['max_queue']}; answers {mix}; 503 codes {b['codes_503']}",
        f"burst: latency p50 {b['p50_ms']} ms, p99 {b['p99_ms']} ms, max {b['max_ms']} ms "
        f"(configured wait {b['wait_timeout_s']:g}s; over it: {b['over_the_wait']}); unexpected answers: "
        f"{b['unexpected_count']}; accepted {b['accepted']}, unfinished {len(b['accepted_unfinished'])}",
    ]
    for name in ("worker", "api"):
        f = m[name]
        lines.append(f"memory: {name} RSS {f['rss_mib_after_warmup']} MiB after {m['warmup_jobs']} jobs, "
                     f"{f['rss_mib_end']} MiB after {m['jobs']} (max {f['rss_mib_max']}): "
                     f"growth {f['growth_percent']}%")
    lines.append(f"jobs in a row: {m['jobs']} in {m['seconds']}s ({m['jobs_per_second']}/s), failures "
                 f"{m['failure_count']}; tracebacks {r['tracebacks']}; processes alive: {r['processes_alive']}")
    lines.append(f"load: p50={b['p50_ms']}ms p99={b['p99_ms']}ms worker_growth={m['worker']['growth_percent']}% "
                 f"api_growth={m['api']['growth_percent']}% {'ok' if r['ok'] else 'FAILED'}")
    return lines


def _positive_int(value) -> bool:
    return isinstance(value, str) and value.isdigit() and int(value) >= 1


def main() -> int:
    defaults = LoadOptions()
    args = options_parser(__doc__, defaults).parse_args()
    options = parsed_options(args, defaults)
    with tempfile.TemporaryDirectory(prefix="fluxworker-load-") as tmp:
        report = run_load(options, Path(tmp), args.models)
    print_report(report, args.json)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
