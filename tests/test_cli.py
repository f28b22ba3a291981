"""The command line's own behaviour: the progress bar of ``submit --wait``, the demo's service process."""

import io

from fluxworker.cli import _ProgressBar


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
