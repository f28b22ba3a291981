"""The folder protocol that makes the queue durable: drop, scan, claim, finish, recover.

Layout (all inside the inbox folder, so every rename stays on one file system)::

    inbox/<id>.json              queued jobs, written atomically by producers
    inbox/processing/<id>.json   the job in hand, claimed by an atomic rename
    inbox/failed/<name>          files that are not valid jobs, or jobs that failed,
    inbox/failed/<name>.error.json   each with its error beside it
    inbox/processing/.status.json  the worker's state and the running job's progress
                                 (outside the watched folder: its rewrites wake no one)
    outputs/<name>.png           images
    outputs/<id>.json            completion records, written last

A job is done exactly when its completion record exists; a job with a completion record never
runs again. Names starting with a dot are temporary files and are never read as jobs.
"""

from __future__ import annotations

import errno
import fcntl
import heapq
import json
import logging
import os
import re
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from .errors import JobError
from .jobs import JobSpec, is_valid_id, spec_json

log = logging.getLogger(__name__)

STATUS_NAME = ".status.json"
# What write_atomic and outputs_writable write before the rename or the removal; a writer killed
# in between leaves it behind.
TEMPORARY_NAME = re.compile(r"^\.(tmp-\d+-\d+-.+|probe-\d+)$")


def write_atomic(path: Path, data: bytes, *, durable: bool = True) -> None:
    """Write ``data`` to ``path`` through a temporary dotfile and a rename.

    With ``durable`` the file and its folder are fsynced, so the file survives a power cut once
    this returns. Readers never see a half-written file.
    """
    tmp = path.with_name(f".tmp-{os.getpid()}-{time.monotonic_ns()}-{path.name}")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            if durable:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def is_job_name(name: str) -> bool:
    """Job files are ``*.json`` without a leading dot; everything else is ignored."""
    return name.endswith(".json") and not name.startswith(".") and len(name) > len(".json")


def read_json(path: Path) -> Any | None:
    """A JSON file's content, or ``None`` when it is missing, a symbolic link (every file the
    service reads this way it wrote itself, so a link was planted: it is not followed) or not
    (yet) valid JSON."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        with open(fd, "rb") as file:
            return json.loads(file.read())
    except (OSError, ValueError, RecursionError):
        return None


def is_plain_file(path: Path) -> bool:
    """Whether ``path`` is a regular file itself, not a symbolic link to one."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


@dataclass(frozen=True)
class Entry:
    name: str
    mtime: float
    size: int


class WorkerBusy(Exception):
    """Another worker already serves this inbox."""


class Inbox:
    """One inbox folder and its outputs folder."""

    def __init__(self, root: Path, outputs: Path):
        self.root = Path(root)
        self.outputs = Path(outputs)
        self.processing = self.root / "processing"
        self.failed = self.root / "failed"
        self.status_path = self.processing / STATUS_NAME
        self._lock_handle = None

    # -- set-up ---------------------------------------------------------------------------

    def ensure(self) -> None:
        """Create the folders if needed."""
        for folder in (self.root, self.processing, self.failed, self.outputs):
            folder.mkdir(parents=True, exist_ok=True)

    def lock(self) -> None:
        """Take the inbox for this process; a second worker on the same inbox gets ``WorkerBusy``."""
        handle = open(self.processing / ".lock", "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            handle.seek(0)
            owner = handle.read().strip() or "another process"
            handle.close()
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                raise WorkerBusy(f"another worker (pid {owner}) already serves {self.root}") from None
            raise
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        self._lock_handle = handle

    def unlock(self) -> None:
        if self._lock_handle is not None:
            self._lock_handle.close()
            self._lock_handle = None

    # -- producers ------------------------------------------------------------------------

    def submit(self, spec: JobSpec, text: bytes | None = None) -> Path:
        """Drop a validated job (its id set) into the inbox, durably and atomically. ``text`` is
        ``spec_json(spec)`` when the caller has it already (a large job is not serialised twice)."""
        path = self.root / f"{spec.id}.json"
        write_atomic(path, spec_json(spec) if text is None else text)
        return path

    # -- the worker -----------------------------------------------------------------------

    def scan(self) -> list[Entry]:
        """Queued job files, oldest first."""
        entries = [Entry(name, stat.st_mtime, stat.st_size) for name, stat in _job_files(self.root)]
        entries.sort(key=lambda e: (e.mtime, e.name))
        return entries

    def claim(self, name: str) -> Path | None:
        """Move a queued file into processing/. Exactly one claimer wins; losers get ``None``."""
        target = self.processing / name
        try:
            os.rename(self.root / name, target)
        except FileNotFoundError:
            return None
        return target

    def recover(self, max_attempts: int) -> tuple[list[str], list[Path]]:
        """Put jobs left in processing/ by a crash back at the head of the queue.

        Returns the names requeued and the paths of jobs that already crashed the worker
        ``max_attempts`` times (the caller fails those instead of running them again).
        """
        requeued, poisoned = [], []
        for path in sorted(self.processing.glob("*.json")):
            if not is_job_name(path.name):
                continue
            attempts_file = self.processing / f".attempts-{path.name}"
            try:
                attempts = int(attempts_file.read_text()) + 1
            except (OSError, ValueError):
                attempts = 1
            if attempts >= max_attempts:
                poisoned.append(path)
                continue
            write_atomic(attempts_file, str(attempts).encode())
            os.rename(path, self.root / path.name)  # keeps its mtime: it stays at the head
            requeued.append(path.name)
        return requeued, poisoned

    def completion_path(self, job_id: str) -> Path:
        return self.outputs / f"{job_id}.json"

    def has_record(self, job_id: str) -> bool:
        """Whether the job's completion record is there (a planted symbolic link is not one)."""
        return is_plain_file(self.completion_path(job_id))

    def completion(self, job_id: str) -> dict | None:
        """The completion record of a job, or ``None`` while it is not finished."""
        if not is_valid_id(job_id):
            return None
        record = read_json(self.completion_path(job_id))
        return record if isinstance(record, dict) else None

    def write_output(self, name: str, data: bytes) -> Path:
        path = self.outputs / name
        write_atomic(path, data)
        return path

    def finish(self, processing_path: Path, record: dict) -> None:
        """Write the completion record (last, durably), then let go of the job file."""
        write_atomic(self.completion_path(record["id"]), json.dumps(record).encode())
        if record["status"] == "failed":
            self._to_failed(processing_path, record["error"])
        else:
            processing_path.unlink(missing_ok=True)
        (self.processing / f".attempts-{processing_path.name}").unlink(missing_ok=True)

    def reject(self, processing_path: Path, error: JobError, job_id: str | None, job_type: str | None = None) -> None:
        """A file that is not a valid job: to failed/ with its error, plus a failed record when
        its id is known and no record exists yet."""
        from .jobs import failed_record

        self._to_failed(processing_path, error.to_dict())
        if job_id is not None and not self.has_record(job_id):
            try:
                write_atomic(self.completion_path(job_id), json.dumps(failed_record(job_id, error, job_type)).encode())
            except OSError as exc:  # outputs full or read-only: failed/ still holds the file and its error
                log.warning("no failed record for %s: %s", job_id, exc)
        (self.processing / f".attempts-{processing_path.name}").unlink(missing_ok=True)

    def requeue(self, processing_path: Path) -> None:
        """Put a claimed job back at the head of the queue (its modification time is kept)."""
        os.rename(processing_path, self.root / processing_path.name)

    def outputs_writable(self, size: int) -> bool:
        """Whether ``size`` bytes can be written to outputs/ right now (written, synced, removed)."""
        probe = self.outputs / f".probe-{os.getpid()}"
        try:
            with open(probe, "wb") as handle:
                handle.write(b"\0" * size)
                handle.flush()
                os.fsync(handle.fileno())
            return True
        except OSError:
            return False
        finally:
            try:
                probe.unlink()
            except OSError:
                pass

    def remove_abandoned(self, older_than: float) -> list[Path]:
        """Remove the temporary files that writers killed mid-write left behind (in the inbox, its
        folders and outputs/), once they are ``older_than`` seconds: no write takes that long, so
        no file still being written goes."""
        removed = []
        limit = time.time() - older_than
        for folder in (self.root, self.processing, self.failed, self.root / "mqtt", self.root / "mqtt" / "pending",
                       self.outputs):
            try:
                entries = list(os.scandir(folder))
            except FileNotFoundError:
                continue
            for entry in entries:
                try:
                    if (TEMPORARY_NAME.match(entry.name) and entry.is_file(follow_symlinks=False)
                            and entry.stat(follow_symlinks=False).st_mtime < limit):
                        os.unlink(entry.path)
                        removed.append(Path(entry.path))
                except OSError:
                    continue
        return removed

    def discard(self, processing_path: Path) -> None:
        """Drop a duplicate of a job that already has its completion record."""
        processing_path.unlink(missing_ok=True)
        (self.processing / f".attempts-{processing_path.name}").unlink(missing_ok=True)

    def _to_failed(self, path: Path, error: dict) -> None:
        target = self.failed / path.name
        if target.exists():
            target = self.failed / f"{path.stem}.{time.time_ns()}{path.suffix}"
        try:
            os.rename(path, target)
        except FileNotFoundError:
            return
        write_atomic(target.with_name(target.name + ".error.json"), json.dumps({"error": error}).encode())

    # -- progress -------------------------------------------------------------------------

    def write_status(self, status: dict) -> None:
        """Replace the worker's status file (atomic, not fsynced: it is rewritten often)."""
        write_atomic(self.status_path, json.dumps(status).encode(), durable=False)

    def read_status(self) -> dict | None:
        status = read_json(self.status_path)
        return status if isinstance(status, dict) else None

    def presence(self, job_id: str) -> str | None:
        """Cheaply: ``done`` (its completion record exists), ``queued`` (in the inbox or in hand),
        or ``None`` when the id is unknown. Unlike :meth:`state_of`, it does not scan the queue."""
        if not is_valid_id(job_id):
            return None
        if self.has_record(job_id):
            return "done"
        name = f"{job_id}.json"
        if is_plain_file(self.root / name) or is_plain_file(self.processing / name):
            return "queued"
        # A job only moves inbox -> processing -> record, so looking again at the end misses none.
        return "done" if self.has_record(job_id) else None

    def state_of(self, job_id: str) -> dict | None:
        """Where a job stands: ``done``/``failed`` (its record), ``running`` (with progress),
        ``queued`` (with its position, 1 = next), or ``None`` when the id is unknown."""
        record = self.completion(job_id)
        if record is not None:
            return record
        # A job moves forward (queue, processing, record), except that a worker starting up puts
        # the jobs a crash left in processing/ back in the queue (so does a worker that cannot
        # write its outputs). Looking at the queue, processing/, the queue again and the record,
        # in that order, cannot miss a job that moves while we look.
        name = f"{job_id}.json"
        position = self._position(name)
        if position is None and is_plain_file(self.processing / name):
            status = self.read_status() or {}
            job = status.get("job") or {}
            state = {"id": job_id, "status": "running", "step": 0, "total": None}
            if job.get("id") == job_id:
                state.update(step=job.get("step", 0), total=job.get("total"))
            return state
        if position is None:
            position = self._position(name)
        if position is not None:
            return {"id": job_id, "status": "queued", "position": position}
        return self.completion(job_id)

    def _position(self, name: str) -> int | None:
        """Where a job file stands in the queue (1 = next), or None when it is not queued."""
        for position, entry in enumerate(self.scan(), start=1):
            if entry.name == name:
                return position
        return None

    def recent(self, limit: int, status: str | None = None) -> list[dict]:
        """The newest completion records (``status`` ones only, when given), newest first.

        Records are ordered by when their file was written, and only as many are read as the
        answer needs: outputs/ may hold any number of them.
        """
        if limit < 1:
            return []
        wanted = limit
        while True:
            newest = heapq.nlargest(wanted, self._record_files())
            found = []
            for _, name in newest:
                record = read_json(self.outputs / name)
                if isinstance(record, dict) and (status is None or record.get("status") == status):
                    found.append(record)
                    if len(found) == limit:
                        return found
            if len(newest) < wanted:  # every record has been looked at
                return found
            wanted *= 4

    def _record_files(self) -> Iterator[tuple[int, str]]:
        """``(modification time, name)`` of each completion record, unordered."""
        for name, info in _job_files(self.outputs):
            yield info.st_mtime_ns, name


def _job_files(folder: Path) -> Iterator[tuple[str, os.stat_result]]:
    """The name and stat of each job-named plain file in ``folder`` (none when it is missing)."""
    try:
        with os.scandir(folder) as it:
            for entry in it:
                if not is_job_name(entry.name):
                    continue
                try:
                    if entry.is_file(follow_symlinks=False):
                        yield entry.name, entry.stat(follow_symlinks=False)
                except OSError:
                    continue
    except FileNotFoundError:
        return
