"""The terminal progress bar of ``fluxworker submit --wait``."""

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
