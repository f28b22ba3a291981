"""From inbox files to jobs: when a file may be taken, reading it within the size limit, and
refusing, with a failed record where it names an id, what is not a valid job."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Callable

from .config import Config
from .errors import JobError
from .inbox import Inbox
from .jobs import is_valid_id, parse_json
from .metrics import JobMetrics

log = logging.getLogger(__name__)


class JobFiles:
    """The worker's reading side of the inbox protocol."""

    def __init__(self, config: Config, inbox: Inbox, metrics: JobMetrics, large_read: Callable[[], None],
                 large_bytes: int):
        self.limit = config.limits.max_job_bytes
        self.settle_seconds = config.inbox.settle_seconds
        self.inbox = inbox
        self.metrics = metrics
        self._large_read = large_read  # called before reading a file over large_bytes
        self._large_bytes = large_bytes
        self._unsettled: dict[str, float] = {}
        # The JSON that ready() parsed, for read() to reuse once the file is claimed: a rename keeps
        # the inode, size and modification time, so a match means the same bytes.
        self._parsed: tuple[str, tuple[int, int, int], Any] | None = None

    def ready(self, name: str, mtime: float) -> bool:
        """A file is ready once it parses as JSON; one that does not parse for ``settle_seconds``
        is taken anyway (and rejected). One over the size limit is taken at once, unread."""
        path = self.inbox.root / name
        try:
            st = os.stat(path)
            if st.st_size > self.limit:
                return True
            data = parse_json(path.read_bytes(), self.limit)
            self._unsettled.pop(name, None)
            if st.st_size <= self._large_bytes:
                self._parsed = (name, _identity(st), data)
            return True
        except FileNotFoundError:
            return False
        except JobError:
            first_seen = self._unsettled.setdefault(name, time.monotonic())
            age = min(time.time() - mtime, time.monotonic() - first_seen)
            return age >= self.settle_seconds

    def taken(self, name: str) -> None:
        self._unsettled.pop(name, None)

    def read(self, path: Path) -> Any:
        """A claimed job file's JSON; one over ``limits.max_job_bytes`` is refused unread."""
        st = os.stat(path)
        size = st.st_size
        parsed, self._parsed = self._parsed, None
        if parsed is not None and parsed[0] == path.name and parsed[1] == _identity(st):
            return parsed[2]
        if size > self.limit:
            raise JobError("too_large", f"the job file has {size} bytes; the limit is {self.limit}")
        if size > self._large_bytes:
            self._large_read()
        return parse_json(path.read_bytes(), self.limit)

    def read_leniently(self, path: Path) -> Any:
        """What :meth:`read` gives, or None: for naming a file's id in its rejection."""
        try:
            return self.read(path)
        except (JobError, OSError):
            return None

    def reject(self, path: Path, error: JobError, data: Any = None) -> None:
        """A file that is not a valid job goes to failed/; its id and type, where the file names
        valid ones, get a failed record."""
        stem = path.name[: -len(".json")]
        job_id = job_type = None
        transport = "inbox"
        if isinstance(data, dict):
            job_id = data.get("id") if is_valid_id(data.get("id")) else None
            job_type = data.get("type", "generate")
            job_type = job_type if job_type in ("generate", "upscale") else None
            transport = data.get("transport") if data.get("transport") in ("http", "mqtt") else "inbox"
        job_id = job_id or (stem if is_valid_id(stem) else None)
        log.warning("rejected %s: %s [%s] transport=%s", path.name, error.message, error.code, transport)
        self.inbox.reject(path, error, job_id, job_type)
        self.metrics.count_rejected(transport, job_type or "unknown")


def _identity(st: os.stat_result) -> tuple[int, int, int]:
    return st.st_ino, st.st_size, st.st_mtime_ns
