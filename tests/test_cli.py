"""The command line's own behaviour: the progress bar of ``submit --wait``, the demo's service process,
what ``check-config`` says about the systemd unit."""

import io

import pytest

from conftest import ROOT, write_config
from fluxworker import preflight
from fluxworker.cli import _ProgressBar, main


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_the_progress_bar_never_goes_back():
    terminal = Terminal()
    bar = _ProgressBar(terminal)
    bar({"id": "j", "status": "queued", "position": 1})
    bar({"id": "j", "status": "running", "step": 4, "total": 4})
    # Between the last step and the record the job is in processing/ with no step known.
    bar({"id": "j", "status": "running", "step": None, "total": None})
    shown = terminal.getvalue().split("\r\x1b[2K")
    assert shown[-1].endswith("4/4") and "0/?" not in terminal.getvalue()


def test_the_progress_bar_stays_quiet_off_a_terminal():
    stream = io.StringIO()
    _ProgressBar(stream)({"id": "j", "status": "running", "step": 1, "total": 4})
    assert stream.getvalue() == ""


def test_a_killed_demo_leaves_no_service_behind(tmp_path, tiny_dir):
    """The demo starts the service as a child; SIGKILL on the demo must not orphan it."""
    import os
    import shutil
    import signal
    import subprocess
    import sys

    import yaml

    from conftest import wait_for
    from fluxworker.tiny import tiny_config

    shutil.copytree(tiny_dir / "flux", tmp_path / "demo" / "flux")
    (tmp_path / "demo" / "config.yaml").write_text(yaml.safe_dump(tiny_config(tmp_path / "demo")))
    demo = subprocess.Popen([sys.executable, "-m", "fluxworker", "demo", "--dir", str(tmp_path / "demo")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def service_pids():
        pids = []
        for entry in os.listdir("/proc"):
            try:
                cmdline = open(f"/proc/{entry}/cmdline", "rb").read().split(b"\0")
            except OSError:
                continue
            if b"serve" in cmdline and str(tmp_path / "demo" / "config.yaml").encode() in cmdline:
                pids.append(int(entry))
        return pids

    try:
        wait_for(service_pids, timeout=60, what="the demo's service")
        demo.send_signal(signal.SIGKILL)
        demo.wait(timeout=30)
        wait_for(lambda: not service_pids(), timeout=60, what="the service to stop with the demo")
    finally:
        demo.kill()
        for pid in service_pids():
            os.kill(pid, signal.SIGKILL)


@pytest.fixture
def unit_dir(tmp_path, monkeypatch):
    """systemd's unit folders, empty: check-config compares with the shipped unit until one is installed."""
    folder = tmp_path / "etc" / "systemd" / "system"
    folder.mkdir(parents=True)
    monkeypatch.setattr(preflight, "UNIT_DIRS", (str(folder),))
    return folder


def check_config(folder, tiny_dir, capsys, stop_timeout) -> str:
    config = write_config(folder, tiny_dir, worker={"stop_timeout": stop_timeout})
    assert main(["check-config", "--config", str(config)]) == 0
    return capsys.readouterr().err


def test_check_config_warns_when_the_unit_would_kill_the_worker_before_its_stop_timeout(tmp_path, tiny_dir, capsys,
                                                                                       unit_dir):
    assert "stop_timeout" not in check_config(tmp_path, tiny_dir, capsys, 600)
    warning = check_config(tmp_path, tiny_dir, capsys, 3600)
    assert "warning: worker.stop_timeout: 3600 s" in warning and "660 s" in warning
    assert "sudo systemctl edit fluxworker-worker" in warning and "TimeoutStopSec=3660" in warning


def test_check_config_reads_the_installed_unit_and_its_drop_ins(tmp_path, tiny_dir, capsys, unit_dir):
    (unit_dir / "fluxworker-worker.service").write_text((ROOT / "deploy" / "fluxworker-worker.service").read_text())
    (unit_dir / "fluxworker-worker.service.d").mkdir()
    dropin = unit_dir / "fluxworker-worker.service.d" / "override.conf"
    dropin.write_text("[Service]\nTimeoutStopSec=1h\n")
    warning = check_config(tmp_path, tiny_dir, capsys, 3600)
    assert f"3600 s after asking it to stop (TimeoutStopSec in {dropin})" in warning
    dropin.write_text("[Service]\nTimeoutStopSec=1h 5min\n")
    assert "stop_timeout" not in check_config(tmp_path, tiny_dir, capsys, 3600)


def test_the_shipped_stop_timeout_is_the_worker_units():
    unit = (ROOT / "deploy" / "fluxworker-worker.service").read_text()
    value = next(line for line in unit.splitlines() if line.startswith("TimeoutStopSec=")).split("=", 1)[1]
    assert preflight.parse_timespan(value) == preflight.SHIPPED_TIMEOUT_STOP_S
