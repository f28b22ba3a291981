"""The reliability suite's one command, in its shorter form: ``bench/reliability.py --quick`` runs
chaos, fuzzing, hostile images, security and disk, load and leaks with real services (worker, API
and mosquitto subprocesses on free 127.0.0.1 ports, the tiny models on the CPU), prints its table
and exits 0 only when every bound is met. The parts also run one by one elsewhere in the suite;
this runs the command itself, as a user would."""

import json
import os
import signal
import subprocess
import sys

import pytest

from conftest import ROOT


@pytest.mark.timeout(1800)  # about 4 minutes on 2 cores; the subprocess has its own bound below
def test_the_quick_reliability_run_meets_every_bound(tmp_path):
    figures = tmp_path / "reliability.json"
    # Its own process group: whatever way this test ends, no service it started outlives it.
    run = subprocess.Popen([sys.executable, "bench/reliability.py", "--quick", "--json", str(figures)],
                           cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           start_new_session=True)
    try:
        output, _ = run.communicate(timeout=1500)
    finally:
        try:
            os.killpg(run.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        run.wait()
    assert run.returncode == 0, output[-5000:]
    assert "reliability: all bounds met" in output
    data = json.loads(figures.read_text())
    chaos = data["chaos"]
    assert data["ok"] is True
    assert chaos["accepted"] > 0 and chaos["completed"] == chaos["accepted"]
    assert (chaos["lost"], chaos["duplicated"]) == (0, 0)
    assert min(chaos["accepted_by_transport"].values()) > 0  # every transport took jobs
    assert data["schemathesis"]["cases"] > 0 and data["schemathesis"]["server_errors"] == 0
    assert data["summary"] and all(row["met"] for row in data["summary"]), data["summary"]
