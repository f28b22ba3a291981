#!/usr/bin/env bash
# Installs fluxworker as two systemd services (worker and API) under a dedicated user.
# Idempotent: running it again upgrades the package and the units and keeps config and outputs.
#
#   sudo deploy/install.sh [--no-start] [--user NAME] [--prefix DIR] [--config-dir DIR]
#                          [--data-dir DIR] [--cache-dir DIR] [--unit-dir DIR] [--bin-dir DIR]
#                          [--pip-args "ARGS"]
#                          [--python PYTHON]   # Python >= 3.11 for the venv (or PYTHON=...); default python3
#   sudo deploy/install.sh --uninstall    # removes the units, the venv and the command; keeps config and outputs
set -euo pipefail

src=$(cd "$(dirname "$0")/.." && pwd)
user=fluxworker
prefix=/opt/fluxworker
config_dir=/etc/fluxworker
data_dir=/var/lib/fluxworker
cache_dir=/var/cache/fluxworker
unit_dir=/etc/systemd/system
bin_dir=/usr/local/bin  # where the fluxworker command is linked, so that it is on PATH
pip_args=""
start=1
uninstall=0
python=${PYTHON:-python3}
units=(fluxworker-worker.service fluxworker-api.service fluxworker.target)

usage() { sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; }

while (($#)); do
    case "$1" in
        --user) user=$2; shift ;;
        --prefix) prefix=$2; shift ;;
        --config-dir) config_dir=$2; shift ;;
        --data-dir) data_dir=$2; shift ;;
        --cache-dir) cache_dir=$2; shift ;;
        --unit-dir) unit_dir=$2; shift ;;
        --bin-dir) bin_dir=$2; shift ;;
        --pip-args) pip_args=$2; shift ;;
        --python) python=$2; shift ;;
        --no-start) start=0 ;;
        --uninstall) uninstall=1 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "install.sh: unknown option $1" >&2; usage >&2; exit 2 ;;
    esac
    shift
done

say() { printf 'install.sh: %s\n' "$*"; }
systemd_running() { command -v systemctl >/dev/null && [ -d /run/systemd/system ]; }
# Enabling only makes links, so it works without a running systemd (a container, an image being
# built) and into another root: units installed in <root>/etc/systemd/system are enabled there.
systemctl_root=()
enable_units=1
case "$unit_dir" in
    /etc/systemd/system | /etc/systemd/system/) ;;
    */etc/systemd/system | */etc/systemd/system/) systemctl_root=(--root="${unit_dir%/etc/systemd/system*}") ;;
    *) enable_units=0 ;;  # not where systemd looks for units: nothing to enable them in
esac
can_enable() { [ "$enable_units" = 1 ] && command -v systemctl >/dev/null; }
on_this_system() { [ "${#systemctl_root[@]}" = 0 ] && systemd_running; }

[ "$(id -u)" = 0 ] || { echo "install.sh: run as root (sudo)" >&2; exit 1; }

if [ "$uninstall" = 1 ]; then
    if can_enable; then
        if on_this_system; then systemctl stop "${units[@]}" 2>/dev/null || true; fi
        systemctl "${systemctl_root[@]}" disable --quiet "${units[@]}" 2>/dev/null || true
    fi
    for unit in "${units[@]}"; do
        rm -f "$unit_dir/$unit"
    done
    if on_this_system; then systemctl daemon-reload; fi
    if [ "$(readlink "$bin_dir/fluxworker" 2>/dev/null)" = "$prefix/venv/bin/fluxworker" ]; then
        rm -f "$bin_dir/fluxworker"
        say "removed the link $bin_dir/fluxworker"
    fi
    rm -rf "$prefix/venv"
    rmdir "$prefix" 2>/dev/null || true
    say "removed the units and $prefix/venv"
    say "kept: $config_dir (config, credentials), $data_dir (inbox, outputs, models), $cache_dir, user $user"
    exit 0
fi

# 1. The user, with access to the GPU's device groups where the distribution has them.
if ! id -u "$user" >/dev/null 2>&1; then
    useradd --system --user-group --home-dir "$data_dir" --no-create-home --shell /usr/sbin/nologin "$user"
    say "created system user $user"
fi
for group in video render; do
    if getent group "$group" >/dev/null; then usermod -a -G "$group" "$user"; fi
done

# 2. Folders: config readable by the service only, data and caches writable by it.
install -d -m 0755 "$prefix"
install -d -m 0750 -o root -g "$user" "$config_dir"
install -d -m 0700 -o root -g root "$config_dir/credentials"
install -d -m 0750 -o "$user" -g "$user" "$data_dir" "$data_dir/inbox" "$data_dir/outputs" "$data_dir/models"
install -d -m 0750 -o "$user" -g "$user" "$cache_dir" "$cache_dir/huggingface" "$cache_dir/inductor" "$cache_dir/triton"

# 3. The package in its own venv, on Python 3.11 or newer (Ubuntu 22.04's python3 is 3.10).
if [ ! -x "$prefix/venv/bin/python" ]; then
    if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
        echo "install.sh: fluxworker needs Python >= 3.11; $python is $("$python" --version 2>&1 || echo missing)." >&2
        echo "install.sh: install one (e.g. apt install python3.11 python3.11-venv) and run: sudo deploy/install.sh --python python3.11" >&2
        exit 1
    fi
    "$python" -m venv "$prefix/venv"
    say "created $prefix/venv"
fi
# shellcheck disable=SC2086  # pip_args is a list of options
"$prefix/venv/bin/python" -m pip install --quiet $pip_args "$src"
say "installed fluxworker $("$prefix/venv/bin/python" -c 'import fluxworker; print(fluxworker.__version__)')"
# The command on PATH (also sudo's secure_path), for status, info and check-config.
install -d -m 0755 "$bin_dir"
if [ -e "$bin_dir/fluxworker" ] && [ ! -L "$bin_dir/fluxworker" ]; then
    say "left $bin_dir/fluxworker alone: it is not a link (use $prefix/venv/bin/fluxworker)"
else
    ln -sfn "$prefix/venv/bin/fluxworker" "$bin_dir/fluxworker"
    say "linked $bin_dir/fluxworker to $prefix/venv/bin/fluxworker"
fi

# 4. The config, once: the shipped one with the folders and weight files under $data_dir.
#    Never overwritten.
if [ ! -f "$config_dir/config.yaml" ]; then
    sed -e "s#^  inbox: inbox\$#  inbox: $data_dir/inbox#" \
        -e "s#^  outputs: outputs\$#  outputs: $data_dir/outputs#" \
        -e "s#^  esrgan: models/#  esrgan: $data_dir/models/#" \
        -e "s#^  lama: models/#  lama: $data_dir/models/#" \
        "$src/config.yaml" > "$config_dir/config.yaml"
    chown root:"$user" "$config_dir/config.yaml"
    chmod 0640 "$config_dir/config.yaml"
    say "wrote $config_dir/config.yaml (edit models.flux, then restart)"
fi
"$prefix/venv/bin/fluxworker" check-config --config "$config_dir/config.yaml" >/dev/null

# 5. The units, with this installation's paths and user.
install -d -m 0755 "$unit_dir"
for unit in "${units[@]}"; do
    sed -e "s#/opt/fluxworker#$prefix#g" -e "s#/etc/fluxworker#$config_dir#g" \
        -e "s#/var/lib/fluxworker#$data_dir#g" -e "s#/var/cache/fluxworker#$cache_dir#g" \
        -e "s#^User=fluxworker\$#User=$user#" -e "s#^Group=fluxworker\$#Group=$user#" \
        "$src/deploy/$unit" > "$unit_dir/$unit.tmp"
    chmod 0644 "$unit_dir/$unit.tmp"
    mv "$unit_dir/$unit.tmp" "$unit_dir/$unit"
done
say "installed ${units[*]} in $unit_dir"

# 6. Start at boot (also with --no-start), and now.
if on_this_system; then systemctl daemon-reload; fi
if can_enable; then
    systemctl "${systemctl_root[@]}" enable --quiet "${units[@]}"
    say "enabled fluxworker.target: it starts at boot"
else
    say "not enabled: $unit_dir is not where systemd looks for units (or there is no systemctl)"
fi
if [ "$start" = 1 ] && on_this_system; then
    systemctl restart fluxworker.target
    say "started: systemctl status fluxworker-worker fluxworker-api; journalctl -u 'fluxworker-*' -f"
elif [ "$start" = 1 ]; then
    say "not started: systemd is not running here"
else
    say "not started (--no-start): sudo systemctl start fluxworker.target"
fi
