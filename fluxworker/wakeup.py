"""Waking the worker's loop without polling: a self-pipe that signals, file events and other
threads all write to, and the file-event handler that turns inbox changes into wake-ups."""

from __future__ import annotations

import logging
import os
import select
import signal
import threading
from pathlib import Path

from watchdog.events import FileSystemEvent, FileSystemEventHandler

from .inbox import is_job_name


class Waker:
    """A self-pipe: any thread, and signals, wake the loop sleeping in :meth:`wait`."""

    def __init__(self):
        self._read, self._write = os.pipe()
        os.set_blocking(self._read, False)
        os.set_blocking(self._write, False)

    def notify(self) -> None:
        try:
            os.write(self._write, b"x")
        except (BlockingIOError, OSError):
            pass  # the pipe is full or closed: the loop is awake anyway

    def wait(self, timeout: float) -> bool:
        """Sleep until woken or ``timeout``; True when woken."""
        ready, _, _ = select.select([self._read], [], [], max(0.0, timeout))
        if not ready:
            return False
        try:
            while os.read(self._read, 4096):
                pass
        except BlockingIOError:
            pass
        return True

    def attach_signals(self) -> None:
        signal.set_wakeup_fd(self._write, warn_on_full_buffer=False)

    def close(self) -> None:
        if threading.current_thread() is threading.main_thread():
            previous = signal.set_wakeup_fd(-1)
            if previous not in (-1, self._write):
                signal.set_wakeup_fd(previous)
        os.close(self._read)
        os.close(self._write)


class InboxEvents(FileSystemEventHandler):
    """File events are only hints that the inbox changed; the scan decides what is there.

    The watch is recursive although only the top folder holds queued jobs: a claim renames a file
    into processing/, and watchdog holds back a rename whose destination it does not watch for
    half a second, delaying every event behind it.
    """

    def __init__(self, root: Path, waker: Waker):
        self.root = os.fspath(root)
        self.waker = waker

    def on_any_event(self, event: FileSystemEvent) -> None:
        path = os.fsdecode(event.dest_path or event.src_path)
        folder, name = os.path.split(path)
        if folder == self.root and is_job_name(name):
            self.waker.notify()


class _ShutdownRaceFilter(logging.Filter):
    """Drop watchdog's report of an event read while its observer stops.

    Claims rename files out of the watched folder; watchdog holds such unpaired moves back and
    releases them when the observer closes, then logs this line although nothing went wrong.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return "called when the thread is inactive" not in record.getMessage()


logging.getLogger("watchdog.observers.inotify").addFilter(_ShutdownRaceFilter())
