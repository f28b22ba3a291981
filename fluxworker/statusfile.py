"""The worker's status file, written off the engine's thread.

The status changes at every job start and every step; writing it (JSON, a temporary file, a rename)
on the engine's thread would hold the engine up between jobs. A thread of its own writes it
instead, always the newest state only: changes that come faster than it writes are merged, and
states are never written out of order. Until the thread starts, and after it stops, writes are
made at once on the caller's thread (the first and the last state of a worker are never lost).
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any, Callable

log = logging.getLogger(__name__)

_NOTHING = object()


def process_alive(pid: Any) -> bool:
    """Whether the process a status file names still exists (one of another user counts): a
    status left by a worker that died must not be read as its current state."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class StatusWriter:
    """Calls ``write(status)`` for the newest status put, on a thread of its own once started."""

    def __init__(self, write: Callable[[dict], None]):
        self._write = write
        self._pending = _NOTHING
        self._changed = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closing = False
        self._failing = False

    def start(self) -> None:
        with self._changed:
            self._closing = False
        self._thread = threading.Thread(target=self._run, name="status-writer", daemon=True)
        self._thread.start()

    def put(self, status: dict) -> None:
        """Have ``status`` written (later, when the thread is running; else now)."""
        with self._changed:
            if self._thread is not None:
                self._pending = status
                self._changed.notify()
                return
        self._safe_write(status)

    def close(self, timeout: float = 10.0) -> None:
        """Write what is pending, then stop the thread; later puts are written at once."""
        thread = self._thread
        if thread is None:
            return
        with self._changed:
            self._closing = True
            self._changed.notify()
        thread.join(timeout=timeout)
        with self._changed:
            self._thread = None
            pending, self._pending = self._pending, _NOTHING
        if pending is not _NOTHING:
            self._safe_write(pending)

    def _run(self) -> None:
        while True:
            with self._changed:
                while self._pending is _NOTHING and not self._closing:
                    self._changed.wait()
                if self._pending is _NOTHING:
                    return
                status, self._pending = self._pending, _NOTHING
            self._safe_write(status)

    def _safe_write(self, status: dict) -> None:
        """The status file is a report: a failed write is logged (once until one succeeds) and
        never stops the worker."""
        try:
            self._write(status)
        except OSError as exc:
            if not self._failing:
                log.warning("cannot write the status file: %s", exc)
            self._failing = True
        else:
            self._failing = False
