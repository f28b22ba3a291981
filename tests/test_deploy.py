"""The systemd units and the install script, as far as a machine without a running systemd allows.

The install script runs for real (as root: it creates a system user, folders, a venv and the
units) into temporary folders, with the units in a separate root's /etc/systemd/system, where
`systemctl --root` enables them. Only `systemctl start` cannot run here: no systemd is running as
init. tests/run.sh installs systemd-analyze, so the unit checks run wherever the tests do.
"""

import os
import pwd
import shutil
import site
import subprocess
import sys
import uuid

import pytest
import yaml

from conftest import ROOT

UNITS = ["fluxworker-worker.service", "fluxworker-api.service", "fluxworker.target"]
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="the install script creates a system user: run as root")
needs_systemd_analyze = pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")


@needs_systemd_analyze
@pytest.mark.parametrize("unit, limit", [("fluxworker-worker.service", 2.5), ("fluxworker-api.service", 2.0)])
def test_units_are_hardened(unit, limit):
    result = subprocess.run(["systemd-analyze", "security", "--offline=true", str(ROOT / "deploy" / unit)],
                            capture_output=True, text=True, timeout=60)
    last = result.stdout.strip().splitlines()[-1]
    exposure = float(last.split("level for")[1].split(":")[1].split()[0])
    assert exposure <= limit, result.stdout


@needs_systemd_analyze
def test_the_shipped_units_pass_systemd_analyze_verify(tmp_path):
    units = [ROOT / "deploy" / unit for unit in UNITS]
    shipped = subprocess.run(["systemd-analyze", "verify", "--man=no", *map(str, units)],
                             capture_output=True, text=True, timeout=120)
    # As shipped, the only complaint allowed is the executable that install.sh puts in place.
    complaints = [line for line in (shipped.stdout + shipped.stderr).splitlines() if line.strip()]
    assert all("/opt/fluxworker/venv/bin/fluxworker is not executable" in line for line in complaints), complaints

    stub = tmp_path / "fluxworker"
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    for unit in units:
        (tmp_path / unit.name).write_text(unit.read_text().replace("/opt/fluxworker/venv/bin/fluxworker", str(stub)))
    verify = subprocess.run(["systemd-analyze", "verify", "--man=no", *(str(tmp_path / u) for u in UNITS)],
                            capture_output=True, text=True, timeout=120)
    assert verify.returncode == 0 and not (verify.stdout + verify.stderr).strip(), verify.stdout + verify.stderr


def test_stop_timeout_of_the_worker_unit_covers_the_configured_job_stop_timeout():
    unit = (ROOT / "deploy" / "fluxworker-worker.service").read_text()
    stop = int(next(line for line in unit.splitlines() if line.startswith("TimeoutStopSec=")).split("=")[1])
    config = yaml.safe_load((ROOT / "config.yaml").read_text())
    assert stop > config["worker"]["stop_timeout"]
    assert "Type=notify" in unit and "Restart=on-failure" in unit


@pytest.fixture
def install_root(tmp_path):
    user = f"fwtest{uuid.uuid4().hex[:6]}"
    root = tmp_path / "root"
    dirs = {
        "--prefix": root / "opt", "--config-dir": root / "etc", "--data-dir": root / "var" / "lib",
        "--cache-dir": root / "var" / "cache", "--unit-dir": root / "sysroot" / "etc" / "systemd" / "system",
        "--bin-dir": root / "usr" / "local" / "bin",
    }
    # The venv borrows this test run's packages through a .pth file, so that installing needs no
    # download; the script then installs fluxworker itself into it, as it would on a real machine.
    venv = dirs["--prefix"] / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    purelib = next(venv.glob("lib/python*/site-packages"))
    (purelib / "borrowed.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    args = [str(ROOT / "deploy" / "install.sh"), "--no-start", "--user", user, "--pip-args",
            "--no-deps --no-build-isolation --no-index"]
    for option, path in dirs.items():
        args += [option, str(path)]
    yield args, dirs, user
    subprocess.run(["userdel", user], capture_output=True, timeout=60)
    subprocess.run(["groupdel", user], capture_output=True, timeout=60)


def run_install(args):
    return subprocess.run(args, capture_output=True, text=True, timeout=600, cwd="/")


@needs_root
@needs_systemd_analyze
def test_install_script_is_idempotent_and_uninstall_keeps_the_outputs(install_root):
    args, dirs, user = install_root
    first = run_install(args)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "enabled fluxworker.target" in first.stdout and "not started (--no-start)" in first.stdout
    unit_dir = dirs["--unit-dir"]
    links = [unit_dir / "multi-user.target.wants" / "fluxworker.target",
             unit_dir / "fluxworker.target.wants" / "fluxworker-worker.service",
             unit_dir / "fluxworker.target.wants" / "fluxworker-api.service"]
    assert all(link.is_symlink() for link in links)  # enabled although not started
    fluxworker = dirs["--prefix"] / "venv" / "bin" / "fluxworker"
    command = dirs["--bin-dir"] / "fluxworker"  # on PATH, for `sudo -u fluxworker fluxworker status`
    assert os.readlink(command) == str(fluxworker)
    second = run_install(args)
    assert second.returncode == 0, second.stdout + second.stderr
    assert os.readlink(command) == str(fluxworker)

    entry = pwd.getpwnam(user)
    data = dirs["--data-dir"]
    for folder in (data / "inbox", data / "outputs", dirs["--cache-dir"]):
        assert folder.stat().st_uid == entry.pw_uid
    config = dirs["--config-dir"] / "config.yaml"
    assert oct(config.stat().st_mode & 0o777) == "0o640"
    loaded = yaml.safe_load(config.read_text())
    assert loaded["paths"] == {"inbox": str(data / "inbox"), "outputs": str(data / "outputs")}
    assert loaded["models"]["esrgan"] == str(data / "models" / "RealESRGAN_x4plus.pth")
    assert loaded["models"]["lama"] == str(data / "models" / "big-lama.pt")
    check = subprocess.run([str(command), "check-config", "--config", str(config)], capture_output=True,
                           text=True, timeout=120)
    assert check.returncode == 0, check.stderr

    units = [dirs["--unit-dir"] / unit for unit in UNITS]
    worker_unit = units[0].read_text()
    assert f"ExecStart={fluxworker} worker" in worker_unit
    assert f"User={user}" in worker_unit and f"ReadWritePaths={data} {dirs['--cache-dir']}" in worker_unit
    verify = subprocess.run(["systemd-analyze", "verify", "--man=no", *map(str, units)],
                            capture_output=True, text=True, timeout=120)
    assert verify.returncode == 0, verify.stdout + verify.stderr

    (data / "outputs" / "keep-me.png").write_bytes(b"png")
    config.write_text(config.read_text() + "\n# edited by the user\n")
    third = run_install(args)
    assert third.returncode == 0
    assert config.read_text().endswith("# edited by the user\n")

    removed = run_install([*args, "--uninstall"])
    assert removed.returncode == 0, removed.stderr
    assert not any(unit.exists() for unit in units)
    assert not any(link.is_symlink() for link in links)
    assert not (dirs["--prefix"] / "venv").exists()
    assert not command.is_symlink()
    assert (data / "outputs" / "keep-me.png").exists() and config.exists()


@needs_root
def test_install_leaves_a_fluxworker_command_that_is_not_its_link_alone(install_root):
    args, dirs, _user = install_root
    dirs["--bin-dir"].mkdir(parents=True)
    (dirs["--bin-dir"] / "fluxworker").write_text("#!/bin/sh\necho mine\n")
    installed = run_install(args)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    assert "left" in installed.stdout and not (dirs["--bin-dir"] / "fluxworker").is_symlink()
    assert run_install([*args, "--uninstall"]).returncode == 0
    assert (dirs["--bin-dir"] / "fluxworker").read_text() == "#!/bin/sh\necho mine\n"


@needs_root
def test_install_refuses_a_python_older_than_3_11_and_says_how_to_choose_another(install_root, tmp_path):
    args, dirs, _user = install_root
    shutil.rmtree(dirs["--prefix"] / "venv")
    old = tmp_path / "python3.10"
    old.write_text("#!/bin/sh\ncase \"$1\" in --version) echo Python 3.10.12;; *) exit 1;; esac\n")
    old.chmod(0o755)
    result = run_install([*args, "--python", str(old)])
    assert result.returncode == 1
    assert "needs Python >= 3.11" in result.stderr and "--python python3.11" in result.stderr
    assert not (dirs["--prefix"] / "venv").exists()


@needs_root
def test_install_refuses_unknown_options():
    result = subprocess.run([str(ROOT / "deploy" / "install.sh"), "--frobnicate"], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2 and "unknown option" in result.stderr
