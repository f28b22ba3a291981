"""Taking job messages into the inbox: validation, ids, duplicates, and the results still owed.

A job message is acknowledged only after :meth:`Intake.take` returns: by then the job is durably in
the inbox (or known already) and a small *pending* file (``inbox/mqtt/pending/<id>.json``) records
that its result is owed over MQTT, with the MQTT v5 response topic and correlation data of the
request. The file goes once the broker has acknowledged every result message, so neither a broker
restart nor a worker restart loses a result: the completion record is on disk, and the pending
file says it is still owed.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from paho.mqtt.client import MQTTMessage

from .config import LimitsConfig
from .errors import JobError
from .inbox import Inbox, is_job_name, read_json, write_atomic
from .jobs import is_valid_id, new_job_id, parse_job, parse_json


@dataclass(frozen=True)
class Owed:
    """A request whose result is owed: the job id, the request's token, and where the reply goes."""

    id: str
    token: str = ""
    response_topic: str | None = None
    correlation_data: bytes | None = None


class PendingResults:
    """One file per request whose result messages the broker has not acknowledged yet."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def ensure(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)

    def _path(self, job_id: str) -> Path:
        return self.folder / f"{job_id}.json"

    def add(self, job_id: str, reply: Owed | None) -> Owed:
        """Record, durably, that the job's result is owed. A later request for the same job replaces
        the earlier one (the latest requester gets the reply); the token tells them apart."""
        owed = Owed(job_id, secrets.token_hex(8), reply.response_topic if reply else None,
                    reply.correlation_data if reply else None)
        data = {
            "id": job_id,
            "token": owed.token,
            "response_topic": owed.response_topic,
            "correlation_data": base64.b64encode(owed.correlation_data).decode() if owed.correlation_data else None,
        }
        write_atomic(self._path(job_id), json.dumps(data).encode())
        return owed

    def get(self, job_id: str) -> Owed | None:
        data = read_json(self._path(job_id))
        if not isinstance(data, dict) or not isinstance(data.get("token"), str):
            return None
        correlation = data.get("correlation_data")
        return Owed(job_id, data["token"], data.get("response_topic") or None,
                    base64.b64decode(correlation) if correlation else None)

    def settle(self, owed: Owed) -> None:
        """The broker has every result message of this request: forget it, unless a newer request
        for the same job replaced it meanwhile."""
        current = self.get(owed.id)
        if current is not None and current.token == owed.token:
            self.drop(owed.id)

    def drop(self, job_id: str) -> None:
        self._path(job_id).unlink(missing_ok=True)

    def ids(self) -> list[str]:
        try:
            names = os.listdir(self.folder)
        except FileNotFoundError:
            return []
        return sorted(name[:-5] for name in names if is_job_name(name) and is_valid_id(name[:-5]))


@dataclass(frozen=True)
class Outcome:
    """What became of a message: ``queued`` (now in the inbox), ``queued_before`` (already queued or
    running: a duplicate), ``finished_before`` (its result exists), or ``refused`` (``error``)."""

    kind: Literal["queued", "queued_before", "finished_before", "refused"]
    job_id: str | None
    reply: Owed | None = None
    error: JobError | None = None


class Intake:
    """Turns job messages into inbox files, once per job id."""

    def __init__(self, inbox: Inbox, limits: LimitsConfig, v5: bool):
        self.inbox = inbox
        self.limits = limits
        self.v5 = v5
        self.pending = PendingResults(inbox.root / "mqtt" / "pending")

    def start(self) -> None:
        """Forget owed results of jobs that never reached the inbox: their message was not
        acknowledged, so the broker delivers it again, which records the result as owed anew."""
        self.pending.ensure()
        for job_id in self.pending.ids():
            if self.inbox.presence(job_id) is None:
                self.pending.drop(job_id)

    def take(self, msg: MQTTMessage, data: Any = None) -> Outcome:
        """Validate a job message (or ``data`` built from it) and put the job durably into the
        inbox unless it is known already. Raises ``OSError`` when it cannot be stored: the message
        must then stay unacknowledged."""
        reply = None
        if self.v5 and msg.properties is not None and getattr(msg.properties, "ResponseTopic", None):
            reply = Owed("", "", msg.properties.ResponseTopic, getattr(msg.properties, "CorrelationData", None))
        job_id = None
        try:
            if data is None:
                data = parse_json(msg.payload, self.limits.max_job_bytes)
                if msg.retain:  # only a new subscription delivers a message with the retain flag
                    named = f" (job {data['id']})" if isinstance(data, dict) and is_valid_id(data.get("id")) else ""
                    raise JobError("retained_message", f"a retained job message{named} is not run: it would run "
                                   "again at every subscription; publish jobs without the retain flag")
            default_id = None
            if isinstance(data, dict):
                job_id = data["id"] if is_valid_id(data.get("id")) else None
                default_id = self.message_job_id(msg) if data.get("id") is None else None
                data = {**data, "transport": "mqtt"}
            job = parse_job(data, self.limits, default_id=default_id)
        except JobError as exc:
            return Outcome("refused", job_id, reply, exc)
        owed = self.pending.add(job.id, reply)
        where = self.inbox.presence(job.id)
        if where is None:
            self.inbox.submit(job.spec)
            return Outcome("queued", job.id, owed)
        return Outcome("finished_before" if where == "done" else "queued_before", job.id, owed)

    def message_job_id(self, msg: MQTTMessage) -> str:
        """The id of a job sent without one. A message the broker delivers again (its
        acknowledgement was lost) keeps its packet id and payload, so it maps to the same job; a
        new message that happens to map to a known job gets a fresh id."""
        digest = hashlib.sha256(msg.mid.to_bytes(4, "big") + msg.topic.encode() + msg.payload).hexdigest()
        job_id = f"mqtt-{digest[:16]}"
        if not msg.dup and self.inbox.presence(job_id) is not None:
            return f"mqtt-{new_job_id()}"
        return job_id

