"""Home Assistant discovery payloads against the rules Home Assistant's MQTT integration applies.

The rules below restate what Home Assistant requires of a discovery message (its discovery topic
pattern, the device block, and each platform's required and exclusive options); they are checked
on the payloads the bridge builds, and on the ones it publishes (test_mqtt_worker.py).
"""

import json
import re

import pytest

from fluxworker.config import parse_config
from fluxworker.errors import JobError
from fluxworker.hass import TEXT_MAX, Prompt, discovery_messages
from fluxworker.mqtt_topics import Topics

# What follows the discovery prefix, as Home Assistant matches it.
TOPIC_RE = re.compile(r"(?P<component>\w+)/(?:(?P<node>[a-zA-Z0-9_-]+)/)?(?P<object>[a-zA-Z0-9_-]+)/config")
PLATFORMS = {"image", "text", "button", "sensor"}


def valid_publish_topic(topic) -> bool:
    return isinstance(topic, str) and bool(topic) and "+" not in topic and "#" not in topic and "\0" not in topic


def valid_subscribe_topic(topic) -> bool:
    if not isinstance(topic, str) or not topic or "\0" in topic:
        return False
    levels = topic.split("/")
    return all(level in ("+", "#") or ("+" not in level and "#" not in level) for level in levels) and (
        "#" not in levels[:-1])


def check_discovery(topic: str, raw: bytes | str, prefix: str = "homeassistant") -> dict:
    """Assert that one discovery message is one Home Assistant accepts; returns the payload."""
    assert topic.startswith(prefix + "/"), f"not under the discovery prefix: {topic}"
    match = TOPIC_RE.fullmatch(topic[len(prefix) + 1:])
    assert match, f"not a discovery topic: {topic}"
    component = match["component"]
    assert component in PLATFORMS, component
    payload = json.loads(raw)
    assert isinstance(payload, dict)
    assert isinstance(payload.get("unique_id"), str) and payload["unique_id"]
    device = payload["device"]
    assert device.get("identifiers") or device.get("connections"), "a device needs an identifier"
    assert all(isinstance(value, str) for value in device["identifiers"])
    for key in ("name", "manufacturer", "model", "sw_version"):
        assert isinstance(device.get(key, ""), str)
    assert valid_subscribe_topic(payload["availability_topic"])
    assert "availability" not in payload  # exclusive with availability_topic
    assert payload.get("qos", 0) in (0, 1, 2)
    if "origin" in payload:
        assert isinstance(payload["origin"].get("name"), str)
    if component == "sensor":
        assert valid_subscribe_topic(payload["state_topic"])
    if component in ("text", "button"):
        assert valid_publish_topic(payload["command_topic"])
    if component == "text":
        assert valid_subscribe_topic(payload.get("state_topic", "x"))
        assert 0 <= payload.get("min", 0) < payload.get("max", 255) <= 255
        assert payload.get("mode", "text") in ("text", "password")
    if component == "image":
        assert ("url_topic" in payload) != ("image_topic" in payload), "exactly one of url_topic, image_topic"
        assert valid_subscribe_topic(payload.get("url_topic") or payload["image_topic"])
        assert not ("content_type" in payload and "url_topic" in payload)
    return payload


@pytest.mark.parametrize("public_base_url", [None, "http://studio.lan:8080"])
def test_every_entity_has_what_home_assistant_requires(tmp_path, public_base_url):
    cfg = parse_config({"mqtt": {"hass_discovery": True, "public_base_url": public_base_url,
                                 "worker_id": "gpu-1"}}, tmp_path).mqtt
    topics = Topics.from_config(cfg)
    messages = discovery_messages(cfg, topics, "fluxworker-host.lan-1234", "0.1.0")
    payloads = {topic: check_discovery(topic, json.dumps(payload)) for topic, payload in messages}
    components = sorted(topic.split("/")[1] for topic in payloads)
    assert components == ["button", "image", "sensor", "sensor", "sensor", "sensor", "text"]
    assert len({p["unique_id"] for p in payloads.values()}) == len(payloads)
    assert {json.dumps(p["device"], sort_keys=True) for p in payloads.values()} == {
        json.dumps(next(iter(payloads.values()))["device"], sort_keys=True)}  # one device
    assert {p["availability_topic"] for p in payloads.values()} == {"fluxworker/workers/gpu-1/status"}
    image = next(p for t, p in payloads.items() if "/image/" in t)
    if public_base_url:
        assert image["url_topic"] == "fluxworker/workers/gpu-1/image/url"
    else:
        assert image["image_topic"] == "fluxworker/workers/gpu-1/image"
    sensors = {p["value_template"] for t, p in payloads.items() if "/sensor/" in t}
    assert sensors == {"{{ value_json.%s }}" % key for key in ("state", "queue", "last_seed", "last_error")}


def test_the_checker_rejects_what_home_assistant_rejects():
    good = {"unique_id": "u", "device": {"identifiers": ["d"]}, "availability_topic": "a/status",
            "command_topic": "a/set"}
    check_discovery("homeassistant/button/node/go/config", json.dumps(good))
    bad = [
        ("homeassistant/button/no de/go/config", good),
        ("homeassistant/button/node/go/config", {**good, "command_topic": "a/+/set"}),
        ("homeassistant/button/node/go/config", {**good, "device": {"name": "no identifiers"}}),
        ("homeassistant/image/node/img/config", {**good, "url_topic": "u", "image_topic": "i"}),
        ("homeassistant/image/node/img/config", {**good, "url_topic": "u", "content_type": "image/png"}),
        ("homeassistant/text/node/t/config", {**good, "max": 1000}),
        ("homeassistant/sensor/node/s/config", good),
    ]
    for topic, payload in bad:
        with pytest.raises((AssertionError, KeyError)):
            check_discovery(topic, json.dumps(payload))


def test_the_prompt_entity_takes_no_more_than_its_declared_maximum(tmp_path):
    cfg = parse_config({"mqtt": {"hass_discovery": True}}, tmp_path).mqtt
    text = next(p for t, p in discovery_messages(cfg, Topics.from_config(cfg), "node", "0.1.0") if "/text/" in t)
    prompt = Prompt(tmp_path / "prompt.txt", min(2000, TEXT_MAX))
    assert prompt.set(("ü" * text["max"]).encode()) == "ü" * text["max"]
    with pytest.raises(JobError) as refused:
        prompt.set(b"x" * (text["max"] + 1))
    assert refused.value.code == "invalid_length" and refused.value.field == "prompt"
    assert (tmp_path / "prompt.txt").read_text(encoding="utf-8") == "ü" * text["max"]
