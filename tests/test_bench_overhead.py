"""bench/overhead.py in a short run: every figure the README's table quotes is measured and
written. The figures themselves are not asserted (tests never assert wall-clock times)."""

import json
import math
import os
import subprocess
import sys

import pytest

from conftest import ROOT

KEYS = ("inbox_added_ms_p50", "inbox_added_ms_p99", "http_added_ms_p50", "http_added_ms_p99",
        "facade_added_ms_p50", "facade_added_ms_p99", "engine_busy_fraction", "idle_cpu_percent")


def test_the_overhead_benchmark_writes_every_figure(tmp_path):
    out = tmp_path / "overhead.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "overhead.py"), "--jobs", "5",
                             "--idle-seconds", "1", "--json", str(out)],
                            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    figures = json.loads(out.read_text())
    for key in KEYS:
        assert isinstance(figures[key], (int, float)) and math.isfinite(figures[key]), (key, figures.get(key))
    # The "added" figures are differences of times measured apart, so either sign is possible on a
    # busy machine; only these are bounded.
    assert 0 < figures["engine_busy_fraction"] <= 1
    assert figures["idle_cpu_percent"] >= 0
    # What the facade adds over the inbox: a difference of the quantiles of the same run.
    for quantile in ("p50", "p99"):
        assert figures[f"facade_added_ms_{quantile}"] == pytest.approx(
            figures[f"http_ms_{quantile}"] - figures[f"inbox_ms_{quantile}"])
    assert "inbox" in result.stdout and "http" in result.stdout.lower()
    assert "facade_added_ms_p50" in result.stdout and "difference of quantiles" in result.stdout
