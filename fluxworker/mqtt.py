"""The MQTT bridge: jobs in through a shared subscription; status, results and availability out.

It runs inside the worker process, beside the inbox loop, and only translates: a job message
becomes an inbox file (:mod:`.mqtt_intake`, the same job model and validation), and the worker's
status and completion records become messages. The worker serves the inbox whether or not a broker
is reachable; paho reconnects with backoff, and every subscription is made again in ``on_connect``
(a broker may forget shared subscriptions when it restarts).

Threads: paho's network thread only queues events; one bridge thread takes jobs in, acknowledges
them and publishes, so the bridge's state has one owner and paho's locks never meet ours.

Results go out at least once: when the job finishes, and again after a reconnection or a restart
for every owed result the broker had not acknowledged (:mod:`.mqtt_delivery`). Jobs from the inbox
or HTTP that finish while the broker is unreachable are reported at the next connection.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from . import __version__
from .config import Config
from .errors import JobError
from .hass import TEXT_MAX, Prompt, discovery_messages
from .inbox import Inbox
from .jobs import failed_record, is_valid_id
from .metrics import SNAPSHOT_NAME, JobMetrics
from .mqtt_delivery import Deliveries, read_image
from .mqtt_intake import Intake, Outcome, Owed
from .mqtt_topics import LastResults, Topics, default_client_id, make_client

log = logging.getLogger(__name__)

SWEEP_SECONDS = 5.0  # how often owed results are looked for, besides the events that announce them
STATE_MIN_INTERVAL = 0.5  # the retained state changes at most this often (a burst of jobs is one update)
STOP_SECONDS = 5.0  # on stop, how long the broker may take to acknowledge what is in flight
PACKET_OVERHEAD = 512  # fixed header, topic and properties, on top of the payload


class MqttBridge:
    """One MQTT client that feeds the inbox and reports the worker."""

    def __init__(self, config: Config, inbox: Inbox):
        self.config = config
        self.cfg = config.mqtt
        self.inbox = inbox
        self.v5 = self.cfg.protocol == "v5"
        self.topics = Topics.from_config(self.cfg)
        self.intake = Intake(inbox, config.limits, self.v5)
        self.pending = self.intake.pending
        self.client_id = self.cfg.client_id or default_client_id(inbox.root)
        self.max_bytes = self.cfg.max_publish_bytes
        # Home Assistant's text entity holds at most 255 characters (it rejects a longer state).
        self.prompt = Prompt(inbox.root / "mqtt" / "prompt.txt", min(config.limits.max_prompt_length, TEXT_MAX))
        self.last = LastResults(self._public_url)
        self.deliveries = Deliveries(inbox, self.pending)
        self.refusals = JobMetrics(inbox.root / "mqtt" / SNAPSHOT_NAME)  # merged with the worker's by the API
        self._image_owed = True  # the retained image may be older than the latest one (Home Assistant)
        self._events: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._worker_state = "loading"
        self._running: dict | None = None
        self._state_dirty = False
        self._state_sent_at = 0.0
        self.client = self._make_client()

    def _make_client(self) -> paho.Client:
        client = make_client(self.cfg, self.client_id, self.topics)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_message = lambda c, u, msg: self._events.put(("message", msg))
        client.on_publish = lambda c, u, mid, rc, props: self._events.put(("published", mid))
        return client

    # -- life cycle (the worker's thread) ----------------------------------------------------

    def start(self) -> None:
        """Connect in the background; the worker does not wait for the broker."""
        self.intake.start()
        self.last.recall(self.inbox.outputs)
        kwargs: dict[str, Any] = {}
        if self.v5:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = self.cfg.session_expiry
            kwargs = {"clean_start": False, "properties": props}
        log.info("mqtt: connecting to %s:%d as %s (%s)", self.cfg.host, self.cfg.port, self.client_id,
                 self.cfg.protocol)
        self.client.connect_async(self.cfg.host, self.cfg.port, self.cfg.keepalive, **kwargs)
        self._thread = threading.Thread(target=self._run, name="mqtt-bridge", daemon=True)
        self._thread.start()
        self.client.loop_start()

    def stop(self) -> None:
        """Publish ``offline`` (a clean disconnection sends no will), let what is in flight land, and
        disconnect. Owed results that did not land go out at the next start."""
        if self._thread is None:
            return
        self._events.put(("stop", None))
        self._thread.join(timeout=STOP_SECONDS + 5)
        self.client.loop_stop()
        self._thread = None

    def on_finished(self, record: dict) -> None:
        """A job's completion record was written (called from the worker's finishing thread)."""
        self._events.put(("finished", record["id"]))

    def on_status(self, status: dict) -> None:
        """The worker's status changed or its job made progress (called from the worker's thread)."""
        job = status.get("job")
        self._events.put(("status", {**status, "job": dict(job) if job else None}))

    # -- paho callbacks (network thread) ----------------------------------------------------

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.error("mqtt: the broker refused the connection: %s", reason_code)
            return
        topics = [self.topics.jobs_subscription]
        if self.cfg.hass_discovery:
            topics += [self.topics.hass_status, self.topics.prompt_set, self.topics.generate]
        client.subscribe([(topic, 1) for topic in topics])
        client.publish(self.topics.availability, "online", qos=1, retain=True)
        self._events.put(("connected", getattr(properties, "MaximumPacketSize", None)))
        log.info("mqtt: connected to %s:%d (session present: %s)", self.cfg.host, self.cfg.port,
                 flags.session_present)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.value != 0:
            log.warning("mqtt: disconnected (%s); reconnecting", reason_code)

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        for code in reason_codes:
            if code.is_failure:
                log.error("mqtt: the broker refused a subscription: %s", code)

    # -- the bridge thread ------------------------------------------------------------------

    def _run(self) -> None:
        next_sweep = time.monotonic() + SWEEP_SECONDS
        stop_by = None
        while stop_by is None or (time.monotonic() < stop_by and self.deliveries.inflight
                                  and self.client.is_connected()):
            wait = next_sweep - time.monotonic()
            if stop_by is not None:
                wait = min(wait, stop_by - time.monotonic())
            if self._state_dirty:
                wait = min(wait, self._state_sent_at + STATE_MIN_INTERVAL - time.monotonic())
            try:
                kind, value = self._events.get(timeout=max(0.0, wait))
            except queue.Empty:
                kind = value = None
            try:
                if kind == "stop":
                    stop_by = time.monotonic() + STOP_SECONDS
                    self._worker_state = "stopped"
                    self._publish_state()
                    self._publish(self.topics.availability, b"offline", retain=True, qos=1, track=True)
                elif kind is not None:
                    self._handle(kind, value)
                if self._state_dirty and time.monotonic() >= self._state_sent_at + STATE_MIN_INTERVAL:
                    self._publish_state()
                if time.monotonic() >= next_sweep:
                    next_sweep = time.monotonic() + SWEEP_SECONDS
                    self._sweep()
            except Exception:  # the bridge must never take the worker down
                log.exception("mqtt: unexpected error while handling %s", kind)
        self.client.disconnect()

    def _handle(self, kind: str, value: Any) -> None:
        if kind == "message":
            self._on_message(value)
        elif kind == "published":
            self.deliveries.acknowledged(value)
        elif kind == "status":
            self._on_worker_status(value)
        elif kind == "finished":
            self._finished(value)
        elif kind == "connected":
            if value:
                self.max_bytes = min(self.cfg.max_publish_bytes, int(value))
            if self.cfg.qos == 0:  # QoS 0 messages unsent at a disconnection are gone: send them again
                self.deliveries.forget_unsent()
            self._announce()
            self._publish_image()
            self._sweep()

    # -- messages out -----------------------------------------------------------------------

    def _publish(self, topic: str, payload: bytes | dict, *, retain: bool = False, qos: int | None = None,
                 reply: Owed | None = None, owed: Owed | None = None, track: bool = False) -> None:
        """Publish one message after checking its size. With ``owed``, the broker's acknowledgement
        counts towards settling that request; with ``track``, stopping waits for it."""
        data = json.dumps(payload).encode() if isinstance(payload, dict) else payload
        if len(data) + len(topic) + PACKET_OVERHEAD > self.max_bytes:
            # paho would resend an oversized packet at every reconnection, forever
            log.warning("mqtt: %s not published: %d bytes is over the limit of %d", topic, len(data), self.max_bytes)
            if topic != self.topics.errors:
                error = JobError("message_too_large", f"{topic}: {len(data)} bytes is over the limit of "
                                 f"{self.max_bytes} (mqtt.max_publish_bytes or the broker's maximum packet size)")
                self._publish(self.topics.errors, failed_record(owed.id if owed else None, error))  # type: ignore[arg-type]
            return
        qos = self.cfg.qos if qos is None else qos
        props = None
        if self.v5:
            props = Properties(PacketTypes.PUBLISH)
            props.ContentType = "application/json" if isinstance(payload, dict) else (
                "image/png" if data.startswith(b"\x89PNG") else "text/plain")
            if reply is not None and reply.correlation_data is not None:
                props.CorrelationData = reply.correlation_data
        try:
            info = self.client.publish(topic, data, qos=qos, retain=retain, properties=props)
        except ValueError as exc:  # a response topic with wildcards, say
            log.warning("mqtt: cannot publish to %r: %s", topic, exc)
            return
        # Not connected: paho keeps QoS 1 and 2 messages and sends them after reconnecting.
        if info.rc != paho.MQTT_ERR_SUCCESS and not (info.rc == paho.MQTT_ERR_NO_CONN and qos > 0):
            return
        if owed is not None or track:
            self.deliveries.track(info.mid, owed)

    def _public_url(self, url: Any) -> Any:
        """``/outputs/...`` as clients can fetch it: absolute when a public base is set."""
        if self.cfg.public_base_url and isinstance(url, str) and url.startswith("/"):
            return self.cfg.public_base_url + url
        return url

    def _public(self, record: dict) -> dict:
        """The completion record as clients get it."""
        return {**record, "url": self._public_url(record["url"])} if "url" in record else record

    def _publish_results(self, job_id: str) -> None:
        """Status, result (and image) of a finished job, and the reply to its requester. An owed
        result is delivered once the broker has acknowledged every one of these messages."""
        if not self.client.is_connected() or self.deliveries.on_way(job_id):
            return  # the sweep at the next connection sends them; or they are on their way
        record = self.inbox.completion(job_id)
        self.deliveries.sent(job_id)
        if record is None:
            return
        owed = self.pending.get(job_id)
        out = self._public(record)
        self._publish(self.topics.job(job_id, "status"), out, owed=owed)
        self._publish(self.topics.job(job_id, "result"), out, owed=owed)
        if owed is not None and owed.response_topic:
            self._publish(owed.response_topic, out, reply=owed, owed=owed)
        if self.cfg.publish_image and record.get("status") == "done":
            png = read_image(self.inbox, record)
            if png is not None:
                self._publish(self.topics.job(job_id, "image"), png, owed=owed)
        if owed is not None and not self.deliveries.on_way(job_id):
            self.pending.settle(owed)  # none of them could be sent (too large): nothing is owed any more

    def _sweep(self) -> None:
        """Send every owed result whose job has finished and that is not on its way already."""
        if not self.client.is_connected():
            return
        for job_id in self.deliveries.due():
            self._publish_results(job_id)

    # -- the worker's state, and Home Assistant -----------------------------------------------

    def _on_worker_status(self, status: dict) -> None:
        job = status.get("job") if status.get("state") == "running" else None
        if self._running and (job is None or job.get("id") != self._running["id"]):
            self._running = None  # its results go out once its record is written (on_finished)
        if job and is_valid_id(job.get("id")):
            first = self._running is None
            self._state_dirty |= first
            self._running = job
            if first and self.client.is_connected() and self.pending.get(job["id"]) is None:
                # A job from the inbox or HTTP: the bridge learns of it only now. MQTT jobs had
                # their queued status when they were taken in.
                self._publish(self.topics.job(job["id"], "status"), {"id": job["id"], "status": "queued"})
            if self.client.is_connected():  # progress is worth nothing late: never kept for a reconnection
                self._publish(self.topics.job(job["id"], "status"), {
                    "id": job["id"], "status": "running", "step": job.get("step", 0), "total": job.get("total"),
                })
        if status.get("state") and status["state"] != self._worker_state:
            self._worker_state = status["state"]
            self._state_dirty = True

    def _finished(self, job_id: str) -> None:
        record = self.inbox.completion(job_id)
        if record is None:
            return  # stopped mid-job: it runs again at the next start
        self.last.remember(record)
        self._state_dirty = True
        if not self.client.is_connected():
            self.deliveries.miss(job_id)  # reported at the next connection
        self._publish_results(job_id)
        if record.get("status") == "done":
            self._image_owed = True
            if self.client.is_connected():
                self._publish(self.topics.image_url, str(self.last.image).encode(), retain=True, qos=1)
                self._publish_image()

    def _publish_image(self) -> None:
        """The latest image as a retained PNG, for Home Assistant's image entity when it has no URL
        to fetch; again after a reconnection when a job finished while the broker was away."""
        if not (self._image_owed and self.cfg.hass_discovery and not self.cfg.public_base_url):
            return
        if not self.client.is_connected() or not self.last.file:
            return
        png = read_image(self.inbox, {"file": self.last.file})
        if png is not None:
            self._publish(self.topics.image, png, retain=True, qos=1)
        self._image_owed = False

    def _publish_state(self) -> None:
        self._state_dirty = False
        self._state_sent_at = time.monotonic()
        if not self.client.is_connected():
            return  # sent at the next connection
        job = self._running
        self._publish(self.topics.state, {
            "state": self._worker_state,
            "queue": len(self.inbox.scan()),
            "job": {key: job.get(key) for key in ("id", "type", "step", "total")} if job else None,
            "last_seed": self.last.seed,
            "last_error": self.last.error,
            "last_image": self.last.image,
            "client_id": self.client_id,
            "version": __version__,
        }, retain=True)

    def _announce(self) -> None:
        """What a newcomer (or Home Assistant after its restart) needs: discovery and retained state."""
        if self.cfg.hass_discovery:
            for topic, payload in discovery_messages(self.cfg, self.topics, self.client_id, __version__):
                self._publish(topic, payload, retain=True, qos=1)
            self._publish(self.topics.prompt, self.prompt.text.encode(), retain=True, qos=1)
        if self.last.image:
            self._publish(self.topics.image_url, str(self.last.image).encode(), retain=True, qos=1)
        self._publish_state()

    # -- messages in ------------------------------------------------------------------------

    def _on_message(self, msg: paho.MQTTMessage) -> None:
        """Handle one message, then acknowledge it: a job only once it is durably in the inbox."""
        try:
            if msg.topic == self.topics.jobs:
                self._took(self.intake.take(msg), msg.topic)
            elif msg.topic == self.topics.hass_status:
                if msg.payload == b"online":
                    self._announce()
            elif msg.topic == self.topics.prompt_set:
                try:
                    self._publish(self.topics.prompt, self.prompt.set(msg.payload).encode(), retain=True, qos=1)
                except JobError as exc:
                    self._refuse(Outcome("refused", None, error=exc))
            elif msg.topic == self.topics.generate and not msg.retain:  # a retained press would repeat
                self._took(self.intake.take(msg, self.prompt.job(self.cfg.hass_job)), msg.topic)
        except OSError as exc:
            log.error("mqtt: cannot store a message from %s (%s); the broker delivers it again after the "
                      "next reconnection", msg.topic, exc)
            return
        except Exception as exc:  # a bug: refuse and acknowledge, or the message comes back at every reconnection
            log.exception("mqtt: unexpected error while handling a message on %s; it is refused", msg.topic)
            self._refuse(Outcome("refused", None, error=JobError(
                "internal_error", f"the worker could not handle this message ({type(exc).__name__}); "
                "see the worker's log")))
        self.client.ack(msg.mid, msg.qos)

    def _took(self, outcome: Outcome, topic: str) -> None:
        job_id = outcome.job_id
        if outcome.kind == "refused":
            log.warning("mqtt: refused a message on %s%s: %s [%s]", topic, f" (job {job_id})" if job_id else "",
                        outcome.error.message, outcome.error.code)
            self._refuse(outcome)
        elif outcome.kind == "queued":
            log.info("mqtt: job %s queued from %s", job_id, topic)
            self._publish(self.topics.job(job_id, "status"), {"id": job_id, "status": "queued"})
            self._state_dirty = True
        elif outcome.kind == "finished_before":
            log.info("mqtt: job %s has finished before: its result goes out again", job_id)
            self._publish_results(job_id)
        else:
            log.info("mqtt: job %s is queued already: duplicate dropped", job_id)

    def _refuse(self, outcome: Outcome) -> None:
        """A message that is not a valid job: the error on the errors topic, and where the sender
        listens (the job's topics when its id is known, the response topic when given)."""
        record = failed_record(outcome.job_id, outcome.error)  # type: ignore[arg-type]
        self.refusals.count_rejected("mqtt")
        self._publish(self.topics.errors, record)
        if outcome.job_id is not None:
            self._publish(self.topics.job(outcome.job_id, "status"), record)
            self._publish(self.topics.job(outcome.job_id, "result"), record)
        if outcome.reply is not None and outcome.reply.response_topic:
            self._publish(outcome.reply.response_topic, record, reply=outcome.reply)
        self.last.remember(record)
        self._state_dirty = True
