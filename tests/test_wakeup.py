"""Wake-ups from file events, on a real folder with a real inotify observer."""

import os
import threading
import time

from watchdog.events import FileSystemEventHandler
from watchdog.observers import Observer

from fluxworker.wakeup import MOVE_PAIRING_SECONDS, InboxEvents, Waker, watch


class Events(FileSystemEventHandler):
    def __init__(self):
        self.seen = []
        self.arrived = threading.Event()

    def on_any_event(self, event):
        self.seen.append(event)
        self.arrived.set()

    def next(self, timeout: float = 5.0) -> bool:
        arrived = self.arrived.wait(timeout)
        self.arrived.clear()
        return arrived

    def until(self, matches, timeout: float = 5.0) -> bool:
        """Wait, bounded, until an event that `matches` has been seen."""
        deadline = time.monotonic() + timeout
        while not any(matches(e) for e in list(self.seen)):
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self.next(timeout=min(left, 0.5))
        return True


def names(event) -> set[str]:
    paths = [event.src_path, getattr(event, "dest_path", "") or ""]
    return {os.path.basename(os.fsdecode(p)) for p in paths if p}


def test_reads_wake_nobody_and_a_file_moved_in_does(tmp_path):
    status = tmp_path / ".status.json"
    status.write_text("{}")
    events = Events()
    observer = Observer()
    watch(observer, events, tmp_path, recursive=False)
    observer.start()
    try:
        for _ in range(20):  # what every reader of the status file does
            status.read_text()
            os.stat(status)
        assert not events.next(timeout=0.5), events.seen

        (tmp_path / ".tmp-job").write_text('{"prompt": "x"}')
        # created, then closed after writing: the two may arrive apart
        assert events.until(lambda e: e.event_type == "closed"), events.seen
        os.rename(tmp_path / ".tmp-job", tmp_path / "job.json")
        assert events.until(lambda e: "job.json" in names(e)), events.seen
    finally:
        observer.stop()
        observer.join(timeout=5)


def test_the_inbox_handler_wakes_the_loop_for_job_files_only(tmp_path):
    waker = Waker()
    observer = Observer()
    watch(observer, InboxEvents(tmp_path, waker), tmp_path, recursive=False)
    observer.start()
    try:
        (tmp_path / "notes.txt").write_text("not a job")
        assert not waker.wait(0.5)
        (tmp_path / ".tmp-1").write_text("{}")
        os.rename(tmp_path / ".tmp-1", tmp_path / "a.json")
        assert waker.wait(5.0)
    finally:
        observer.stop()
        observer.join(timeout=5)
        waker.close()


def test_watchdog_holds_half_a_rename_back_only_briefly():
    from watchdog.observers.inotify_move_event_grouper import InotifyMoveEventGrouper

    assert InotifyMoveEventGrouper.delay == MOVE_PAIRING_SECONDS <= 0.01
    assert InotifyMoveEventGrouper()._queue.delay == MOVE_PAIRING_SECONDS
