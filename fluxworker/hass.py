"""Home Assistant MQTT discovery: one device per worker with the entities that drive and show it.

Entities: an ``image`` with the latest generated image, a ``text`` holding the prompt, a ``button``
that generates from it, and ``sensor`` entities for the worker's state, its queue length, the last
seed and the last error. Each is announced on ``<hass_prefix>/<component>/<node>/<object>/config``
(retained), with the worker's availability topic, so Home Assistant greys them out while the worker
is offline. The sensors read the worker's retained JSON state topic through value templates.
"""

from __future__ import annotations

import re
from pathlib import Path

from .config import MqttConfig
from .errors import JobError
from .inbox import write_atomic
from .mqtt_topics import Topics

TEXT_MAX = 255  # the longest state Home Assistant's text entity accepts


def node_id(client_id: str) -> str:
    """The client id reduced to what a discovery topic level allows."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", client_id)


def _sensor(name: str, key: str, icon: str, **extra) -> tuple[str, str, dict]:
    return "sensor", key, {
        "name": name,
        "icon": icon,
        "value_template": "{{ value_json.%s }}" % key,
        **extra,
    }


def discovery_messages(cfg: MqttConfig, topics: Topics, client_id: str, version: str) -> list[tuple[str, dict]]:
    """``(topic, payload)`` for every entity of this worker's device."""
    node = node_id(client_id)
    device = {
        "identifiers": [node],
        "name": cfg.hass_device_name,
        "manufacturer": "fluxworker",
        "model": "FLUX.1-schnell image worker",
        "sw_version": version,
    }
    if cfg.public_base_url:
        device["configuration_url"] = cfg.public_base_url
        image = {"url_topic": topics.image_url}
    else:
        # Without a URL Home Assistant can reach, the image travels in the message itself.
        image = {"image_topic": topics.image, "content_type": "image/png"}
    entities = [
        ("image", "image", {"name": "Latest image", "icon": "mdi:image", **image}),
        ("text", "prompt", {
            "name": "Prompt", "icon": "mdi:text-box-edit", "command_topic": topics.prompt_set,
            "state_topic": topics.prompt, "min": 0, "max": TEXT_MAX, "mode": "text",
        }),
        ("button", "generate", {
            "name": "Generate", "icon": "mdi:creation", "command_topic": topics.generate, "payload_press": "PRESS",
        }),
        _sensor("State", "state", "mdi:state-machine"),
        _sensor("Queue", "queue", "mdi:tray-full", unit_of_measurement="jobs", state_class="measurement"),
        _sensor("Last seed", "last_seed", "mdi:dice-multiple"),
        _sensor("Last error", "last_error", "mdi:alert-circle-outline", entity_category="diagnostic"),
    ]
    messages = []
    for component, key, fields in entities:
        payload = {
            **fields,
            "unique_id": f"{node}_{key}",
            "availability_topic": topics.availability,
            "payload_available": "online",
            "payload_not_available": "offline",
            "qos": 1,
            "device": device,
            "origin": {"name": "fluxworker", "sw_version": version},
        }
        if component == "sensor":
            payload["state_topic"] = topics.state
        messages.append((f"{cfg.hass_prefix}/{component}/{node}/{key}/config", payload))
    return messages


class Prompt:
    """The prompt of the text entity, kept in a file so that it outlives restarts."""

    def __init__(self, path: Path, max_length: int):
        self.path = Path(path)
        self.max_length = max_length
        try:
            self.text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            self.text = ""

    def set(self, payload: bytes) -> str:
        """Store a new prompt; a payload that cannot be one raises ``JobError``."""
        try:
            text = payload.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise JobError("invalid_value", "prompt: not UTF-8 text", "prompt") from None
        if len(text) > self.max_length:
            why = " (Home Assistant's text entity holds no more)" if self.max_length == TEXT_MAX else ""
            raise JobError("invalid_length", f"prompt: {len(text)} characters is longer than {self.max_length}{why}",
                           "prompt")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(self.path, text.encode())
        self.text = text
        return text

    def job(self, fields: dict) -> dict:
        """The Generate button's job: the configured fields, with this prompt when there is one."""
        return {**fields, "prompt": self.text} if self.text else dict(fields)
