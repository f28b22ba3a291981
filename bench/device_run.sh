#!/usr/bin/env bash
# The GPU benchmark in one call on the device machine: the plain-diffusers reference, then the
# project's benchmark, one after the other on the same card. Everything lands in $OUT:
# diffusers_baseline.jsonl, gpu_bench.json, gpu_bench.png, both logs and the card's nvidia-smi line.
# Needs .gpu-bench/ from bench/device_prep.sh (run that first, on a machine with PyPI access).
#
#   OUT=/tmp/out bash bench/device_run.sh       (in a copy of the repository with .gpu-bench/)
#
# Measured on an H100: a few seconds installing wheels, 2.6 min reference (1.8 of it the
# model-offload run), about 3 min benchmark: about 6 min in all; the candidate sections added since
# (layouts, fp8_compute) bring it to about 8, under the 10-minute limit of one command.
# SKIP_BASELINE=1 runs only the benchmark (compare it only with a reference from the same card);
# BENCH_ARGS passes options to bench/gpu.py (e.g. "--skip fp8").
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-$PWD/gpu-bench-out}
mkdir -p "$out"
export OUT="$out"  # the reference and bench/gpu.py write their files where $OUT says
[ -f .gpu-bench/diffusers_baseline.py ] || { echo "device_run.sh: .gpu-bench/ missing: run bench/device_prep.sh and carry it" >&2; exit 2; }

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .gpu-bench/whl/*.whl || exit 3
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_HUB_DISABLE_PROGRESS_BARS=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit --format=csv | tee "$out/nvidia_smi.txt"
# Every import the benchmark needs, before any device time goes to the reference: a missing wheel
# stops here, in seconds, not after the reference's minutes.
python3 -c 'import sys, torch, diffusers, transformers, accelerate, safetensors, pydantic, yaml, spandrel, watchdog, PIL
import fluxworker.engines.flux, fluxworker.engines.esrgan, fluxworker.engines.lama, fluxworker.worker
assert torch.cuda.is_available(), "no CUDA device visible"
print("python", sys.version.split()[0], "torch", torch.__version__, "diffusers", diffusers.__version__, "transformers", transformers.__version__)' || exit 4
python3 -c 'import torchao; print("torchao", torchao.__version__)' 2>/dev/null || echo "torchao does not import: the fp8_compute section will be skipped"

if [ "${SKIP_BASELINE:-0}" != 1 ]; then
    echo "== plain diffusers reference"
    timeout "${BASELINE_TIMEOUT:-210}" python3 .gpu-bench/diffusers_baseline.py >"$out/baseline.log" 2>&1
    echo "reference exit status $?"
    grep '^{' "$out/baseline.log" | tail -n 20
fi

echo "== bench/gpu.py"
# shellcheck disable=SC2086  # BENCH_ARGS is a list of options
timeout "${BENCH_TIMEOUT:-370}" python3 bench/gpu.py --budget-s "${BENCH_BUDGET:-330}" ${BENCH_ARGS:-} \
    >"$out/gpu_bench.log" 2>&1
status=$?
echo "benchmark exit status $status"
# The summary table ends the log; a run cut short still left its JSON, section by section.
grep -v -i 'warn' "$out/gpu_bench.log" | tail -n 40
[ -f "$out/gpu_bench.png" ] || python3 bench/report.py "$out/gpu_bench.json" --chart "$out/gpu_bench.png"
exit "$status"
