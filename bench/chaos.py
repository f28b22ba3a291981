#!/usr/bin/env python3
"""Chaos run: jobs from the inbox, HTTP and MQTT at once while the worker is SIGKILLed and
restarted, the API process is restarted and the broker is restarted; then every accepted job must
have exactly one completion record and one image, and no job may have run to completion twice.

Real processes throughout: ``fluxworker worker`` and ``fluxworker api`` as subprocesses, a
mosquitto with persistence in the run's folder, the tiny models. Faults come at random moments
(spread over the run, reproducible from ``--seed``):

- worker: SIGKILL once it serves again, restarted within a second; every second kill waits for a
  job in hand (a kill that would be the third during one job waits, as the worker fails a job
  that crashed it three times, ``worker_crashed``);
- API: SIGKILL and SIGTERM in turn, restarted within a second;
- broker: SIGTERM (it saves its database and loses nothing), restarted after up to 2 s; and, with
  ``--broker-kills``, SIGKILL. A killed mosquitto loses what it accepted since its last save (every
  second or two with ``autosave_interval 1``), which no client can tell apart, so MQTT jobs whose
  PUBACK came after the last save before a SIGKILL are counted apart as *at risk*, not accepted.

What "accepted" means for each way in is in ``chaos_clients``. Counted at the end:

- completed: accepted jobs with a ``done`` record and a readable image of the size asked for;
- lost: accepted jobs without a completion record after the drain (``--drain`` seconds at most);
- duplicated: jobs that ran to completion more than once: two "done" lines in the worker logs, a
  completion record replaced after it was first seen, or an image written after its record.

    python bench/chaos.py [--duration 240] [--rate 1] [--worker-kills 6] [--seed 1] [--json FILE]

The last line printed is ``chaos: accepted=A completed=C lost=L duplicated=D``.
"""

from __future__ import annotations

import os
import random
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent), str(HERE.parent / "tests")]

from brokers import Broker, Probe  # noqa: E402
from chaos_clients import (HttpFollower, HttpProducer, InboxProducer, Ledger, MqttProducer,  # noqa: E402
                           Submission)
from chaos_check import OutputWatcher, check  # noqa: E402
from services import (ApiService, WorkerService, options_parser, parsed_options, print_report,  # noqa: E402
                      tiny_models, write_config)


@dataclass
class Options:
    duration: float = 240.0  # seconds of jobs and faults
    rate: float = 1.0  # jobs per second, per way in
    large_fraction: float = 0.1
    worker_kills: int = 6
    api_restarts: int = 3
    broker_restarts: int = 3  # SIGTERM
    broker_kills: int = 1  # SIGKILL
    drain: float = 240.0  # at most this long for the accepted jobs to finish after the last one
    seed: int = 1


@dataclass
class Faults:
    """What the run did to the processes."""

    worker_kills: list[dict] = field(default_factory=list)  # {"at", "job": the job in hand or None}
    api_restarts: list[str] = field(default_factory=list)  # the signal of each
    broker_restarts: int = 0
    broker_kills: list[tuple[float, float]] = field(default_factory=list)  # (last save, restart), wall clock


def schedule(options: Options, rng: random.Random) -> list[tuple[float, str]]:
    """Fault times, each kind spread over the run: one at a random moment in each of its equal
    slots between 10% and 85% of the duration."""
    events = []
    for kind, count in (("worker", options.worker_kills), ("api", options.api_restarts),
                        ("broker", options.broker_restarts), ("broker-kill", options.broker_kills)):
        if count <= 0:
            continue
        start, span = 0.10 * options.duration, 0.75 * options.duration
        slot = span / count
        events += [(start + i * slot + rng.uniform(0, slot), kind) for i in range(count)]
    return sorted(events)


class Chaos:
    """One run: the processes, the producers, the faults and the final check."""

    def __init__(self, options: Options, work: Path, models: Path | None = None, say=print):
        self.options = options
        self.work = work
        self.say = say
        self.rng = random.Random(options.seed)
        self.models = tiny_models(models or work / "models")
        self.broker = Broker(work / "broker")
        mqtt = {"enabled": True, "host": "127.0.0.1", "port": self.broker.port, "reconnect_min_delay": 1,
                "reconnect_max_delay": 2}
        # Deep enough for the backlog of a worker restart; beyond it the API answers 503 and the
        # producer sends the job again later.
        http = {"max_queue": 60, "threads": 64, "wait_timeout": 30.0}
        self.config = write_config(work / "service", self.models, mqtt=mqtt, http=http)
        self.folder = self.config.parent
        self.worker = WorkerService(self.config, work / "logs")
        self.api = ApiService(self.config, work / "logs")
        self.ledger = Ledger()
        self.faults = Faults()

    def run(self) -> dict:
        options = self.options
        probe = watcher = follower = None
        producers: list = []
        stop_producing, stop_following = threading.Event(), threading.Event()
        try:
            self.broker.start()
            self.worker.start()
            self.api.start()
            if not (self.worker.wait_ready(180) and self.api.wait_ready(60)):
                raise RuntimeError("the service did not start:\n" + "\n".join(self.worker.log_texts()[-1:]))
            probe = Probe(self.broker, topics=[])
            common = (self.ledger, options.rate, options.seed, options.large_fraction, stop_producing)
            producers = [InboxProducer(self.folder / "inbox", *common), HttpProducer(self.api.url, *common),
                         MqttProducer(probe, *common)]
            follower = HttpFollower(self.api.url, self.ledger, stop_following)
            watcher = OutputWatcher(self.folder / "outputs")
            started = time.monotonic()
            for thread in (watcher, follower, *producers):
                thread.start()
            for at, kind in schedule(options, self.rng):
                time.sleep(max(0.0, started + at - time.monotonic()))
                self.fault(kind)
            time.sleep(max(0.0, started + options.duration - time.monotonic()))
            stop_producing.set()
            for producer in producers:
                producer.join(timeout=120)
            self.say(f"chaos: {len(self.ledger.items)} jobs sent in {time.monotonic() - started:.0f}s; draining")
            self.mark_at_risk()
            self.drain(follower)
        finally:
            stop_producing.set()
            stop_following.set()
            self.shut_down(watcher, probe)
        return check(self, producers, follower, watcher)

    def shut_down(self, watcher, probe) -> None:
        """Stop everything this run started, whatever failed before."""
        steps = [self.worker.stop, self.api.stop, self.broker.stop]
        steps = ([watcher.stop] if watcher else []) + ([probe.close] if probe else []) + steps
        for step in steps:
            try:
                step()
            except Exception as exc:  # the next step must still run
                self.say(f"chaos: while stopping: {type(exc).__name__}: {exc}")
        self.broker.kill()

    # -- faults ---------------------------------------------------------------------------------

    def fault(self, kind: str) -> None:
        if kind == "worker":
            self.kill_worker()
        elif kind == "api":
            sig = signal.SIGKILL if len(self.faults.api_restarts) % 2 == 0 else signal.SIGTERM
            self.api.signal(sig)
            self.faults.api_restarts.append(sig.name)
            time.sleep(self.rng.uniform(0, 1))
            self.api.start()
        elif kind == "broker-kill":
            saved = self.broker.saved_at()
            self.broker.kill()
            time.sleep(self.rng.uniform(0.5, 2.0))
            self.broker.start()
            # Until the new broker runs, a PUBACK can only come from the killed one: the clients
            # may read the last ones late.
            self.faults.broker_kills.append((saved, time.time() + 0.5))
        else:
            self.broker.stop()
            self.faults.broker_restarts += 1
            time.sleep(self.rng.uniform(0.5, 2.0))
            self.broker.start()

    def kill_worker(self) -> None:
        """SIGKILL the worker once it serves again, at a random moment shortly after; every second
        kill waits (up to 10 s) for a job in hand, so that kills land mid-job too. A job that crashed
        the worker twice is left alone (the worker fails a job that crashed it three times, on
        purpose). Then start it again."""
        self.worker.wait_ready(120)
        time.sleep(self.rng.uniform(0, 1.0))
        want_job = len(self.faults.worker_kills) % 2 == 1
        job = None
        for _ in range(500):  # 10 s at most
            status = self.worker.status()
            job = status.get("job") if status.get("state") == "running" else None
            if (job is not None or not want_job) and (job is None or self._crashes(job.get("id")) < 2):
                break
            time.sleep(0.02)
        self.worker.kill()
        self.faults.worker_kills.append({"at": time.time(), "job": job.get("id") if job else None})
        time.sleep(self.rng.uniform(0, 1.0))
        self.worker.start()

    def _crashes(self, job_id) -> int:
        try:
            return int((self.folder / "inbox" / "processing" / f".attempts-{job_id}.json").read_text())
        except (OSError, ValueError):
            return 0

    # -- the end --------------------------------------------------------------------------------

    def mark_at_risk(self) -> None:
        """MQTT jobs acknowledged after the broker's last save before one of its SIGKILLs."""
        for saved, restarted in self.faults.broker_kills:
            for sub in self.ledger.of("mqtt"):
                # A small margin: mosquitto stamps its file when it has written it, not when it began.
                if sub.accepted_at is not None and saved - 0.1 < sub.accepted_at <= restarted:
                    sub.at_risk = True

    def expected(self) -> list[Submission]:
        return [s for s in self.ledger.of() if s.accepted_at is not None]

    def drain(self, follower: HttpFollower) -> None:
        """Wait (bounded) until every accepted job has its record, every HTTP one was seen finished
        through GET /jobs/<id>, and the broker has every result owed over MQTT."""
        self.worker.wait_ready(120)
        deadline = time.monotonic() + self.options.drain
        outputs = self.folder / "outputs"
        pending = self.folder / "inbox" / "mqtt" / "pending"
        while time.monotonic() < deadline:
            missing = [s for s in self.expected() if not s.at_risk and not (outputs / f"{s.id}.json").exists()]
            if not missing and not _json_files(pending) and follower.poll_once() == 0:
                return
            time.sleep(0.5)


def _json_files(folder: Path) -> list[str]:
    try:
        return [name for name in os.listdir(folder) if name.endswith(".json")]
    except FileNotFoundError:
        return []


def run_chaos(options: Options, work: Path, models: Path | None = None, say=print) -> dict:
    return Chaos(options, work, models, say).run()


def main() -> int:
    defaults = Options()
    parser = options_parser(__doc__, defaults)
    parser.add_argument("--keep", type=Path, help="run in this folder and keep it (logs, records, images)")
    args = parser.parse_args()
    options = parsed_options(args, defaults)
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
        report = run_chaos(options, args.keep, args.models)
    else:
        with tempfile.TemporaryDirectory(prefix="fluxworker-chaos-") as tmp:
            report = run_chaos(options, Path(tmp), args.models)
    print_report(report, args.json)
    return 0 if report["lost"] == 0 and report["duplicated"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
