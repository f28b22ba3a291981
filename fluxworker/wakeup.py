"""Waking the worker's loop without polling: a self-pipe that signals, file events and other
threads all write to, and the file-event handler that turns inbox changes into wake-ups."""

from __future__ import annotations

import logging
import os
import select
import signal
import threading
from pathlib import Path

from watchdog.events import (FileClosedEvent, FileCreatedEvent, FileMovedEvent, FileSystemEvent,
                             FileSystemEventHandler)
from watchdog.observers.polling import PollingObserver

from .inbox import is_job_name

# The file events that can mean a file is complete: created (written in place; its writer's close
# comes after), closed after writing, moved in (the atomic rename every writer here uses). Reads
# (open, close without writing), modifications and deletions wake nobody: they are most of the
# events (every reader of the status file makes two), and a wake-up for a read would make the woken
# thread read again. inotify is asked for these events only, so the others cost nothing.
HINT_EVENTS = (FileCreatedEvent, FileClosedEvent, FileMovedEvent)

# watchdog holds a rename's first half (IN_MOVED_FROM) back for this long, waiting for its second
# half, and every event behind it waits too: a file moved out of a watched folder (a claim, seen
# from the inbox's top folder) delays the events after it by the whole delay. The kernel queues both
# halves of a rename at once, so they pair up at once; but when watchdog's reader has already taken
# the first half, it sleeps out the whole delay even after the pair is made (0.5 s by default:
# about one job in a hundred waited that long). A short delay bounds both stalls; a half that stays
# unpaired is reported as a creation or a deletion, and file events are only hints here.
MOVE_PAIRING_SECONDS = 0.005


def watch(observer, handler: FileSystemEventHandler, folder: Path | str, *, recursive: bool) -> None:
    """Schedule ``handler`` for the :data:`HINT_EVENTS` in ``folder``. A polling observer sees no
    closes and compares snapshots (no reads to filter): it reports every change."""
    polling = isinstance(observer, PollingObserver)
    observer.schedule(handler, str(folder), recursive=recursive, event_filter=None if polling else HINT_EVENTS)


def _shorten_move_pairing() -> None:
    try:
        from watchdog.observers.inotify_move_event_grouper import InotifyMoveEventGrouper
    except ImportError:  # not Linux: no inotify
        return
    if getattr(InotifyMoveEventGrouper, "delay", 0) > MOVE_PAIRING_SECONDS:
        InotifyMoveEventGrouper.delay = MOVE_PAIRING_SECONDS


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

    Only the inbox's top folder is watched: the status and metrics files rewritten in processing/
    at every job step would otherwise wake watchdog's threads several times a job, and they share
    the interpreter with the engine.
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
_shorten_move_pairing()
