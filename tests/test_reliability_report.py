"""The figures of ``bench/reliability.py``: pytest's JUnit reports and hypothesis's statistics read
into cases, failures and examples, HAR recordings into answers and 5xx, and all of it into the
rows of the printed table (the rows of the README's Reliability table)."""

import json
import sys
from pathlib import Path

from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
from reliability import har_answers, hypothesis_counts, junit_cases, rows, run_pytest, table  # noqa: E402


def write_junit(path: Path, modules: dict[str, tuple[int, int, int]]) -> Path:
    """A JUnit report as pytest writes it: per module, (passed, failed, skipped) test cases."""
    cases = []
    for module, (passed, failed, skipped) in modules.items():
        for n in range(passed):
            cases.append(f'<testcase classname="tests.{module}" name="test_passes_{n}" time="0.1" />')
        for n in range(failed):
            cases.append(f'<testcase classname="tests.{module}" name="test_fails_{n}" time="0.1">'
                         f'<failure message="assert 1 == 2">assert 1 == 2</failure></testcase>')
        for n in range(skipped):
            cases.append(f'<testcase classname="tests.{module}" name="test_skipped_{n}" time="0.0">'
                         f'<skipped type="pytest.skip" message="needs root">needs root</skipped></testcase>')
    path.write_text('<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest">'
                    + "".join(cases) + "</testsuite></testsuites>")
    return path


def write_har(path: Path, statuses: list[int]) -> Path:
    entries = [{"request": {"method": "GET", "url": f"http://127.0.0.1:1/health?n={n}"},
                "response": {"status": status, "content": {"mimeType": "application/json"}}}
               for n, status in enumerate(statuses)]
    path.write_text(json.dumps({"log": {"version": "1.2", "entries": entries}}))
    return path


def part(tmp_path: Path, name: str, modules: dict[str, tuple[int, int, int]], examples: int = 0,
         failing: int = 0) -> dict:
    """One pytest part of the results, as ``run_pytest`` gives it, from a JUnit file."""
    files = junit_cases(write_junit(tmp_path / f"{name}.xml", modules))
    return {"files": files, "hypothesis_examples": examples, "hypothesis_failing": failing,
            "exit_status": 1 if any(counts["failed"] for counts in files.values()) else 0, "output_tail": ""}


def results(tmp_path: Path, security_failed: int = 0, statuses: tuple[int, ...] = (200, 400, 404)) -> dict:
    """A full run's results with the figures of the README's Reliability table."""
    tmp_path.mkdir(exist_ok=True)
    answers = har_answers(write_har(tmp_path / "schemathesis.har.json", list(statuses)))
    return {
        "chaos": {"accepted": 745, "accepted_by_transport": {"inbox": 257, "http": 229, "mqtt": 259},
                  "completed": 745, "lost": 0, "duplicated": 0, "worker_kills": 8, "worker_kills_mid_job": 6,
                  "api_restarts": ["SIGKILL", "SIGTERM", "SIGKILL", "SIGTERM"], "broker_restarts": 3,
                  "broker_kills": 2, "mqtt_at_risk": 1, "mqtt_at_risk_completed": 1},
        "fuzz": part(tmp_path, "fuzz", {"test_fuzz": (8, 0, 0), "test_fuzz_mqtt": (3, 0, 0)}, examples=700),
        "schemathesis": {"cases": 24213, **answers, "failed_operations": [], "exit_status": 0, "server_alive": True,
                         "tracebacks": 0},
        "images": part(tmp_path, "images", {"test_images": (28, 0, 0)}),
        "security_disk": part(tmp_path, "security_disk",
                              {"test_security": (4 - security_failed, security_failed, 0), "test_disk": (4, 0, 1)}),
        "load": {"ok": True,
                 "burst": {"requests": 500, "answers": {"200": 196, "202": 79, "503": 225},
                           "codes_503": {"queue_full": 225}, "unexpected_count": 0, "p50_ms": 7.5, "p99_ms": 370.0,
                           "max_ms": 390.0, "wait_timeout_s": 30.0, "over_the_wait": 0},
                 "leak": {"jobs": 1000, "warmup_jobs": 100,
                          "worker": {"rss_mib_after_warmup": 806.2, "rss_mib_end": 807.0, "growth_percent": 0.1},
                          "api": {"rss_mib_after_warmup": 49.1, "rss_mib_end": 49.1, "growth_percent": 0.11}}},
    }


def row(lines: list[tuple[str, str, str, bool]], figure: str) -> tuple[str, str, bool]:
    found = [(value, bound, met) for name, value, bound, met in lines if name == figure]
    assert len(found) == 1, [name for name, *_ in lines]
    return found[0]


def test_a_junit_report_gives_cases_failures_and_skips_per_test_file(tmp_path):
    report = write_junit(tmp_path / "junit.xml", {"test_security": (3, 1, 0), "test_disk": (2, 0, 2)})
    assert junit_cases(report) == {
        "test_security": {"cases": 4, "failed": ["test_fails_0"], "skipped": 0},
        "test_disk": {"cases": 2, "failed": [], "skipped": 2},
    }


def test_an_error_in_a_fixture_counts_as_a_failed_case(tmp_path):
    report = tmp_path / "junit.xml"
    report.write_text('<testsuites><testsuite><testcase classname="tests.test_disk" name="test_full">'
                      '<error message="fixture failed">OSError</error></testcase></testsuite></testsuites>')
    assert junit_cases(report) == {"test_disk": {"cases": 1, "failed": ["test_full"], "skipped": 0}}


def test_hypothesis_statistics_give_examples_tried_and_failing():
    output = (
        "tests/test_fuzz.py::test_the_parser_accepts_or_rejects_cleanly_any_json:\n\n"
        "  - during generate phase (2.00 seconds):\n"
        "    - 400 passing, 0 failing, and 63 invalid test cases\n\n"
        "tests/test_fuzz_mqtt.py::test_every_refused_message_gets_an_error_with_code_message_and_field:\n\n"
        "  - during explicit phase (0.10 seconds):\n"
        "    - 7 passing examples, 1 failing examples\n"
        "  - during generate phase (0.35 seconds):\n"
        "    - 80 passing, 2 failing, and 10 invalid test cases\n"
    )
    assert hypothesis_counts(output) == (490, 3)
    assert hypothesis_counts("3 passed in 0.5s") == (0, 0)


def test_run_pytest_counts_a_real_failure_and_hypothesis_examples(tmp_path):
    tests = tmp_path / "test_canned.py"
    tests.write_text(
        "from hypothesis import given, settings, strategies as st\n\n"
        "def test_passes():\n    assert True\n\n"
        "def test_fails():\n    assert 1 == 2\n\n"
        "@settings(max_examples=20, derandomize=True, database=None)\n"
        "@given(st.integers())\n"
        "def test_integers(n):\n    assert isinstance(n, int)\n")
    result = run_pytest([str(tests)], tmp_path)
    assert result["files"] == {"test_canned": {"cases": 3, "failed": ["test_fails"], "skipped": 0}}
    assert result["hypothesis_examples"] == 20 and result["hypothesis_failing"] == 0
    assert result["exit_status"] == 1 and "assert 1 == 2" in result["output_tail"]


def test_a_har_recording_gives_answers_by_status_and_counts_each_5xx(tmp_path):
    har = write_har(tmp_path / "run.har.json", [200, 200, 404, 500, 400])
    assert har_answers(har) == {"requests": 5, "answers": {"200": 2, "400": 1, "404": 1, "500": 1},
                                "server_errors": 1}
    assert har_answers(write_har(tmp_path / "two.har.json", [503, 502, 200]))["server_errors"] == 2
    assert har_answers(tmp_path / "missing.har.json") == {"requests": 0, "answers": {}, "server_errors": 0}


def test_rows_print_the_chaos_accepted_jobs_per_transport_and_those_at_risk(tmp_path):
    lines = rows(results(tmp_path))
    assert row(lines, "chaos: jobs accepted (inbox / HTTP / MQTT)") == ("745 (257 / 229 / 259)", "", True)
    assert row(lines, "chaos: MQTT jobs at risk from a broker SIGKILL") == ("1 (1 ran)", "", True)
    assert row(lines, "chaos: faults")[0] == ("worker SIGKILL x8 (6 with a job in hand), API restarts x4, "
                                              "broker SIGTERM x3, broker SIGKILL x2")


def test_a_failed_security_test_shows_in_its_row_and_fails_the_run(tmp_path):
    passing = rows(results(tmp_path / "passing"))
    assert row(passing, "security and disk: cases / failed") == ("8 / 0 (1 skipped)", "0 failed", True)
    assert all(met for *_, met in passing)

    failing = rows(results(tmp_path / "failing", security_failed=1))
    assert row(failing, "security and disk: cases / failed") == ("8 / 1 (1 skipped)", "0 failed", False)
    printed = table(failing).splitlines()
    assert next(line for line in printed if line.startswith("security and disk")).endswith("NO")
    assert sum(line.endswith("  NO") for line in printed) == 1


def test_a_500_recorded_by_schemathesis_fails_the_5xx_row(tmp_path):
    lines = rows(results(tmp_path, statuses=(200, 500, 404)))
    assert row(lines, "fuzzing: 5xx answers") == ("1", "0", False)
    assert row(lines, "fuzzing: schemathesis cases") == ("24,213", "", True)


def test_rows_print_load_and_memory_as_the_readme_states_them(tmp_path):
    lines = rows(results(tmp_path))
    assert row(lines, "load: answers to 500 requests") == (
        "200: 196, 202: 79, 503: 225 (all queue_full with Retry-After)", "200, 202 or 503", True)
    assert row(lines, "load: latency p50 / p99 / max") == ("7.5 ms / 370 ms / 390 ms", "under 35 s", True)
    assert row(lines, "memory over 1,000 jobs: worker") == (
        "806.2 MiB after 100 jobs, 807.0 MiB after 1,000: +0.10%", "< 5%", True)


def readme_table() -> list[tuple[str, str, str]]:
    """The rows of the README's table of measured reliability figures."""
    text = (ROOT / "README.md").read_text()
    start = text.index("Measured with `python bench/reliability.py`")
    lines = text[start:].split("\n\n", 2)[1].splitlines()  # the paragraph after the heading line
    cells = [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in lines if line.startswith("|")]
    return [tuple(c) for c in cells[2:]]


def test_every_row_of_the_readme_reliability_table_is_a_printed_row(tmp_path):
    printed = {(figure, bound) for figure, _, bound, _ in rows(results(tmp_path))}
    readme = readme_table()
    assert len(readme) >= 10
    for figure, _, bound in readme:
        assert (figure, bound) in printed, figure
