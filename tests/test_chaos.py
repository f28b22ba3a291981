"""Chaos: jobs from the inbox, HTTP and MQTT at once while the worker is SIGKILLed, the API process
restarted and the broker restarted (SIGTERM) and killed (SIGKILL). A shorter run of
``bench/chaos.py``, with the same code and the same verdict."""

import os
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
from chaos import Options, run_chaos  # noqa: E402


@pytest.mark.timeout(600)
def test_no_accepted_job_is_lost_or_run_twice_under_kills_and_restarts(tmp_path, tiny_dir):
    options = Options(duration=60.0, rate=1.0, worker_kills=3, api_restarts=2, broker_restarts=2, broker_kills=1,
                      drain=180.0, seed=int(os.environ.get("FLUXWORKER_CHAOS_SEED", "3")))
    report = run_chaos(options, tmp_path, tiny_dir)
    print("\n".join(report["lines"]))

    assert report["lost"] == 0, report["lost_ids"]
    assert report["duplicated"] == 0, report["duplicated_ids"]
    assert report["completed"] == report["accepted"], (report["failed"], report["broken_images"])
    assert report["worker_kills"] == 3 and report["worker_kills_mid_job"] >= 1
    assert len(report["api_restarts"]) == 2 and report["broker_restarts"] == 2 and report["broker_kills"] == 1
    assert min(report["accepted_by_transport"].values()) >= 10, report["accepted_by_transport"]
    assert report["http_followed_done"] == report["accepted_by_transport"]["http"]
    assert report["http_unknown_after_accept"] == []
    assert report["tracebacks"] == 0 and report["producer_errors"] == []
    assert not any(report["leftover_files"].values()), report["leftover_files"]
