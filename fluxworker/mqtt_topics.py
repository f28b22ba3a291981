"""The MQTT topics of one worker, the client it connects with, and what it last made."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho

from .config import ConfigError, MqttConfig
from .credentials import read_secret
from .inbox import is_job_name, read_json
from .preflight import missing_tls_files

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Topics:
    """Every topic the bridge uses.

    Job topics live under the prefix and are shared by all workers on it; availability, state and
    the Home Assistant entities belong to one worker, under ``<prefix>/workers/<worker_id>`` when a
    worker id is set, else under the prefix itself.
    """

    prefix: str
    base: str
    jobs_subscription: str
    hass_status: str

    @classmethod
    def from_config(cls, cfg: MqttConfig) -> "Topics":
        base = f"{cfg.topic_prefix}/workers/{cfg.worker_id}" if cfg.worker_id else cfg.topic_prefix
        jobs = f"{cfg.topic_prefix}/jobs"
        subscription = f"$share/{cfg.share_group}/{jobs}" if cfg.share_group else jobs
        return cls(cfg.topic_prefix, base, subscription, f"{cfg.hass_prefix}/status")

    @property
    def jobs(self) -> str:
        return f"{self.prefix}/jobs"

    def job(self, job_id: str, leaf: str) -> str:
        """``<prefix>/jobs/<id>/<leaf>``: ``status``, ``result`` or ``image``."""
        return f"{self.prefix}/jobs/{job_id}/{leaf}"

    @property
    def errors(self) -> str:
        return f"{self.prefix}/errors"

    @property
    def availability(self) -> str:
        return f"{self.base}/status"

    @property
    def state(self) -> str:
        return f"{self.base}/state"

    @property
    def image_url(self) -> str:
        return f"{self.base}/image/url"

    @property
    def image(self) -> str:
        return f"{self.base}/image"

    @property
    def prompt(self) -> str:
        return f"{self.base}/prompt"

    @property
    def prompt_set(self) -> str:
        return f"{self.base}/prompt/set"

    @property
    def generate(self) -> str:
        return f"{self.base}/generate"


def default_client_id(inbox_root: Path) -> str:
    """A client id stable across restarts (the broker keeps the session under it) and distinct for
    every inbox (two workers on one machine serve two inboxes)."""
    host = re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname())[:40] or "host"
    digest = hashlib.sha256(os.fsencode(Path(inbox_root).resolve())).hexdigest()[:8]
    return f"fluxworker-{host}-{digest}"


def read_password(cfg: MqttConfig) -> str | None:
    """The broker password: the environment variable named by ``password_env``, else the systemd
    credential ``password_credential``, else none."""
    return read_secret(cfg.password_credential, cfg.password_env)


def _no_delay(client, userdata, sock) -> None:
    """Send small packets at once: with Nagle's algorithm a result published right after its status
    waits for the broker's delayed acknowledgement, about 40 ms."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (OSError, AttributeError):
        pass  # not a TCP socket


def make_client(cfg: MqttConfig, client_id: str, topics: Topics) -> paho.Client:
    """A paho client (VERSION2 callbacks, manual acknowledgements, a persistent session) with the
    retained last will, the credentials and TLS of ``cfg``; the caller adds its own callbacks."""
    version = paho.CallbackAPIVersion.VERSION2
    if cfg.protocol == "v5":
        client = paho.Client(version, client_id=client_id, protocol=paho.MQTTv5, manual_ack=True)
    else:
        client = paho.Client(version, client_id=client_id, clean_session=False, protocol=paho.MQTTv311,
                             manual_ack=True)
    client.on_connect_fail = lambda c, u: log.warning(
        "mqtt: cannot reach %s:%d; trying again (at most every %ds)", cfg.host, cfg.port, cfg.reconnect_max_delay)
    client.on_socket_open = _no_delay
    client.reconnect_delay_set(cfg.reconnect_min_delay, cfg.reconnect_max_delay)
    client.will_set(topics.availability, "offline", qos=1, retain=True)
    if cfg.username:
        client.username_pw_set(cfg.username, read_password(cfg))
    if cfg.tls:
        missing = missing_tls_files(cfg)
        if missing:
            raise ConfigError(missing[0])
        try:
            client.tls_set(ca_certs=cfg.ca_file and str(cfg.ca_file), certfile=cfg.cert_file and str(cfg.cert_file),
                           keyfile=cfg.key_file and str(cfg.key_file))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"mqtt: cannot use the TLS files: {exc}") from None
        client.tls_insecure_set(cfg.tls_insecure)
    return client


class LastResults:
    """The last seed, error and image (its URL and file name), for the retained state and Home
    Assistant's entities."""

    def __init__(self, public_url):
        self.public_url = public_url  # turns a record's /outputs/... into what clients can fetch
        self.seed: int | None = None
        self.error: str | None = None
        self.image: str | None = None
        self.file: str | None = None

    def recall(self, outputs: Path, newest: int = 50) -> None:
        """Start from the newest completion records on disk."""
        try:
            entries = [e for e in os.scandir(outputs) if is_job_name(e.name)]
            entries.sort(key=lambda e: e.stat().st_mtime, reverse=True)
        except OSError:
            return
        for entry in entries[:newest]:
            record = read_json(Path(outputs) / entry.name)
            if isinstance(record, dict):
                self.remember(record, only_missing=True)

    def remember(self, record: dict[str, Any], only_missing: bool = False) -> None:
        if record.get("status") == "done":
            updates = {"seed": record.get("seed"), "image": self.public_url(record.get("url")),
                       "file": record.get("file")}
        elif record.get("status") == "failed":
            updates = {"error": str((record.get("error") or {}).get("message", ""))[:255]}
        else:
            return
        for key, value in updates.items():
            if not only_missing or getattr(self, key) is None:
                setattr(self, key, value)
