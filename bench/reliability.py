#!/usr/bin/env python3
"""The reliability suite in one command: chaos, fuzzing, hostile images, security and disk, load and leaks.

1. Chaos (``bench/chaos.py``): jobs from the inbox, HTTP and MQTT while the worker, the API and
   the broker are killed and restarted; accepted, completed, lost and duplicated jobs.
2. Fuzzing: the hypothesis tests of ``tests/test_fuzz.py`` (random JSON, deep nesting, huge
   numbers, odd unicode and random bytes into the job parser, and as files into a worker's inbox)
   and ``tests/test_fuzz_mqtt.py`` (the same kinds of payloads on the MQTT jobs topic of a running
   worker), with hypothesis's own count of examples; then schemathesis from ``/openapi.json``
   against every endpoint of a running service, every request recorded and every 5xx counted.
3. Hostile images (``tests/test_images.py``): bombs, truncated and corrupt files, odd modes and
   formats; cases tried and cases that crashed.
4. Security and disk (``tests/test_security.py``, ``tests/test_disk.py``): the API key, ids and
   paths, request limits; outputs full or read-only, the inbox in polling mode; cases and failures.
5. Load and leaks (``bench/load.py``): answers and latency of 20 clients against the queue limit,
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
from load import GRACE, LoadOptions, run_load  # noqa: E402
from services import ROOT, ApiService, child_env, tiny_models, write_config  # noqa: E402

# hypothesis --hypothesis-show-statistics: "400 passing, 0 failing, and 49 invalid test cases"
EXAMPLES = re.compile(r"(\d+) passing(?: examples?)?, (\d+) failing")
# Every schemathesis answer: no 5xx, a body that matches its documented schema, the documented content type.
SCHEMATHESIS_CHECKS = "not_a_server_error,response_schema_conformance,content_type_conformance"


def junit_cases(report: Path) -> dict[str, dict]:
    """Per test file (module name), the cases run, the names of those that failed or erred, and
    the cases skipped (not counted as run)."""
    cases: dict[str, dict] = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        counts = cases.setdefault(case.get("classname", "?").rsplit(".", 1)[-1],
                                  {"cases": 0, "failed": [], "skipped": 0})
        if case.find("skipped") is not None:
            counts["skipped"] += 1
            continue
        counts["cases"] += 1
        if case.find("failure") is not None or case.find("error") is not None:
            counts["failed"].append(case.get("name"))
    return cases


def hypothesis_counts(output: str) -> tuple[int, int]:
    """(examples tried, examples failing) from pytest's output with ``--hypothesis-show-statistics``."""
    examples = [(int(p), int(f)) for p, f in EXAMPLES.findall(output)]
    return sum(p + f for p, f in examples), sum(f for _, f in examples)


def run_pytest(files: list[str], work: Path, select: str | None = None) -> dict:
    """Run test files; per file, the cases run and the cases that failed, plus hypothesis's counts."""
    report = work / f"junit-{time.monotonic_ns()}.xml"
    command = [sys.executable, "-m", "pytest", *files, "-q", "-p", "no:cacheprovider", "--hypothesis-show-statistics",
               f"--junitxml={report}"]
    if select:
        command += ["-k", select]
    done = subprocess.run(command, cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=1800)
    # No report at all (pytest could not start): nothing ran, and the exit status says why.
    cases = junit_cases(report) if report.exists() else {}
    examples, failing = hypothesis_counts(done.stdout)
    return {"files": cases, "hypothesis_examples": examples, "hypothesis_failing": failing,
            "exit_status": done.returncode, "output_tail": done.stdout[-3000:] if done.returncode else ""}


def har_answers(har: Path) -> dict:
    """The requests a HAR file recorded, its answers by status, and how many were 5xx."""
    entries = json.loads(har.read_text())["log"]["entries"] if har.exists() else []
    statuses = Counter(entry["response"]["status"] for entry in entries)
    return {"requests": len(entries),
            "answers": {str(status): count for status, count in sorted(statuses.items())},
            "server_errors": sum(count for status, count in statuses.items() if status >= 500)}


def run_schemathesis(work: Path, models: Path, seconds: int) -> dict:
    """schemathesis against a running ``fluxworker serve`` with every engine, configured as the
    fuzz tests configure theirs; every request is recorded (HAR) and every 5xx counted, and every
    operation with an answer that failed a check (JUnit) is named."""
    from fluxworker.tiny import write_random_lama

    lama = write_random_lama(work / "lama.pth")
    config = write_config(
        work / "fuzz", models, limits={"max_width": 128, "max_height": 128, "max_upscale_pixels": 64 * 64},
        http={"max_queue": 200, "threads": 220, "max_body_bytes": 200_000}, models={"lama": str(lama)})
    server = ApiService(config, work / "logs", command="serve").start()
    har, junit = work / "schemathesis.har.json", work / "schemathesis.junit.xml"
    try:
        if not server.wait_ready(180):
            raise RuntimeError("the fuzzing server did not start:\n" + "\n".join(server.log_texts()))
        done = subprocess.run(
            [sys.executable, "-m", "schemathesis.cli", "run", f"{server.url}/openapi.json",
             "--checks", SCHEMATHESIS_CHECKS, "--phases", "examples,coverage,fuzzing", "--workers", "2",
             "--request-timeout", "120", "--generation-deterministic", "--suppress-health-check", "all",
             "--max-time", str(seconds), "--report", "har,junit", "--report-har-path", str(har),
             "--report-junit-path", str(junit)],
            cwd=work, env=child_env(), capture_output=True, text=True, timeout=seconds + 600)
        alive = server.alive()
    finally:
        server.stop()
    answers = har_answers(har)
    generated = re.search(r"(\d+) generated", done.stdout)
    return {
        "cases": int(generated.group(1)) if generated else answers["requests"],
        **answers,
        "failed_operations": sorted(name for counts in (junit_cases(junit) if junit.exists() else {}).values()
                                    for name in counts["failed"]),
        "exit_status": done.returncode,
        "server_alive": alive,
        "tracebacks": sum(log.count("Traceback") for log in server.log_texts()),
        "output_tail": done.stdout[-3000:] if done.returncode else "",
    }


def _ms(value: float) -> str:
    return f"{value:.1f} ms" if value < 100 else f"{value:.0f} ms"


def _memory(m: dict, process: str) -> str:
    f = m[process]
    return (f"{f['rss_mib_after_warmup']} MiB after {m['warmup_jobs']:,} jobs, {f['rss_mib_end']} MiB after "
            f"{m['jobs']:,}: {f['growth_percent']:+.2f}%")


def _failed(part: dict) -> list[str]:
    return [name for counts in part["files"].values() for name in counts["failed"]]


def _cases(part: dict) -> int:
    return sum(counts["cases"] for counts in part["files"].values())


def rows(r: dict) -> list[tuple[str, str, str, bool]]:
    """(figure, value, bound, met) for the table; the README's Reliability table shows these rows."""
    c, f, s, i, g, load = r["chaos"], r["fuzz"], r["schemathesis"], r["images"], r["security_disk"], r["load"]
    b, m = load["burst"], load["leak"]
    t = c["accepted_by_transport"]
    images = i["files"].get("test_images", {"cases": 0, "failed": []})
    fuzz_failed, guard_failed = _failed(f), _failed(g)
    skipped = sum(counts.get("skipped", 0) for counts in g["files"].values())
    codes = b.get("codes_503", {})
    if not codes:
        mix_note = ""
    elif list(codes) == ["queue_full"] and b["unexpected_count"] == 0:
        mix_note = " (all queue_full with Retry-After)"
    else:
        mix_note = " (503 codes: " + ", ".join(f"{code}: {n}" for code, n in codes.items()) + ")"
    return [
        ("chaos: jobs accepted (inbox / HTTP / MQTT)", f"{c['accepted']} ({t['inbox']} / {t['http']} / {t['mqtt']})",
         "", True),
        ("chaos: completed", str(c["completed"]), "= accepted", c["completed"] == c["accepted"]),
        ("chaos: lost", str(c["lost"]), "0", c["lost"] == 0),
        ("chaos: duplicated", str(c["duplicated"]), "0", c["duplicated"] == 0),
        ("chaos: faults", (f"worker SIGKILL x{c['worker_kills']} ({c['worker_kills_mid_job']} with a job in hand), "
                           f"API restarts x{len(c['api_restarts'])}, broker SIGTERM x{c['broker_restarts']}, "
                           f"broker SIGKILL x{c['broker_kills']}"), "", True),
        # Acknowledged by the broker after its last save before a SIGKILL: not counted as accepted.
        ("chaos: MQTT jobs at risk from a broker SIGKILL", f"{c['mqtt_at_risk']} ({c['mqtt_at_risk_completed']} ran)",
         "", True),
        ("fuzzing: hypothesis examples", f"{f['hypothesis_examples']:,} ({_cases(f)} tests)", "", True),
        ("fuzzing: failing examples and tests", str(f["hypothesis_failing"] + len(fuzz_failed)), "0",
         f["hypothesis_failing"] == 0 and not fuzz_failed and f["exit_status"] == 0),
        ("fuzzing: schemathesis cases", f"{s['cases']:,}", "", True),
        ("fuzzing: 5xx answers", str(s["server_errors"]), "0",
         s["server_errors"] == 0 and s["server_alive"] and s["tracebacks"] == 0),
        ("fuzzing: API operations failing a check (5xx, schema, content type)", str(len(s["failed_operations"])),
         "0", not s["failed_operations"] and s["exit_status"] == 0),
        ("hostile images: cases tried", str(images["cases"]), "", True),
        ("hostile images: crashes", str(len(images["failed"])), "0", not images["failed"] and i["exit_status"] == 0),
        ("security and disk: cases / failed",
         f"{_cases(g)} / {len(guard_failed)}" + (f" ({skipped} skipped)" if skipped else ""), "0 failed",
         not guard_failed and g["exit_status"] == 0),
        (f"load: answers to {b['requests']:,} requests",
         ", ".join(f"{k}: {v}" for k, v in b["answers"].items()) + mix_note, "200, 202 or 503",
         b["unexpected_count"] == 0),
        ("load: latency p50 / p99 / max", f"{_ms(b['p50_ms'])} / {_ms(b['p99_ms'])} / {_ms(b['max_ms'])}",
         f"under {b['wait_timeout_s'] + GRACE:g} s", b["over_the_wait"] == 0),
        (f"memory over {m['jobs']:,} jobs: worker", _memory(m, "worker"), "< 5%", m["worker"]["growth_percent"] < 5),
        (f"memory over {m['jobs']:,} jobs: API", _memory(m, "api"), "< 5%",
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
        print("reliability: fuzzing the job parser, the inbox and MQTT (hypothesis)", flush=True)
        results["fuzz"] = run_pytest(["tests/test_fuzz.py", "tests/test_fuzz_mqtt.py"], work,
                                     select="not schemathesis")
        print(f"reliability: fuzzing the API (schemathesis, {fuzz_seconds}s)", flush=True)
        results["schemathesis"] = run_schemathesis(work, models, fuzz_seconds)
        print("reliability: hostile images", flush=True)
        results["images"] = run_pytest(["tests/test_images.py"], work)
        print("reliability: security and disk", flush=True)
        results["security_disk"] = run_pytest(["tests/test_security.py", "tests/test_disk.py"], work)
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
    for part in ("fuzz", "schemathesis", "images", "security_disk"):
        if results[part]["output_tail"]:
            print(f"{part}:\n{results[part]['output_tail']}")
    print()
    print(table(summary))
    print(f"reliability: {'all bounds met' if results['ok'] else 'SOME BOUNDS NOT MET'} "
          f"in {results['seconds']}s (CPU, {len(os.sched_getaffinity(0))} cores)")
    return 0 if results["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
