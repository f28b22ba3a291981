"""Chaos: jobs from the inbox, HTTP and MQTT at once while the worker is SIGKILLed, the API process
restarted and the broker restarted (SIGTERM) and killed (SIGKILL). A shorter run of
``bench/chaos.py``, with the same code and the same verdict."""

import json
import os
import sys
import time
from types import SimpleNamespace

import pytest
from PIL import Image

from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
from chaos import Faults, Options, run_chaos  # noqa: E402
from chaos_check import check  # noqa: E402
from chaos_clients import Ledger, Submission  # noqa: E402


def test_the_verdict_counts_lost_and_duplicated_jobs(tmp_path):
    """The check itself: an accepted job without a record is lost; two "done" log lines, a record
    replaced after it was first seen, or an image written after its record make a duplicate."""
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    ledger = Ledger()
    for job_id in ("fine", "lost", "twice", "rewritten", "late-image"):
        ledger.add(Submission(job_id, "inbox", {"id": job_id, "width": 64, "height": 64})).accepted_at = time.time()
    for job_id in ("fine", "twice", "rewritten", "late-image"):
        Image.new("RGB", (64, 64)).save(outputs / f"{job_id}.png")
        (outputs / f"{job_id}.json").write_text(json.dumps({"id": job_id, "status": "done", "file": f"{job_id}.png"}))
    later = time.time_ns() + 10**9
    os.utime(outputs / "late-image.png", ns=(later, later))
    log = "".join(f"job {job_id} type=generate engine=flux done in 0.1s transport=inbox url=/outputs/{job_id}.png\n"
                  for job_id in ("fine", "twice", "twice", "rewritten", "late-image"))
    chaos = SimpleNamespace(folder=tmp_path, ledger=ledger, options=Options(), faults=Faults(),
                            worker=SimpleNamespace(log_texts=lambda: [log], runs=1),
                            api=SimpleNamespace(log_texts=lambda: []))
    report = check(chaos, [], SimpleNamespace(unknown=[]), SimpleNamespace(rewritten={"rewritten.json"}))
    assert report["lost_ids"] == ["lost"]
    assert report["duplicated_ids"] == ["late-image", "rewritten", "twice"]
    assert report["lines"][-1] == "chaos: accepted=5 completed=4 lost=1 duplicated=3"


@pytest.mark.timeout(600)
def test_no_accepted_job_is_lost_or_run_twice_under_kills_and_restarts(tmp_path, tiny_dir):
    options = Options(duration=60.0, rate=1.0, worker_kills=3, api_restarts=2, broker_restarts=2, broker_kills=1,
                      drain=180.0, seed=int(os.environ.get("FLUXWORKER_CHAOS_SEED", "3")))
    report = run_chaos(options, tmp_path, tiny_dir)
    print("\n".join(report["lines"]))

    assert report["lost"] == 0, report["lost_ids"]
    assert report["duplicated"] == 0, report["duplicated_ids"]
    assert report["completed"] == report["accepted"], (report["failed"], report["broken_images"])
    # The duplicate count reads the worker's "done" lines: they must be there to be counted.
    assert report["completed_and_logged"] >= report["completed"] - report["worker_kills"]
    assert report["worker_kills"] == 3 and report["worker_kills_mid_job"] >= 1
    assert len(report["api_restarts"]) == 2 and report["broker_restarts"] == 2 and report["broker_kills"] == 1
    assert min(report["accepted_by_transport"].values()) >= 10, report["accepted_by_transport"]
    assert report["http_followed_done"] == report["accepted_by_transport"]["http"]
    assert report["http_unknown_after_accept"] == []
    assert report["tracebacks"] == 0 and report["producer_errors"] == []
    assert not any(report["leftover_files"].values()), report["leftover_files"]
