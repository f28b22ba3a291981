"""bench/gpu.py --tiny: every section of the GPU benchmark runs on the CPU with tiny sizes and
writes the JSON and chart a GPU run writes. The figures themselves mean nothing here; the GPU run
(bench/device_run.sh) measures them."""

import json
import os
import subprocess
import sys

from PIL import Image

from conftest import ROOT


def test_the_gpu_benchmark_runs_every_section_on_the_cpu(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "diffusers_baseline.jsonl").write_text(
        '{"step": "built", "gpu": "a card"}\n'
        '{"step": "pipeline fast mode (all on GPU)", "res": 1024, "bs": 1, "median": 0.82, "peak_gib": 33.8}\n'
        '{"step": "pipeline model_cpu_offload", "res": 1024, "bs": 1, "median": 19.8, "peak_gib": 22.9}\n')
    env = {**os.environ, "OUT": str(out), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu.py"), "--tiny"], env=env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((out / "gpu_bench.json").read_text())
    assert report["tiny"] and report["errors"] == {}
    # float8 matrix products need a GPU of compute capability 8.9 or newer: the one section a CPU skips
    assert set(report["skipped"]) == {"fp8_compute"}
    assert report["reference"]["fast_1024"]["median_s"] == 0.82
    rows = {(row["variant"], row["mode"], row["size"]) for row in report["flux"]}
    for mode in ("fast", "balanced"):
        assert ("fp32", mode, 128) in rows and ("fp32", mode, 64) in rows
        assert ("fp8 storage", mode, 128) in rows
    assert ("fp32 compiled", "fast", 128) in rows and ("fp32 compiled", "fast", 64) in rows
    assert ("fp32, 512 text tokens", "fast", 128) in rows
    assert all(row["median_s"] > 0 and row["first_s"] > 0 for row in report["flux"])
    assert report["plan"]["transformer_streamed"] and report["plan"]["encoder_streamed"]
    assert report["streamers"][0]["bytes_copied"] > 0 and report["streamers"][0]["misses"] == 0
    assert set(report["switch"]) == {"fast_to_balanced_move_s", "first_balanced_job_after_s",
                                     "balanced_to_fast_move_s", "first_fast_job_after_s"}
    assert report["compile"]["graphs_compiled_after_warmup"] == 0
    assert report["compile"]["first_fast_192_s"] > 0 and report["compile"]["graphs_compiled_by_192"] >= 0
    assert report["compile"]["graphs_compiled_by_mode_switches"] == 0
    assert set(report["compile"]["warmup_cold_s"]) == {"fast 128x128", "fast 64x64"}
    difference = report["fp8"]["vs_reference_image"]
    assert difference["reference"] == "fast, fp32" and difference["max_abs_diff"] >= 0 and "psnr_db" in difference
    assert report["balanced_vs_fast_image"]["max_abs_diff"] == 0  # streaming the blocks changes no pixel
    assert report["upscale"]["output"] == 4 * report["upscale"]["input"] and report["erase"]["median_s"] > 0
    assert report["attention_forward_ms"]["sdpa"] > 0
    candidates = {"channels_last", "channels_last, cudnn benchmark", "contiguous", "contiguous, cudnn benchmark"}
    assert set(report["vae_decode_ms"]) == candidates | {"size"}
    assert set(report["upscale"]["candidates"]) == set(report["erase"]["candidates"]) == candidates
    chart = Image.open(out / "gpu_bench.png")
    assert chart.format == "PNG" and chart.width == 1100
    assert "fast" in result.stdout and "median s" in result.stdout
