"""The clients of the chaos run: one producer per way in, and what each of them was told.

Every job has an id chosen by its producer, so a producer that does not know whether a job got in
(the API died mid-request, the broker refused it) sends the same job again: the service runs a job
id once. A job counts as *accepted* only when the service said so:

- inbox: the rename of the job file into ``inbox/`` returned (the file was written and fsynced
  under a temporary dot name first);
- HTTP: ``POST /generate`` with ``"wait": false`` answered 202 (or 200: a retry of a job that had
  finished already) with the job's id;
- MQTT: the broker's PUBACK for a QoS 1 publish on ``<prefix>/jobs`` carried reason code 0. Reason
  code 16 (no matching subscribers: mosquitto before 2.0.12 forgets the worker's shared
  subscription when it restarts, until the worker subscribes again) means the broker dropped it:
  the producer sends it again.
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import requests
from services import json_body

TOPIC_JOBS = "fluxworker/jobs"
RETRY_FOR = 60.0  # how long a producer keeps trying to get one job accepted


@dataclass
class Submission:
    """One job and what its producer was told about it."""

    id: str
    transport: str
    job: dict
    attempts: int = 0
    accepted_at: float | None = None  # wall clock
    refusals: list[str] = field(default_factory=list)
    at_risk: bool = False  # MQTT: acknowledged after the broker's last save before a SIGKILL
    followed: str | None = None  # HTTP: the last status GET /jobs/<id> gave


class Ledger:
    """Every submission of every producer, by job id."""

    def __init__(self):
        self._lock = threading.Lock()
        self.items: dict[str, Submission] = {}

    def add(self, sub: Submission) -> Submission:
        with self._lock:
            self.items[sub.id] = sub
        return sub

    def of(self, transport: str | None = None) -> list[Submission]:
        with self._lock:
            return [s for s in self.items.values() if transport is None or s.transport == transport]


def make_job(rng: random.Random, job_id: str, large_fraction: float) -> dict:
    """Mostly 64x64 jobs of 1 to 4 steps; a fraction of larger ones that run long enough for a kill
    to land in the middle of one."""
    job = {"id": job_id, "prompt": f"chaos {job_id}", "width": 64, "height": 64,
           "num_inference_steps": rng.randint(1, 4)}
    if rng.random() < large_fraction:
        side = rng.choice((384, 512))
        job.update(width=side, height=side, num_inference_steps=rng.randint(6, 10))
    if rng.random() < 0.5:
        job["seed"] = rng.randrange(2**32)
    return job


class Producer(threading.Thread):
    """Sends jobs at ``rate`` per second on average (Poisson arrivals) until ``stop`` is set."""

    transport = ""

    def __init__(self, ledger: Ledger, rate: float, seed: int, large_fraction: float, stop: threading.Event):
        super().__init__(name=f"producer-{self.transport}", daemon=True)
        self.ledger = ledger
        self.rate = rate
        self.rng = random.Random(f"{seed}-{self.transport}")
        self.large_fraction = large_fraction
        self.stop = stop
        self.errors: list[str] = []

    def run(self) -> None:
        n = 0
        while not self.stop.wait(min(5.0, self.rng.expovariate(self.rate))):
            n += 1
            job_id = f"{self.transport}-{n:05d}"
            sub = self.ledger.add(Submission(job_id, self.transport, make_job(self.rng, job_id, self.large_fraction)))
            try:
                self.submit(sub)
            except Exception as exc:  # a producer bug must show in the report, not end the run silently
                self.errors.append(f"{job_id}: {type(exc).__name__}: {exc}")
        self.finish()

    def submit(self, sub: Submission) -> None:
        raise NotImplementedError

    def finish(self) -> None:
        """Settle what is still on its way after the last job."""


class InboxProducer(Producer):
    transport = "inbox"

    def __init__(self, inbox: Path, *args):
        super().__init__(*args)
        self.inbox = inbox

    def submit(self, sub: Submission) -> None:
        sub.attempts += 1
        tmp = self.inbox / f".{sub.id}.json.tmp"
        with open(tmp, "wb") as handle:
            handle.write(json.dumps(sub.job).encode())
            handle.flush()
            os.fsync(handle.fileno())
        os.rename(tmp, self.inbox / f"{sub.id}.json")
        sub.accepted_at = time.time()


class HttpProducer(Producer):
    """POST /generate with ``"wait": false``; the same job again until it gets its 202."""

    transport = "http"

    def __init__(self, url: str, *args):
        super().__init__(*args)
        self.url = url
        self.session = requests.Session()

    def submit(self, sub: Submission) -> None:
        deadline = time.monotonic() + RETRY_FOR
        while time.monotonic() < deadline:
            sub.attempts += 1
            try:
                response = self.session.post(self.url + "/generate", json={**sub.job, "wait": False}, timeout=15)
            except requests.RequestException as exc:
                sub.refusals.append(type(exc).__name__)
                time.sleep(0.3)
                continue
            body = json_body(response)
            if response.status_code in (200, 202) and body.get("id") == sub.id:
                sub.accepted_at = time.time()
                return
            code = (body.get("error") or {}).get("code", "?")
            sub.refusals.append(f"{response.status_code} {code}")
            if response.status_code != 503 or "Retry-After" not in response.headers:
                self.errors.append(f"{sub.id}: unexpected answer {response.status_code} {response.text[:200]}")
                return
            time.sleep(min(2.0, float(response.headers["Retry-After"])))


class HttpFollower(threading.Thread):
    """Follows every accepted HTTP job with GET /jobs/<id> until it is done or failed. An accepted
    job that the API calls unknown (404) is a fault, counted in ``unknown``."""

    def __init__(self, url: str, ledger: Ledger, stop: threading.Event):
        super().__init__(name="http-follower", daemon=True)
        self.url = url
        self.ledger = ledger
        self.stop = stop
        self.session = requests.Session()
        self.unknown: list[str] = []
        self.polls = 0

    def run(self) -> None:
        while not self.stop.wait(0.5):
            self.poll_once(limit=40)

    def poll_once(self, limit: int = 10_000) -> int:
        """Ask about up to ``limit`` followed jobs that are not finished; returns how many are left."""
        left = [s for s in self.ledger.of("http") if s.accepted_at is not None and s.followed not in ("done", "failed")]
        for sub in left[:limit]:
            try:
                response = self.session.get(f"{self.url}/jobs/{sub.id}", timeout=10)
            except requests.RequestException:
                return len(left)  # the API is restarting
            self.polls += 1
            if response.status_code == 404:
                self.unknown.append(sub.id)
            elif response.status_code == 200:
                sub.followed = json_body(response).get("status")
        return len([s for s in left if s.followed not in ("done", "failed")])


class MqttProducer(Producer):
    """QoS 1 publishes on ``<prefix>/jobs``; a job refused by the broker (reason code 16) is sent
    again until a PUBACK says success."""

    transport = "mqtt"

    def __init__(self, probe, *args):
        super().__init__(*args)
        self.probe = probe  # brokers.Probe: a paho client that records each PUBACK's reason code
        self._waiting: list[tuple[Submission, int, float]] = []  # (job, mid, when to give up waiting)
        self._retry: list[tuple[float, Submission]] = []  # (not before, job)

    def submit(self, sub: Submission) -> None:
        self._publish(sub)
        self.settle()

    def _publish(self, sub: Submission) -> None:
        sub.attempts += 1
        mid = self.probe.publish(TOPIC_JOBS, sub.job, wait=False)
        self._waiting.append((sub, mid, time.monotonic() + RETRY_FOR))

    def settle(self) -> None:
        """Note the PUBACKs that came back, and send again what the broker refused."""
        now = time.monotonic()
        waiting = []
        for sub, mid, give_up in self._waiting:
            ack = self.probe.acks.get(mid)
            if ack is None:
                if now < give_up:
                    waiting.append((sub, mid, give_up))  # paho sends it again after a reconnection
                else:
                    sub.refusals.append("no PUBACK")
                continue
            code, at = ack
            if code == 0:
                sub.accepted_at = at
            else:
                sub.refusals.append(f"reason code {code}")
                if sub.attempts < 200:
                    self._retry.append((now + 0.5, sub))
        self._waiting = waiting
        due = [item for item in self._retry if item[0] <= now]
        self._retry = [item for item in self._retry if item[0] > now]
        for _, sub in due:
            self._publish(sub)

    def finish(self) -> None:
        deadline = time.monotonic() + RETRY_FOR
        while (self._waiting or self._retry) and time.monotonic() < deadline:
            time.sleep(0.2)
            self.settle()
        for sub, _, _ in self._waiting:
            sub.refusals.append("no PUBACK")
