"""A real mosquitto per test, and a small MQTT client that records what it receives.

Each broker runs in the foreground (``mosquitto -c CONF``) on a free 127.0.0.1 port with its own
config and persistence folder; it can be killed and restarted on the same port. Nothing here talks
to a system broker.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Broker:
    """mosquitto with persistence (saved every second) in ``folder``."""

    def __init__(self, folder: Path, extra: str = ""):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.conf = self.folder / "mosquitto.conf"
        lines = [
            f"listener {self.port} 127.0.0.1",
            "allow_anonymous true",
            "persistence true",
            f"persistence_location {self.folder}/",
            "autosave_interval 1",
            "max_queued_messages 10000",
            "set_tcp_nodelay true",
            f"log_dest file {self.folder}/mosquitto.log",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
        ]
        if os.geteuid() == 0:
            lines.append("user root")  # as root, mosquitto otherwise drops to a user that cannot write here
        self.conf.write_text("\n".join(lines) + "\n" + extra)
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Broker":
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited with {self.proc.returncode}: {self.log()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.01)
        raise RuntimeError("mosquitto did not listen within 10 s")

    def kill(self) -> None:
        """SIGKILL: no goodbye, no final save."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        """SIGTERM: mosquitto saves its database and exits."""
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)

    def saved_at(self) -> float:
        """When the broker last saved its state (wall clock); 0 when never."""
        try:
            return (self.folder / "mosquitto.db").stat().st_mtime
        except FileNotFoundError:
            return 0.0

    def wait_saved(self, timeout: float = 10.0) -> None:
        """Wait for the broker's next save (with autosave_interval 1, mosquitto 2.0.11 saves every
        second or two), so that a SIGKILL after it keeps every session and message before it."""
        since = time.time()
        deadline = time.monotonic() + timeout
        while self.saved_at() <= since:
            if time.monotonic() > deadline:
                raise AssertionError(f"mosquitto did not save its state within {timeout}s")
            time.sleep(0.05)

    def log(self) -> str:
        try:
            return (self.folder / "mosquitto.log").read_text(errors="replace")
        except OSError:
            return ""


@dataclass
class Message:
    topic: str
    payload: bytes
    retain: bool
    correlation_data: bytes | None = None
    received_at: float = field(default_factory=time.monotonic)

    def json(self):
        return json.loads(self.payload)


class Probe:
    """A test client: subscribes to ``topics``, records every message, publishes and records the
    broker's reason code for each publication. ``session`` keeps a persistent session under that
    client id, so messages sent while it is away (or while the broker restarts) still arrive."""

    def __init__(self, broker: Broker, topics=("#",), session: str | None = None, v5: bool = True):
        self.broker = broker
        self.topics = list(topics)
        self.messages: list[Message] = []
        self.acks: dict[int, tuple[int, float]] = {}  # mid -> (reason code, wall-clock time)
        self._changed = threading.Condition()
        self._subscribed = threading.Event()
        protocol = paho.MQTTv5 if v5 else paho.MQTTv311
        kwargs = {} if v5 else {"clean_session": session is None}
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=session or "", protocol=protocol,
                                  **kwargs)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *args: self._subscribed.set()
        self.client.on_message = self._on_message
        self.client.on_publish = self._on_publish
        # Without TCP_NODELAY a publish right after an acknowledgement waits ~40 ms (Nagle's algorithm).
        self.client.on_socket_open = lambda client, userdata, sock: sock.setsockopt(
            socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.client.reconnect_delay_set(1, 1)
        connect_kwargs = {}
        if v5:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = 3600 if session else 0
            connect_kwargs = {"clean_start": session is None, "properties": props}
        self.client.connect_async("127.0.0.1", broker.port, 30, **connect_kwargs)
        self.client.loop_start()
        if self.topics:
            assert self._subscribed.wait(10), "the probe did not subscribe"
        else:
            deadline = time.monotonic() + 10
            while not self.client.is_connected() and time.monotonic() < deadline:
                time.sleep(0.01)

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        if not reason_code.is_failure and self.topics:
            client.subscribe([(topic, 1) for topic in self.topics])

    def _on_message(self, client, userdata, msg):
        correlation = getattr(msg.properties, "CorrelationData", None) if msg.properties else None
        with self._changed:
            self.messages.append(Message(msg.topic, msg.payload, bool(msg.retain), correlation))
            self._changed.notify_all()

    def _on_publish(self, client, userdata, mid, reason_code, properties):
        with self._changed:
            self.acks[mid] = (reason_code.value, time.time())
            self._changed.notify_all()

    def publish(self, topic: str, payload, qos: int = 1, retain: bool = False, response_topic: str | None = None,
                correlation_data: bytes | None = None, wait: bool = True) -> int:
        """Publish; returns the message id (``acks[mid]`` holds the broker's reason code)."""
        if isinstance(payload, dict):
            payload = json.dumps(payload)
        props = None
        if response_topic or correlation_data:
            props = Properties(PacketTypes.PUBLISH)
            if response_topic:
                props.ResponseTopic = response_topic
            if correlation_data:
                props.CorrelationData = correlation_data
        info = self.client.publish(topic, payload, qos=qos, retain=retain, properties=props)
        if wait:
            info.wait_for_publish(timeout=30)
        return info.mid

    def received(self, topic: str) -> list[Message]:
        """Messages on ``topic`` (``+`` matches one level)."""
        with self._changed:
            return [m for m in self.messages if paho.topic_matches_sub(topic, m.topic)]

    def payloads(self, topic: str) -> list:
        return [m.json() for m in self.received(topic)]

    def wait_for(self, predicate, timeout: float = 60.0, what: str = "a message"):
        """Wait until ``predicate(probe)`` returns something truthy; bounded in time."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                value = predicate(self)
                if value:
                    return value
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"timed out after {timeout}s waiting for {what}")
                self._changed.wait(min(remaining, 0.2))

    def wait_message(self, topic: str, predicate=lambda m: True, timeout: float = 60.0) -> Message:
        return self.wait_for(lambda p: next((m for m in p.received(topic) if predicate(m)), None), timeout,
                             what=f"a message on {topic}")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
