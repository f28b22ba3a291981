"""Load and leaks: concurrent clients against the queue limit, then jobs in a row while the
resident memory of the worker and the API is sampled. A shorter run of ``bench/load.py``."""

import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
from load import LoadOptions, run_load  # noqa: E402


@pytest.mark.timeout(600)
def test_every_answer_is_in_bounds_under_load_and_memory_stays_flat(tmp_path, tiny_dir):
    options = LoadOptions(requests=200, jobs=250, warmup=50, sample_every=25)
    report = run_load(options, tmp_path, tiny_dir)
    print("\n".join(report["lines"]))
    burst, leak = report["burst"], report["leak"]

    assert burst["requests"] == 200
    assert burst["unexpected_count"] == 0, burst["unexpected"]  # only 200, 202, or 503 with Retry-After
    assert {"200", "503"} <= set(burst["answers"]) <= {"200", "202", "503"}, burst["answers"]
    assert burst["over_the_wait"] == 0, burst["max_ms"]
    assert burst["accepted_unfinished"] == []
    assert leak["failure_count"] == 0, leak["failures"]
    assert leak["worker"]["growth_percent"] < 5, leak["worker"]
    assert leak["api"]["growth_percent"] < 5, leak["api"]
    assert report["processes_alive"] and report["tracebacks"] == 0
