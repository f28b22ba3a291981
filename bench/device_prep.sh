#!/usr/bin/env bash
# Gathers, on this machine, what the GPU benchmark carries to the device machine: the plain-diffusers
# reference script and wheels of the packages that machine lacks (it has Python 3.12, PyTorch and
# transformers' dependencies, but no diffusers, spandrel, pydantic, watchdog or torchao, and no network), all in
# .gpu-bench/, which git ignores. Run it once before bench/device_run.sh; it costs no device time.
#
#   bench/device_prep.sh [PATH/TO/diffusers_baseline.py]    (default: ../shared/bench/diffusers_baseline.py)
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
dest=$root/.gpu-bench
baseline=${1:-$root/../shared/bench/diffusers_baseline.py}
python=${PYTHON:-python3}
# The versions this project is tested with; transformers and regex travel too, so that both ends
# run the same diffusers and transformers (only PyTorch differs: the device has its own CUDA build).
wheels=(
    diffusers==0.42.1 transformers==5.24.0 regex==2026.11.19 spandrel==0.4.2
    pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
    typing-extensions==4.16.0 watchdog==7.1.0
    torchao==0.18.0  # only for the fp8_compute candidate; needs PyTorch 2.11 or newer
)

[ -f "$baseline" ] || { echo "device_prep.sh: $baseline not found (pass its path)" >&2; exit 2; }
mkdir -p "$dest/whl"
cp "$baseline" "$dest/diffusers_baseline.py"
rm -f "$dest"/whl/*.whl
"$python" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$dest/whl" "${wheels[@]}"
du -sh "$dest"
ls "$dest/whl"
echo "device_prep.sh: ready; run bench/device_run.sh on the device with carry [\".gpu-bench\"]"
