"""Waiting for completion records without busy polling.

One file watcher on ``outputs/`` (records) and the inbox (queue moves, and progress in
``processing/.status.json``) wakes every thread waiting on a job; each then looks at its own job.
The inbox watch is recursive so that moves between its folders pair up (watchdog holds back a move
whose destination it does not watch, delaying every event behind it). Only the events that can mean
a file is complete wake anyone (see :data:`fluxworker.wakeup.HINT_EVENTS`): the waiters' own reads
must not wake them again. A slow poll stays as a safety net for folders where file events do not
arrive (network file systems).
"""

from __future__ import annotations

import threading
import time
from typing import Callable

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from .inbox import Inbox
from .wakeup import watch

StateCallback = Callable[[dict], None]


class _Wake(FileSystemEventHandler):
    def __init__(self, waiter: "CompletionWaiter"):
        self.waiter = waiter

    def on_any_event(self, event: FileSystemEvent) -> None:
        self.waiter.notify()


class CompletionWaiter:
    """Lets any number of threads wait for jobs' completion records.

    Use as a context manager, or call :meth:`start` and :meth:`close`.
    """

    def __init__(self, inbox: Inbox, poll_interval: float = 1.0):
        self.inbox = inbox
        self.poll_interval = poll_interval
        self._changed = threading.Condition()
        self._generation = 0
        self._observer = None

    def start(self) -> "CompletionWaiter":
        self.inbox.ensure()
        observer = Observer()
        handler = _Wake(self)
        watch(observer, handler, self.inbox.outputs, recursive=False)
        watch(observer, handler, self.inbox.root, recursive=True)
        observer.daemon = True
        observer.start()
        self._observer = observer
        return self

    def close(self) -> None:
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=5)
            self._observer = None

    def __enter__(self) -> "CompletionWaiter":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def notify(self) -> None:
        with self._changed:
            self._generation += 1
            self._changed.notify_all()

    def wait(self, job_id: str, timeout: float, on_state: StateCallback | None = None,
             until: Callable[[], bool] | None = None) -> dict | None:
        """The job's completion record, or ``None`` after ``timeout`` seconds (or as soon as
        ``until()`` is true: it is asked at every wake-up).

        With ``on_state``, every new state before the end (queue position, running step) is
        passed to it.
        """
        deadline = time.monotonic() + timeout
        last = None
        while True:
            with self._changed:
                generation = self._generation
            if on_state is None:
                record = self.inbox.completion(job_id)
                if record is not None:
                    return record
            else:
                state = self.inbox.state_of(job_id)
                if state is not None and state.get("status") in ("done", "failed"):
                    return state
                if state is not None and state != last:
                    last = state
                    on_state(state)
            remaining = deadline - time.monotonic()
            if remaining <= 0 or (until is not None and until()):
                return None
            with self._changed:
                if self._generation == generation:
                    self._changed.wait(min(remaining, self.poll_interval))
