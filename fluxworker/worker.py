"""The resident worker: take the oldest job from the inbox, run its engine, write its result.

Signals only set flags. The first SIGTERM or SIGINT lets the job in hand finish (for at most
``worker.stop_timeout`` seconds) and then the loop ends with exit status 0; the second one ends the
process at once, and the job in hand runs again at the next start.

The loop never waits by polling: it sleeps in ``select`` on one pipe that file events, signals
(``signal.set_wakeup_fd``) and the periodic rescan timeout all wake.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from watchdog.observers import Observer
from watchdog.observers.polling import PollingObserver

from . import __version__
from .config import Config
from .engines import EngineSet, Result, RunContext, build_engines
from .errors import JobError
from .finisher import Finisher
from .images import png_bytes
from .inbox import Inbox, WorkerBusy, write_atomic
from .jobfiles import JobFiles
from .jobs import Job, done_record, draw_seed, failed_record, now_iso, parse_job, spec_json
from .metadata import job_parameters
from .metrics import SNAPSHOT_NAME, JobMetrics
from .systemd import notify
from .upkeep import Upkeep
from .statusfile import StatusWriter
from .wakeup import InboxEvents, Waker, watch

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_STOP_TIMEOUT = 75  # the job in hand outlasted stop_timeout; it runs again at the next start
MAX_ATTEMPTS = 3  # a job that crashed the worker this many times is failed instead of rerun
HOLD_UP_TO_BYTES = 64 * 1024  # a finished job waits for the next to start only if that one is this small


@dataclass
class _Finished:
    """A job the engine is done with, waiting for its results to be written."""

    job: Job
    path: Path
    record: dict
    result: Result | None
    started: float
    steps: int | None
    run_s: float  # the engine's time alone: the metrics count it, not the writing of the results


class StopNow(Exception):
    """Raised inside a job when a stop was requested and the stop timeout has passed."""


class Worker:
    """The resident loop over one inbox with one set of engines."""

    def __init__(self, config: Config, engines: EngineSet | None = None):
        self.config = config
        self.inbox = Inbox(config.paths.inbox, config.paths.outputs)
        self.engines = engines
        self.waker = Waker()
        self.stop_requests = 0
        self._stop_requested_at: float | None = None
        self._stop_logged = False
        self._finishing: set[str] = set()  # ids of jobs run but not yet finished (see Finisher.hold)
        self._status: dict = {}
        self.jobs_done = 0
        self.metrics = JobMetrics(self.inbox.processing / SNAPSHOT_NAME)
        self.upkeep = Upkeep(self.inbox, config.retention)
        self._blocked: dict | None = None  # outputs/ could not be written: jobs wait in the inbox
        self.status_listeners: list[Callable[[dict], None]] = []  # told of every status change and step
        self.finish_listeners: list[Callable[[dict], None]] = []  # told of every completion record written
        self.finisher = Finisher(self._finish)
        # Decoding a large job's images takes a while: the held job is handed over first.
        self.files = JobFiles(config, self.inbox, self.metrics, self.finisher.release, HOLD_UP_TO_BYTES)
        self.status_writer = StatusWriter(self.inbox.write_status)
        self._status_lock = threading.Lock()

    # -- signals --------------------------------------------------------------------------

    def _on_signal(self, signum, frame) -> None:
        self.stop_requests += 1
        if self._stop_requested_at is None:
            self._stop_requested_at = time.monotonic()  # the stop timeout counts from here
        # A second signal gets the default action: the process ends at once.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        self.waker.attach_signals()

    @property
    def stopping(self) -> bool:
        return self.stop_requests > 0

    # -- status ---------------------------------------------------------------------------

    def _set_status(self, state: str, job: dict | None = None, **extra) -> None:
        """Replace the status (the engine's thread and the finisher's both report here); the
        status writer's thread writes it to the file."""
        with self._status_lock:
            if self._blocked is not None and state == "idle":
                state, extra = "blocked", {**extra, "error": self._blocked}
            self._status = {
                "pid": os.getpid(),
                "version": __version__,
                "state": state,
                # Not ready while a configured model failed to load: its jobs fail until fixed.
                "ready": state in ("idle", "running") and not (self.engines and self.engines.failed),
                "engines": sorted(self.engines.engines) if self.engines else [],
                "unavailable": dict(self.engines.missing) if self.engines else {},
                "job": dict(job) if job else None,  # a copy: the engine's thread updates its own
                "jobs_done": self.jobs_done,
                "updated_at": now_iso(),
                **extra,
            }
            self.status_writer.put(self._status)
            for listener in self.status_listeners:
                listener(self._status)

    # -- the loop -------------------------------------------------------------------------

    def run(self) -> int:
        """Serve the inbox until stopped; returns the process exit status."""
        self.install_signal_handlers()
        self.inbox.ensure()
        self.inbox.lock()
        observer = bridge = None
        try:
            bridge = self._start_bridge()
            self._set_status("loading")
            requeued, poisoned = self.inbox.recover(MAX_ATTEMPTS)
            if requeued:
                log.info("requeued %d job(s) left in processing: %s", len(requeued), ", ".join(requeued))
            for path in poisoned:
                self.files.reject(path, JobError(
                    "worker_crashed", f"the worker stopped {MAX_ATTEMPTS} times while running this job"),
                    self.files.read_leniently(path))
            if self.engines is None:
                self.engines = build_engines(self.config)
            self.engines.load()
            self.metrics.model_load_seconds = dict(self.engines.load_seconds)
            self.metrics.sample_gpu()
            self.metrics.save()
            if self.stopping:
                return EXIT_OK
            observer = self._watch()
            self.finisher.start()
            self._set_status("idle")  # written at once, before READY=1 is sent
            self.status_writer.start()  # from here on, states are written by its thread
            engines = ", ".join(sorted(self.engines.engines)) or "none"
            if self.engines.failed:
                # Loading is over: the service is up and serves the other engines, but /ready says
                # 503 and systemd's status line names what failed, until the model is fixed.
                failed = ", ".join(sorted(self.engines.failed))
                log.error("worker started without %s: its jobs fail until the model is fixed", failed)
                notify(f"READY=1\nSTATUS=degraded: {failed} failed to load; engines {engines}")
            else:
                log.info("worker ready: inbox %s, outputs %s", self.inbox.root, self.inbox.outputs)
                notify(f"READY=1\nSTATUS=ready: engines {engines}")
            return self._loop()
        finally:
            notify("STOPPING=1")
            self.finisher.close()
            if observer is not None:
                observer.stop()
                observer.join(timeout=5)
            self.status_writer.close()
            self._set_status("stopped")
            if bridge is not None:
                bridge.stop()
            self.inbox.unlock()
            self.waker.close()

    def _start_bridge(self):
        """The MQTT bridge, when configured: it feeds this inbox and reports this worker from its
        own threads, and the loop never waits for the broker."""
        if not self.config.mqtt.enabled:
            return None
        from .mqtt import MqttBridge

        bridge = MqttBridge(self.config, self.inbox)
        self.status_listeners.append(bridge.on_status)
        self.finish_listeners.append(bridge.on_finished)
        bridge.start()
        return bridge

    def _watch(self):
        observer = PollingObserver(timeout=1.0) if self.config.inbox.polling else Observer()
        watch(observer, InboxEvents(self.inbox.root, self.waker), self.inbox.root, recursive=False)
        observer.daemon = True
        observer.start()
        return observer

    def _loop(self) -> int:
        interval = self.config.inbox.scan_interval
        while not self.stopping:
            try:
                ran = self.run_pending()
            except StopNow:
                log.warning("stop timeout passed; the job in hand will run again at the next start")
                return EXIT_STOP_TIMEOUT
            self.upkeep.run(self.engines)
            if not ran and not self.stopping:
                self._settle_status()
                self.waker.wait(interval)
        log.info("stop requested: worker exits after %d job(s)", self.jobs_done)
        return EXIT_OK

    def _settle_status(self) -> None:
        """Before the loop sleeps: a status still showing the last job becomes "idle"."""
        with self._status_lock:
            running = self._status.get("state") == "running"
        if running:
            self._set_status("idle")

    def run_pending(self) -> int:
        """Run every job that is ready now, oldest first; returns how many ran."""
        if self._blocked is not None and not self._unblocked():
            return 0
        ran = 0
        try:
            for entry in self.inbox.scan():
                if self.stopping or self._blocked is not None:
                    break
                if self._process(entry.name, entry.mtime):
                    ran += 1
                    self.upkeep.run(self.engines)  # a long queue must not put off idle unloading or retention
        finally:
            self.finisher.release()  # the last job of the batch (see _run)
        return ran

    def _process(self, name: str, mtime: float) -> bool:
        if self.finisher.busy(name) or not self.files.ready(name, mtime):
            return False  # a copy of a job still being finished waits for it to be done
        path = self.inbox.claim(name)
        if path is None:
            return False
        self.files.taken(name)
        queued_s = max(0.0, time.time() - mtime)
        stem = name[: -len(".json")]
        data = None
        try:
            data = self.files.read(path)
            job = parse_job(data, self.config.limits, default_id=stem)
        except JobError as exc:
            self.files.reject(path, exc, data)
            return True
        if job.id in self._finishing:
            self.finisher.drain()  # a copy of this job under another file name: its record first
        if self.inbox.completion(job.id) is not None:
            log.info("job %s already has a completion record: duplicate dropped", job.id)
            self.inbox.discard(path)
            return True
        self._run(job, path, queued_s)
        return True

    def _resolve_seed(self, job: Job, path: Path) -> tuple[Job, int | None]:
        """Draw the seed of a job that has none, and keep it in the job file so that a rerun after
        a crash makes the same image. Every generate job answers with a seed, as the API promises;
        the lama eraser is deterministic and ignores it."""
        if job.type != "generate":
            return job, None
        if job.spec.seed is not None:
            return job, job.spec.seed
        seed = draw_seed()
        spec = job.spec.model_copy(update={"seed": seed})
        write_atomic(path, spec_json(spec))
        return Job(spec, job.image, job.mask), seed

    def _run(self, job: Job, path: Path, queued_s: float) -> None:
        """Run the job on its engine, then hand it to the finisher (which writes its results while
        the engine moves on to the next job)."""
        started = time.monotonic()
        job, seed = self._resolve_seed(job, path)
        progress = {"id": job.id, "type": job.type, "engine": job.engine, "step": 0, "total": None,
                    "started_at": now_iso()}
        self._set_status("running", progress)

        def on_progress(step: int, total: int) -> None:
            progress.update(step=step, total=total)
            self._set_status("running", progress)
            self._check_stop()

        result = None
        self.finisher.release()  # the previous job is finished while this one runs
        try:
            engine = self.engines.get(job.engine)
            result = engine.run(job, RunContext(seed=seed, progress=on_progress))
            run_s = time.monotonic() - started
            record = done_record(
                job, seed=seed if result.seed is None else result.seed,
                width=result.image.width, height=result.image.height,
                timings={"queued_s": queued_s, "run_s": run_s, "total_s": queued_s + run_s},
            )
        except StopNow:
            # A deliberate stop, not a crash: the job goes back to the head of the queue without
            # counting as an attempt (three crashes fail a job; three restarts must not).
            self.inbox.requeue(path)
            raise
        except JobError as exc:
            record = failed_record(job.id, exc, job.type)
        except Exception as exc:
            record = failed_record(job.id, self._internal_error(job, exc), job.type)
        # Held back until the next job starts, or the batch ends: the finishing work would slow the
        # way to the next job (see Finisher.hold).
        self._finishing.add(job.id)
        run_s = record.get("timings", {}).get("run_s", time.monotonic() - started)
        self.finisher.hold(path.name, _Finished(job, path, record, result, started, progress["step"] or None, run_s))
        # The status says "running" until the next job replaces it, or the loop finds the queue
        # empty and says "idle" (see _settle_status): one write fewer per job in a busy queue.

    def _pixel_settings(self) -> dict[str, bool] | None:
        """The FLUX engine's settings that change pixels, as applied (None before it exists)."""
        flux = self.engines.engines.get("flux") if self.engines else None
        return getattr(flux, "pixel_settings", None)

    def _finish(self, done: "_Finished") -> None:
        """On the finisher's thread: the image (encoded here), then the completion record, then
        the job file goes. When outputs/ cannot take them, the job goes back to the queue."""
        job, record = done.job, done.record
        png = None
        try:
            if done.result is not None:
                text = job_parameters(job, done.result.seed, done.result.image.size,
                                      model=self.config.models.flux, settings=self._pixel_settings())
                png = png_bytes(done.result.image, text, self.config.worker.png_compression)
                self.inbox.write_output(job.output_name, png)
            self.inbox.finish(done.path, record)
        except OSError as exc:
            self._block(job, done.path, exc, len(png or b"") + 4096)
            return
        finally:
            self._finishing.discard(job.id)
        self.jobs_done += 1
        elapsed = time.monotonic() - done.started
        self.metrics.model_load_seconds = dict(self.engines.load_seconds)
        self.metrics.record(job_type=job.type, engine=job.engine, transport=job.spec.transport,
                            outcome=record["status"], run_s=done.run_s, steps=done.steps)
        self.metrics.save()
        for listener in self.finish_listeners:
            listener(record)
        transport = job.spec.transport
        if record["status"] == "done":
            log.info("job %s type=%s engine=%s done in %.3fs transport=%s url=%s", job.id, job.type, job.engine,
                     elapsed, transport, record["url"])
        else:
            err = record["error"]
            log.warning("job %s type=%s engine=%s failed in %.3fs transport=%s: %s [%s]", job.id, job.type,
                        job.engine, elapsed, transport, err["message"], err["code"])

    def _block(self, job: Job, path: Path, exc: OSError, size: int) -> None:
        """outputs/ cannot take this job's results (full, read-only, gone): the job goes back to the
        head of the queue, and no job runs until outputs/ can take them again."""
        self._blocked = {  # set first: the engine's thread must not claim the job again meanwhile
            "code": "outputs_unwritable",
            "message": f"cannot write to {self.inbox.outputs}: {exc.strerror or exc}; jobs wait in the "
                       "inbox until it can be written again",
            "since": now_iso(),
            "bytes": size,
        }
        self.inbox.requeue(path)
        log.error("job %s put back in the queue: %s", job.id, self._blocked["message"])
        self._set_status("idle")

    def _unblocked(self) -> bool:
        """Check outputs/ again (the loop calls this every scan interval while blocked)."""
        try:
            self.inbox.outputs.mkdir(parents=True, exist_ok=True)  # in case it was removed
        except OSError:
            pass
        if not self.inbox.outputs_writable(self._blocked["bytes"]):
            return False
        log.info("outputs %s can be written again: jobs resume", self.inbox.outputs)
        self._blocked = None
        self._set_status("idle")
        return True

    def _internal_error(self, job: Job, exc: Exception) -> JobError:
        """A bug: logged with its traceback; the job fails and the worker goes on. (Engines turn
        GPU out-of-memory errors into ``out_of_memory`` job errors themselves.)"""
        log.exception("job %s failed with an unexpected error", job.id)
        return JobError("internal_error", f"unexpected error: {type(exc).__name__}: {exc}")

    def _check_stop(self) -> None:
        if not self.stopping:
            return
        if not self._stop_logged:
            self._stop_logged = True
            log.info("stop requested: finishing the job in hand (at most %.0fs)", self.config.worker.stop_timeout)
        if time.monotonic() > (self._stop_requested_at or 0.0) + self.config.worker.stop_timeout:
            raise StopNow()


def run_worker(config: Config) -> int:
    """Entry point of ``fluxworker worker``."""
    from .preflight import preflight

    errors = preflight(config).errors
    for line in errors:
        log.error("cannot start: %s", line)
    if errors:
        return 2
    try:
        return Worker(config).run()
    except WorkerBusy as exc:
        log.error("%s", exc)
        return 2
