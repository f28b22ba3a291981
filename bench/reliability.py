#!/usr/bin/env python3
"""The reliability suite in one command: chaos, fuzzing, hostile images, load and leaks.

1. Chaos (``bench/chaos.py``): jobs from the inbox, HTTP and MQTT while the worker, the API and
   the broker are killed and restarted; accepted, completed, lost and duplicated jobs.
2. Fuzzing: the hypothesis tests of ``tests/test_fuzz.py`` (random JSON, deep nesting, huge
   numbers, odd unicode and random bytes into the job parser, and random files into a worker's
   inbox), with hypothesis's own count of examples; then schemathesis from ``/openapi.json``
   against every endpoint of a running service, every request recorded and every 5xx counted.
3. Hostile images (``tests/test_images.py``): bombs, truncated and corrupt files, odd modes and
   formats; cases tried and cases that crashed.
4. Load and leaks (``bench/load.py``): answers and latency of 20 clients against the queue limit,
   and the resident memory of the worker and the API over a long row of jobs.

    python bench/reliability.py [--quick] [--json FILE]

Prints one table of figures with the bound each must meet; exits 0 only when all are met.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

from chaos import Options, run_chaos  # noqa: E402
from load import LoadOptions, run_load  # noqa: E402
from services import ROOT, ApiService, child_env, tiny_models, write_config  # noqa: E402

# hypothesis --hypothesis-show-statistics: "400 passing, 0 failing, and 49 invalid test cases"
EXAMPLES = re.compile(r"(\d+) passing(?: examples?)?, (\d+) failing")


def run_pytest(files: list[str], work: Path, select: str | None = None) -> dict:
    """Run test files; per file, the cases run and the cases that failed, plus hypothesis's counts."""
    report = work / f"junit-{time.monotonic_ns()}.xml"
    command = [sys.executable, "-m", "pytest", *files, "-q", "-p", "no:cacheprovider", "--hypothesis-show-statistics",
               f"--junitxml={report}"]
    if select:
        command += ["-k", select]
    done = subprocess.run(command, cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=1800)
    cases: dict[str, dict] = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        counts = cases.setdefault(case.get("classname", "?").rsplit(".", 1)[-1], {"cases": 0, "failed": []})
        if case.find("skipped") is not None:
            continue
        counts["cases"] += 1
        if case.find("failure") is not None or case.find("error") is not None:
            counts["failed"].append(case.get("name"))
    examples = [(int(p), int(f)) for p, f in EXAMPLES.findall(done.stdout)]
    return {"files": cases, "hypothesis_examples": sum(p + f for p, f in examples),
            "hypothesis_failing": sum(f for _, f in examples), "exit_status": done.returncode,
            "output_tail": done.stdout[-3000:] if done.returncode else ""}


def run_schemathesis(work: Path, models: Path, seconds: int) -> dict:
    """schemathesis against a running ``fluxworker serve`` with every engine, configured as the
    fuzz tests configure theirs; every request is recorded (HAR) and every 5xx counted."""
    from fluxworker.tiny import write_random_lama

    lama = write_random_lama(work / "lama.pth")
    config = write_config(
        work / "fuzz", models, limits={"max_width": 128, "max_height": 128, "max_upscale_pixels": 64 * 64},
        http={"max_queue": 200, "threads": 220, "max_body_bytes": 200_000}, models={"lama": str(lama)})
    server = ApiService(config, work / "logs", command="serve").start()
    har = work / "schemathesis.har.json"
    try:
        if not server.wait_ready(180):
            raise RuntimeError("the fuzzing server did not start:\n" + "\n".join(server.log_texts()))
        done = subprocess.run(
            [sys.executable, "-m", "schemathesis.cli", "run", f"{server.url}/openapi.json",
             "--checks", "not_a_server_error", "--phases", "examples,coverage,fuzzing", "--workers", "2",
             "--request-timeout", "120", "--generation-deterministic", "--suppress-health-check", "all",
             "--max-time", str(seconds), "--report", "har", "--report-har-path", str(har)],
            cwd=work, env=child_env(), capture_output=True, text=True, timeout=seconds + 600)
        alive = server.alive()
    finally:
        server.stop()
    entries = json.loads(har.read_text())["log"]["entries"] if har.exists() else []
    statuses = Counter(entry["response"]["status"] for entry in entries)
    generated = re.search(r"(\d+) generated", done.stdout)
    return {
        "cases": int(generated.group(1)) if generated else len(entries),
        "requests": len(entries),
        "answers": {str(status): count for status, count in sorted(statuses.items())},
        "server_errors": sum(count for status, count in statuses.items() if status >= 500),
        "exit_status": done.returncode,
        "server_alive": alive,
        "tracebacks": sum(log.count("Traceback") for log in server.log_texts()),
        "output_tail": done.stdout[-3000:] if done.returncode else "",
    }


def rows(r: dict) -> list[tuple[str, str, str, bool]]:
    """(figure, value, bound, met) for the table."""
    c, f, s, i, load = r["chaos"], r["fuzz"], r["schemathesis"], r["images"], r["load"]
    b, m = load["burst"], load["leak"]
    images = i["files"].get("test_images", {"cases": 0, "failed": []})
    fuzz_failed = [name for counts in f["files"].values() for name in counts["failed"]]
    return [
        ("chaos: jobs accepted", str(c["accepted"]), "", True),
        ("chaos: completed", str(c["completed"]), "= accepted", c["completed"] == c["accepted"]),
        ("chaos: lost", str(c["lost"]), "0", c["lost"] == 0),
        ("chaos: duplicated", str(c["duplicated"]), "0", c["duplicated"] == 0),
        ("chaos: faults (worker kills / API / broker TERM / broker KILL)",
         f"{c['worker_kills']} / {len(c['api_restarts'])} / {c['broker_restarts']} / {c['broker_kills']}", "", True),
        ("fuzz: hypothesis examples (tests)",
         f"{f['hypothesis_examples']} ({sum(c['cases'] for c in f['files'].values())})", "", True),
        ("fuzz: failing examples and tests", str(f["hypothesis_failing"] + len(fuzz_failed)), "0",
         f["hypothesis_failing"] == 0 and not fuzz_failed and f["exit_status"] == 0),
        ("fuzz: schemathesis cases (requests)", f"{s['cases']} ({s['requests']})", "", True),
        ("fuzz: 5xx answers", str(s["server_errors"]), "0",
         s["server_errors"] == 0 and s["exit_status"] == 0 and s["server_alive"] and s["tracebacks"] == 0),
        ("hostile images: cases tried", str(images["cases"]), "", True),
        ("hostile images: crashes", str(len(images["failed"])), "0", not images["failed"] and i["exit_status"] == 0),
        ("load: answers (status: count)", ", ".join(f"{k}: {v}" for k, v in b["answers"].items()), "200/202/503",
         b["unexpected_count"] == 0),
        ("load: p50 / p99 latency", f"{b['p50_ms']:.0f} ms / {b['p99_ms']:.0f} ms", "", True),
        ("load: answers past the wait", str(b["over_the_wait"]), "0", b["over_the_wait"] == 0),
        (f"memory growth over {m['jobs']} jobs: worker", f"{m['worker']['growth_percent']:.2f}%", "< 5%",
         m["worker"]["growth_percent"] < 5),
        (f"memory growth over {m['jobs']} jobs: API", f"{m['api']['growth_percent']:.2f}%", "< 5%",
         m["api"]["growth_percent"] < 5 and load["ok"]),
    ]


def table(lines: list[tuple[str, str, str, bool]]) -> str:
    width = [max(len(row[k]) for row in lines + [("figure", "value", "bound", True)]) for k in range(3)]
    out = [f"{'figure':<{width[0]}}  {'value':<{width[1]}}  {'bound':<{width[2]}}  met"]
    for figure, value, bound, met in lines:
        out.append(f"{figure:<{width[0]}}  {value:<{width[1]}}  {bound:<{width[2]}}  {'yes' if met else 'NO'}")
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="shorter runs: a few minutes in all")
    parser.add_argument("--chaos-seconds", type=float, help="jobs and faults this long (240; quick: 60)")
    parser.add_argument("--fuzz-seconds", type=int, help="schemathesis's time budget (120; quick: 30)")
    parser.add_argument("--jobs", type=int, help="jobs in a row for the memory figures (1000; quick: 250)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", type=Path, help="also write every figure to this file")
    args = parser.parse_args()
    quick = args.quick
    chaos = Options(duration=args.chaos_seconds or (60.0 if quick else 240.0), seed=args.seed,
                    worker_kills=3 if quick else 8, api_restarts=2 if quick else 4,
                    broker_restarts=2 if quick else 3, broker_kills=1 if quick else 2)
    jobs = args.jobs or (250 if quick else 1000)
    load = LoadOptions(requests=200 if quick else 500, jobs=jobs, warmup=max(10, jobs // 10), seed=args.seed)
    fuzz_seconds = args.fuzz_seconds or (30 if quick else 120)

    results: dict = {}
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="fluxworker-reliability-") as tmp:
        work = Path(tmp)
        models = tiny_models(work / "models")
        print(f"reliability: chaos for {chaos.duration:g}s", flush=True)
        results["chaos"] = run_chaos(chaos, work / "chaos", models, say=lambda line: print(line, flush=True))
        print("reliability: fuzzing the job parser and the inbox (hypothesis)", flush=True)
        results["fuzz"] = run_pytest(["tests/test_fuzz.py"], work, select="not schemathesis")
        print(f"reliability: fuzzing the API (schemathesis, {fuzz_seconds}s)", flush=True)
        results["schemathesis"] = run_schemathesis(work, models, fuzz_seconds)
        print("reliability: hostile images", flush=True)
        results["images"] = run_pytest(["tests/test_images.py"], work)
        print(f"reliability: load ({load.requests} requests) and memory ({load.jobs} jobs)", flush=True)
        results["load"] = run_load(load, work / "load", models, say=lambda line: print(line, flush=True))

    summary = rows(results)
    results["summary"] = [{"figure": f, "value": v, "bound": b, "met": ok} for f, v, b, ok in summary]
    results["ok"] = all(ok for *_, ok in summary)
    results["seconds"] = round(time.monotonic() - started)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    print()
    for line in results["chaos"]["lines"] + results["load"]["lines"]:
        print(line)
    for part in ("fuzz", "schemathesis", "images"):
        if results[part]["output_tail"]:
            print(f"{part}:\n{results[part]['output_tail']}")
    print()
    print(table(summary))
    print(f"reliability: {'all bounds met' if results['ok'] else 'SOME BOUNDS NOT MET'} "
          f"in {results['seconds']}s (CPU, {len(os.sched_getaffinity(0))} cores)")
    return 0 if results["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
