"""Which results the bridge still has to deliver, and which of its messages are on their way.

Two kinds of results are owed:
- MQTT requests, recorded durably by :class:`.mqtt_intake.PendingResults` (one file per request,
  removed once the broker has acknowledged every result message);
- jobs from the inbox or HTTP that finished while the broker was unreachable: one empty file per
  job in ``inbox/mqtt/missed/`` (bounded), so that a restart of the worker while the broker is away
  keeps them, and their results go out at the next connection, as they would have gone out while
  connected. The completion records on disk stay the source of truth: a job whose record is gone
  by then is skipped.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from pathlib import Path

from .inbox import Inbox
from .jobs import is_valid_id
from .mqtt_intake import Owed, PendingResults

log = logging.getLogger(__name__)

MISSED_LIMIT = 1000  # finished jobs remembered while the broker is unreachable; the oldest go first


class Deliveries:
    """Owed results, and the tracked messages the broker has not acknowledged yet."""

    def __init__(self, inbox: Inbox, pending: PendingResults, missed_limit: int = MISSED_LIMIT):
        self.inbox = inbox
        self.pending = pending
        self.missed_limit = missed_limit
        self.inflight: dict[int, Owed | None] = {}  # mid of a tracked message -> the request it answers
        self.unacked: dict[str, int] = {}  # job id -> its result messages the broker has not acknowledged
        self.missed_folder = inbox.root / "mqtt" / "missed"
        self.missed: OrderedDict[str, None] = OrderedDict()  # finished while disconnected, oldest first
        self._overflow_logged = False
        self._absent: set[str] = set()  # pending jobs found nowhere at the last look
        self._load_missed()

    def _load_missed(self) -> None:
        """The jobs a previous run could not report, oldest first."""
        try:
            entries = [entry for entry in os.scandir(self.missed_folder) if is_valid_id(entry.name)]
        except FileNotFoundError:
            return
        for entry in sorted(entries, key=lambda entry: entry.stat(follow_symlinks=False).st_mtime_ns):
            self.missed[entry.name] = None
        if self.missed:
            log.info("mqtt: %d job(s) that finished while the broker was unreachable are reported at the "
                     "next connection", len(self.missed))

    def _marker(self, job_id: str) -> Path:
        return self.missed_folder / job_id

    def _forget(self, job_id: str) -> None:
        self.missed.pop(job_id, None)
        self._marker(job_id).unlink(missing_ok=True)

    def track(self, mid: int, owed: Owed | None) -> None:
        """A published message to wait for; with ``owed``, it counts towards settling that request."""
        self.inflight[mid] = owed
        if owed is not None:
            self.unacked[owed.id] = self.unacked.get(owed.id, 0) + 1

    def on_way(self, job_id: str) -> bool:
        """Whether result messages of this job wait for the broker's acknowledgement."""
        return bool(self.unacked.get(job_id))

    def acknowledged(self, mid: int) -> None:
        """The broker acknowledged a message: a request whose messages all landed is settled."""
        owed = self.inflight.pop(mid, None)
        if owed is None:
            return
        left = self.unacked.get(owed.id, 1) - 1
        if left > 0:
            self.unacked[owed.id] = left
        else:
            self.unacked.pop(owed.id, None)
            self.pending.settle(owed)

    def forget_unsent(self) -> None:
        """QoS 0 messages unsent at a disconnection are gone: their requests are owed again."""
        self.inflight = {mid: owed for mid, owed in self.inflight.items() if owed is None}
        self.unacked.clear()

    def miss(self, job_id: str) -> None:
        """A job finished while its results could not go out. Its marker file is not synced to disk:
        it is for a restart of the worker, not of the machine."""
        self.missed[job_id] = None
        self.missed.move_to_end(job_id)
        try:
            self.missed_folder.mkdir(parents=True, exist_ok=True)
            self._marker(job_id).touch()
        except OSError as exc:
            log.warning("mqtt: cannot note that job %s is still to be reported (%s): it is reported at the "
                        "next connection unless the worker restarts before", job_id, exc)
        while len(self.missed) > self.missed_limit:
            dropped = next(iter(self.missed))
            self._forget(dropped)
            if not self._overflow_logged:
                log.warning("mqtt: more than %d jobs finished while the broker was unreachable; the oldest "
                            "(%s first) are not reported on MQTT (their records are in outputs/)",
                            self.missed_limit, dropped)
                self._overflow_logged = True

    def sent(self, job_id: str) -> None:
        """The results of a missed job went out."""
        if job_id in self.missed:
            self._forget(job_id)

    def due(self) -> list[str]:
        """Jobs whose results should go out now: finished, owed, and not on their way already.

        A pending request whose job has no record and is neither queued nor in hand will never
        finish (retention removed its record, or the job was dropped): it is forgotten once two
        looks in a row found it nowhere (a job the worker puts back in the queue is briefly in
        neither folder).
        """
        due = []
        absent = set()
        for job_id in self.pending.ids():
            if self.on_way(job_id):
                continue
            where = self.inbox.presence(job_id)
            if where == "done":
                due.append(job_id)
            elif where is None and job_id in self._absent:
                log.warning("mqtt: the result of job %s is owed but its completion record is gone "
                            "(removed by retention?); it is no longer owed", job_id)
                self.pending.drop(job_id)
            elif where is None:
                absent.add(job_id)
        self._absent = absent
        for job_id in list(self.missed):
            if job_id in due or self.on_way(job_id):
                continue
            if self.inbox.has_record(job_id):
                due.append(job_id)
            else:
                self._forget(job_id)  # its record is gone: nothing to report any more
        return due


def read_image(inbox: Inbox, record: dict) -> bytes | None:
    """The PNG a completion record names, if it is still in outputs/."""
    name = record.get("file")
    if not isinstance(name, str) or "/" in name or name.startswith("."):
        return None
    try:
        return (inbox.outputs / name).read_bytes()
    except OSError:
        return None
