"""Finishing jobs off the engine's thread.

Once an engine has produced an image, what is left (encoding the PNG, writing it and the
completion record with their fsyncs, letting the job file go) runs on a thread of its own, so the
engine starts on the next job meanwhile. The order within a job does not change: image, then
record, then release. At most ``depth`` jobs wait to be finished, which bounds the memory their
images hold; a job still being finished is not claimed again.

The engine's thread may also hold a finished job back (``hold``) and hand it over only when the
next job is about to start (``release``): taking the next job from the queue is then not slowed by
the finishing work competing with it for the interpreter and the cores, so the engine waits less
between jobs. The held job is finished a fraction of a millisecond later.

A crash before a job is finished leaves its file in processing/, and it runs again at the next
start, as it always did.
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import Any, Callable

log = logging.getLogger(__name__)


class Finisher:
    """One thread that calls ``finish(item)`` for every submitted item, in order."""

    def __init__(self, finish: Callable[[Any], None], depth: int = 1):
        self._finish = finish
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._busy: set[str] = set()
        self._held: list[tuple[str, Any]] = []
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="finisher", daemon=True)
        self._thread.start()

    def submit(self, name: str, item: Any) -> None:
        """Hand over a job (by its file name); waits while ``depth`` jobs are still unfinished."""
        self.hold(name, item)
        self.release()

    def hold(self, name: str, item: Any) -> None:
        """Take a job (by its file name), busy from now on, but let the thread have it only at the
        next ``release`` (or ``drain``, or ``close``)."""
        with self._lock:
            self._busy.add(name)
            self._held.append((name, item))

    def release(self) -> None:
        """Hand the held jobs to the thread, in order; waits while ``depth`` jobs are unfinished."""
        with self._lock:
            held, self._held = self._held, []
        for entry in held:
            self._queue.put(entry)

    def busy(self, name: str) -> bool:
        """Whether the job file ``name`` is still being finished."""
        with self._lock:
            return name in self._busy

    def busy_names(self) -> list[str]:
        with self._lock:
            return sorted(self._busy)

    def drain(self) -> None:
        """Wait until every submitted job, held ones included, is finished."""
        self.release()
        self._queue.join()

    def close(self, timeout: float = 60.0) -> None:
        """Finish what was submitted, then stop the thread."""
        if self._thread is None:
            return
        self.release()
        self._queue.put(None)
        self._thread.join(timeout=timeout)
        if self._thread.is_alive():
            log.error("jobs were still being written after %.0fs; they run again at the next start", timeout)
        self._thread = None

    def _run(self) -> None:
        while True:
            entry = self._queue.get()
            try:
                if entry is None:
                    return
                name, item = entry
                try:
                    self._finish(item)
                except Exception:  # a job left unfinished runs again at the next start
                    log.exception("could not finish %s; it stays in processing/", name)
                finally:
                    with self._lock:
                        self._busy.discard(name)
            finally:
                self._queue.task_done()
