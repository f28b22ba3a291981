"""The status writer: newest state only, in order, off the caller's thread once started."""

import logging
import threading
import time

from conftest import wait_for

from fluxworker.statusfile import StatusWriter


class Recorder:
    def __init__(self, delay: float = 0.0, fail: int = 0):
        self.written: list[dict] = []
        self.threads: set[str] = set()
        self.delay = delay
        self.fail = fail

    def __call__(self, status: dict) -> None:
        self.threads.add(threading.current_thread().name)
        if self.fail:
            self.fail -= 1
            raise OSError(28, "No space left on device")
        time.sleep(self.delay)
        self.written.append(status)


def test_before_start_and_after_close_a_state_is_written_at_once_on_the_callers_thread():
    recorder = Recorder()
    writer = StatusWriter(recorder)
    writer.put({"n": 1})
    assert recorder.written == [{"n": 1}]
    writer.start()
    writer.close()
    writer.put({"n": 2})
    assert recorder.written[-1] == {"n": 2}
    assert recorder.threads == {threading.current_thread().name}


def test_a_burst_of_states_is_merged_written_in_order_and_ends_with_the_newest():
    recorder = Recorder(delay=0.02)
    writer = StatusWriter(recorder)
    writer.start()
    try:
        for n in range(50):
            writer.put({"n": n})
        wait_for(lambda: recorder.written and recorder.written[-1] == {"n": 49}, timeout=10, what="the newest state")
    finally:
        writer.close()
    numbers = [s["n"] for s in recorder.written]
    assert numbers == sorted(set(numbers)), numbers  # never out of order, never twice
    assert len(numbers) < 50  # merged while a write was in progress
    assert recorder.threads == {"status-writer"}


def test_close_writes_what_is_still_pending():
    recorder = Recorder(delay=0.2)
    writer = StatusWriter(recorder)
    writer.start()
    writer.put({"n": 1})
    time.sleep(0.05)  # the thread is now writing n=1
    writer.put({"n": 2})
    writer.close()
    assert recorder.written[-1] == {"n": 2}


def test_a_failing_write_is_logged_once_and_the_writer_goes_on(caplog):
    recorder = Recorder(fail=3)
    writer = StatusWriter(recorder)
    with caplog.at_level(logging.WARNING, logger="fluxworker.statusfile"):
        for n in range(3):
            writer.put({"n": n})
        writer.put({"n": 3})
    assert recorder.written == [{"n": 3}]
    warnings = [r for r in caplog.records if "cannot write the status file" in r.getMessage()]
    assert len(warnings) == 1 and "No space left" in warnings[0].getMessage()
