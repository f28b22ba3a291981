#!/usr/bin/env bash
# Installs what the tests need on a fresh machine, then runs them:
#   tests/run.sh [pytest arguments]
# System packages come from apt when missing (needs root); Python packages go into ./.venv.
set -euo pipefail
cd "$(dirname "$0")/.."

# chromium: browser tests; mosquitto: MQTT tests start their own brokers; systemd: systemd-analyze
# for the unit checks (without it tests/test_deploy.py would skip them).
apt_packages=(chromium chromium-driver mosquitto mosquitto-clients systemd)
if ((${#apt_packages[@]})); then
    missing=()
    for pkg in "${apt_packages[@]}"; do
        dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
    done
    if ((${#missing[@]})); then
        sudo_cmd=()
        [ "$(id -u)" -eq 0 ] || sudo_cmd=(sudo)
        "${sudo_cmd[@]}" apt-get update -q
        DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}"
    fi
fi

python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install -q -e '.[test]'

export HF_HUB_OFFLINE=1 HF_HUB_DISABLE_PROGRESS_BARS=1 PYTHONUNBUFFERED=1
exec .venv/bin/python -m pytest "$@"
