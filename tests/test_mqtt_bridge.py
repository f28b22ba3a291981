"""The MQTT bridge in this process, against a real mosquitto and real inbox folders.

No worker runs here: where a test needs a job to finish, ``finish_like_the_worker`` claims the
inbox file and writes its completion record through the inbox's own API, and reports the status
changes the worker would. The end-to-end tests with worker subprocesses are in test_mqtt_worker.py.
"""

import json
import logging
import os
import subprocess
import time

import paho.mqtt.client as paho
import pytest
from PIL import Image

from conftest import mqtt_section, wait_for
from fluxworker.config import ConfigError, parse_config
from fluxworker.images import png_bytes
from fluxworker.inbox import Inbox
from fluxworker.jobs import done_record, parse_job
from fluxworker.mqtt import MqttBridge
from fluxworker.mqtt_intake import Intake
from fluxworker.mqtt_topics import read_password


@pytest.fixture
def bridge_factory(tmp_path):
    """In-process bridges on their own inbox folders; all stopped at the end."""
    bridges = []

    def make(broker, folder=None, limits=None, **mqtt):
        folder = folder or tmp_path / "worker"
        folder.mkdir(parents=True, exist_ok=True)
        data = {"mqtt": mqtt_section(broker, **mqtt), "limits": limits or {}}
        config = parse_config(data, folder)
        inbox = Inbox(config.paths.inbox, config.paths.outputs)
        inbox.ensure()
        bridge = MqttBridge(config, inbox)
        bridge.start()
        bridges.append(bridge)
        return bridge

    yield make
    for bridge in bridges:
        bridge.stop()


def online(probe, topic="fluxworker/status"):
    """Wait for the retained availability to say online (the bridge has subscribed by then)."""
    probe.wait_message(topic, lambda m: m.payload == b"online", timeout=20)
    probe.messages.clear()


def queue_from_the_inbox(bridge, job_id):
    """A job that arrives by the inbox (or HTTP): the bridge learns of it from the worker only."""
    bridge.inbox.submit(parse_job({"id": job_id, "prompt": "a fox", "width": 64, "height": 64},
                                  bridge.config.limits).spec)


def finish_like_the_worker(bridge, job_id, image_size=(64, 64), color=(9, 9, 9)):
    """Claim the job, write its image and completion record as the worker does, and report the
    status changes and the finished record as the worker would."""
    inbox = bridge.inbox
    path = wait_for(lambda: inbox.claim(f"{job_id}.json"), timeout=10, what=f"{job_id} in the inbox")
    job = parse_job(json.loads(path.read_text()), bridge.config.limits)
    bridge.on_status({"state": "running", "job": {"id": job_id, "type": "generate", "step": 1, "total": 4}})
    inbox.write_output(job.output_name, png_bytes(Image.new("RGB", image_size, color)))
    record = done_record(job, seed=7, width=image_size[0], height=image_size[1], timings={"run_s": 0.1})
    bridge.on_status({"state": "idle", "job": None})  # the engine is free before the record is written
    inbox.finish(path, record)
    bridge.on_finished(record)
    return record


def test_a_job_goes_into_the_inbox_and_its_result_comes_back_with_the_correlation_data(
        broker, probe_factory, bridge_factory):
    probe = probe_factory(broker)
    bridge = bridge_factory(broker, public_base_url="http://studio.lan:8080", publish_image=True)
    online(probe)
    probe.publish("fluxworker/jobs", {"id": "b-1", "prompt": "a fox", "width": 64, "height": 64},
                  response_topic="replies/me", correlation_data=b"\x01req-1")
    assert probe.wait_message("fluxworker/jobs/b-1/status").json() == {"id": "b-1", "status": "queued"}
    queued = json.loads((bridge.inbox.root / "b-1.json").read_text())
    assert queued["prompt"] == "a fox" and queued["id"] == "b-1"
    assert bridge.pending.get("b-1").response_topic == "replies/me"

    finish_like_the_worker(bridge, "b-1")
    result = probe.wait_message("fluxworker/jobs/b-1/result").json()
    assert result["status"] == "done" and result["url"] == "http://studio.lan:8080/outputs/b-1.png"
    reply = probe.wait_message("replies/me")
    assert reply.correlation_data == b"\x01req-1" and reply.json() == result
    image = probe.wait_message("fluxworker/jobs/b-1/image").payload
    assert image == (bridge.inbox.outputs / "b-1.png").read_bytes()
    progress = [m for m in probe.payloads("fluxworker/jobs/b-1/status") if m["status"] == "running"]
    assert progress == [{"id": "b-1", "status": "running", "step": 1, "total": 4}]
    wait_for(lambda: bridge.pending.get("b-1") is None, timeout=10, what="the owed result settled")
    assert probe.wait_message("fluxworker/image/url").payload == b"http://studio.lan:8080/outputs/b-1.png"


def test_a_duplicate_id_is_queued_once_and_a_finished_job_answers_again(
        broker, probe_factory, bridge_factory, caplog):
    caplog.set_level(logging.INFO, logger="fluxworker.mqtt")
    probe = probe_factory(broker)
    bridge = bridge_factory(broker)
    online(probe)
    job = {"id": "twice", "prompt": "a fox", "width": 64, "height": 64}
    probe.publish("fluxworker/jobs", job)
    probe.publish("fluxworker/jobs", job)
    wait_for(lambda: "job twice is queued already: duplicate dropped" in caplog.text, timeout=10)
    finish_like_the_worker(bridge, "twice")
    probe.wait_message("fluxworker/jobs/twice/result")
    assert [m["status"] for m in probe.payloads("fluxworker/jobs/twice/status")][:2] == ["queued", "running"]
    assert [m["status"] for m in probe.payloads("fluxworker/jobs/twice/status")].count("queued") == 1

    probe.publish("fluxworker/jobs", job, response_topic="late/asker", correlation_data=b"again")
    reply = probe.wait_message("late/asker")
    assert reply.json()["status"] == "done" and reply.correlation_data == b"again"
    assert not (bridge.inbox.root / "twice.json").exists()
    assert len(probe.payloads("fluxworker/jobs/twice/result")) == 2


def test_messages_delivered_again_after_a_lost_acknowledgement_are_queued_once(
        broker, probe_factory, bridge_factory, caplog):
    caplog.set_level(logging.INFO, logger="fluxworker.mqtt")
    probe = probe_factory(broker)
    first = bridge_factory(broker)
    first.client.ack = lambda mid, qos: paho.MQTT_ERR_SUCCESS  # as if the process died before acknowledging
    online(probe)
    probe.publish("fluxworker/jobs", {"id": "lost-ack", "prompt": "a fox", "width": 64, "height": 64})
    probe.publish("fluxworker/jobs", {"prompt": "a fox without an id", "width": 64, "height": 64})
    wait_for(lambda: len(first.inbox.scan()) == 2, timeout=10, what="two queued jobs")
    first.stop()

    # The broker delivers both again under the same session; each maps to the job already queued.
    second = bridge_factory(broker)
    wait_for(lambda: caplog.text.count("duplicate dropped") == 2, timeout=20, what="two duplicates")
    assert sorted(e.name for e in second.inbox.scan())[0] == "lost-ack.json"
    assert len(second.inbox.scan()) == 2
    second.stop()  # this time acknowledged: a third session gets nothing again
    bridge_factory(broker)
    online(probe)
    time.sleep(1.0)
    assert caplog.text.count("duplicate dropped") == 2


def test_a_job_without_an_id_gets_one_and_a_redelivered_message_maps_to_the_same_job(tmp_path):
    config = parse_config({}, tmp_path)
    inbox = Inbox(config.paths.inbox, config.paths.outputs)
    inbox.ensure()
    intake = Intake(inbox, config.limits, v5=True)
    intake.start()

    def message(mid, dup, payload=b'{"prompt": "a fox", "width": 64, "height": 64}'):
        msg = paho.MQTTMessage(mid=mid, topic=b"fluxworker/jobs")
        msg.payload, msg.dup, msg.qos = payload, dup, 1
        return msg

    first = intake.take(message(5, dup=False))
    assert first.kind == "queued" and first.job_id.startswith("mqtt-")
    again = intake.take(message(5, dup=True))  # its acknowledgement was lost: same packet id, DUP set
    assert (again.kind, again.job_id) == ("queued_before", first.job_id)
    other = intake.take(message(5, dup=False))  # a new message after the packet id came round again
    assert other.kind == "queued" and other.job_id != first.job_id
    assert intake.take(message(6, dup=False)).job_id not in (first.job_id, other.job_id)
    assert len(inbox.scan()) == 3


def test_bad_messages_are_refused_with_an_error_and_acknowledged(broker, probe_factory, bridge_factory):
    probe = probe_factory(broker)
    bridge = bridge_factory(broker, limits={"max_job_bytes": 4096}, share_group=None)
    online(probe)
    probe.publish("fluxworker/jobs", b"\xff not json")
    probe.publish("fluxworker/jobs", b"[1, 2]")
    probe.publish("fluxworker/jobs", {"id": "bad-width", "prompt": "x", "width": 100},
                  response_topic="replies/bad", correlation_data=b"c1")
    probe.publish("fluxworker/jobs", json.dumps({"prompt": "x" * 5000}))
    probe.publish("fluxworker/jobs", {"id": "kept", "prompt": "x", "width": 64, "height": 64}, retain=True)
    probe.publish("fluxworker/jobs", {"id": "good", "prompt": "a fox", "width": 64, "height": 64})
    probe.wait_message("fluxworker/jobs/good/status")
    errors = probe.wait_for(lambda p: len(p.payloads("fluxworker/errors")) >= 4 and p.payloads("fluxworker/errors"))
    assert [e["error"]["code"] for e in errors] == ["invalid_json", "invalid_job", "not_multiple_of_64", "too_large"]
    assert [e["id"] for e in errors] == [None, None, "bad-width", None]
    assert probe.wait_message("fluxworker/jobs/bad-width/result").json()["error"]["field"] == "width"
    reply = probe.wait_message("replies/bad")
    assert reply.correlation_data == b"c1" and reply.json()["error"]["code"] == "not_multiple_of_64"
    # A live subscriber gets a retained job as a plain message: it runs once.
    assert sorted(p.name for p in bridge.inbox.root.glob("*.json")) == ["good.json", "kept.json"]

    # Every message was acknowledged: a new session of the same client gets none again. Only the
    # retained copy of "kept" comes with the new subscription, and it is refused, not run again.
    bridge.stop()
    probe.messages.clear()
    bridge_factory(broker, share_group=None)
    online(probe)
    error = probe.wait_message("fluxworker/errors").json()
    assert (error["id"], error["error"]["code"]) == (None, "retained_message")
    assert "(job kept)" in error["error"]["message"]
    time.sleep(1.0)
    assert len(probe.received("fluxworker/errors")) == 1
    assert sorted(p.name for p in bridge.inbox.root.glob("*.json")) == ["good.json", "kept.json"]
    probe.client.publish("fluxworker/jobs", b"", qos=1, retain=True).wait_for_publish(5)


def test_a_message_that_meets_a_bug_is_refused_acknowledged_and_the_next_job_runs(
        broker, probe_factory, bridge_factory, monkeypatch, caplog):
    probe = probe_factory(broker)
    bridge = bridge_factory(broker, share_group=None)
    online(probe)
    take = bridge.intake.take
    calls = []

    def take_with_a_bug_once(msg, *args):
        calls.append(msg.payload)
        if len(calls) == 1:
            raise RuntimeError("a bug in the intake")
        return take(msg, *args)

    monkeypatch.setattr(bridge.intake, "take", take_with_a_bug_once)
    probe.publish("fluxworker/jobs", {"id": "unlucky", "prompt": "a fox", "width": 64, "height": 64})
    error = probe.wait_message("fluxworker/errors").json()
    assert error["error"]["code"] == "internal_error" and "RuntimeError" in error["error"]["message"]
    assert "a bug in the intake" in caplog.text
    probe.publish("fluxworker/jobs", {"id": "next", "prompt": "a fox", "width": 64, "height": 64})
    probe.wait_message("fluxworker/jobs/next/status")

    # It was acknowledged: a new session of the same client does not get it again.
    bridge.stop()
    monkeypatch.undo()
    probe.messages.clear()
    bridge = bridge_factory(broker, share_group=None)
    online(probe)
    time.sleep(1.0)
    assert probe.received("fluxworker/errors") == [] and probe.received("fluxworker/jobs/unlucky/status") == []
    assert sorted(p.name for p in bridge.inbox.root.glob("*.json")) == ["next.json"]


def test_results_produced_while_the_broker_is_down_are_delivered_after_it_returns(
        broker, probe_factory, bridge_factory):
    listener = probe_factory(broker, topics=["fluxworker/jobs/+/result"], session="listener")
    sender = probe_factory(broker, topics=["fluxworker/status"])
    bridge = bridge_factory(broker)
    online(sender)
    for job_id in ("away-1", "away-2"):
        sender.publish("fluxworker/jobs", {"id": job_id, "prompt": "a fox", "width": 64, "height": 64})
    wait_for(lambda: len(bridge.inbox.scan()) == 2, timeout=10, what="two queued jobs")
    broker.wait_saved()  # the listener's session survives the SIGKILL

    broker.kill()
    finish_like_the_worker(bridge, "away-1")
    bridge.stop()  # the worker stops too while the broker is away: the owed result is on disk
    assert bridge.pending.get("away-1") is not None
    broker.start()
    bridge = bridge_factory(broker)
    finish_like_the_worker(bridge, "away-2")
    results = listener.wait_for(lambda p: len({m["id"] for m in p.payloads("fluxworker/jobs/+/result")}) == 2
                                and p.payloads("fluxworker/jobs/+/result"), timeout=30)
    assert {r["id"] for r in results} == {"away-1", "away-2"}
    wait_for(lambda: bridge.pending.ids() == [], timeout=10, what="every owed result settled")


def test_inbox_jobs_finished_while_the_broker_is_down_are_reported_and_the_retained_image_is_the_latest(
        broker, probe_factory, bridge_factory):
    listener = probe_factory(broker, topics=["fluxworker/jobs/+/result", "fluxworker/jobs/+/status"],
                             session="listener")
    bridge = bridge_factory(broker, hass_discovery=True)
    queue_from_the_inbox(bridge, "before")
    first = finish_like_the_worker(bridge, "before", color=(1, 2, 3))
    listener.wait_message("fluxworker/jobs/before/result")
    watcher = probe_factory(broker, topics=["fluxworker/image"])
    old_png = (bridge.inbox.outputs / first["file"]).read_bytes()
    watcher.wait_message("fluxworker/image", lambda m: m.payload == old_png, timeout=20)
    watcher.close()
    broker.wait_saved()  # the listener's session and the retained image survive the SIGKILL

    broker.kill()
    wait_for(lambda: not bridge.client.is_connected(), timeout=20, what="the bridge to see the broker gone")
    for job_id, color in (("away-a", (200, 0, 0)), ("away-b", (0, 200, 0))):
        queue_from_the_inbox(bridge, job_id)
        finish_like_the_worker(bridge, job_id, color=color)
    broker.start()

    results = listener.wait_for(lambda p: {m["id"] for m in p.payloads("fluxworker/jobs/+/result")} >= {
        "away-a", "away-b"} and p.payloads("fluxworker/jobs/+/result"), timeout=30)
    assert all(r["status"] == "done" for r in results)
    assert listener.payloads("fluxworker/jobs/away-b/status")[-1]["status"] == "done"
    newest = (bridge.inbox.outputs / "away-b.png").read_bytes()
    late = probe_factory(broker, topics=["fluxworker/image"])
    image = late.wait_message("fluxworker/image", lambda m: m.payload == newest, timeout=20)
    assert image.retain


def test_inbox_jobs_finished_while_the_broker_is_down_are_reported_after_a_restart_of_the_worker(
        broker, probe_factory, bridge_factory):
    listener = probe_factory(broker, topics=["fluxworker/jobs/+/result"], session="listener")
    bridge = bridge_factory(broker)
    wait_for(lambda: bridge.client.is_connected(), timeout=20, what="the bridge connected")
    broker.wait_saved()  # the listener's session survives the SIGKILL

    broker.kill()
    wait_for(lambda: not bridge.client.is_connected(), timeout=20, what="the bridge to see the broker gone")
    for job_id in ("gone-1", "gone-2"):
        queue_from_the_inbox(bridge, job_id)
        finish_like_the_worker(bridge, job_id)
    bridge.stop()  # the worker restarts while the broker is still away
    assert sorted(p.name for p in (bridge.inbox.root / "mqtt" / "missed").iterdir()) == ["gone-1", "gone-2"]
    bridge = bridge_factory(broker)
    broker.start()

    results = listener.wait_for(lambda p: {m["id"] for m in p.payloads("fluxworker/jobs/+/result")} >= {
        "gone-1", "gone-2"} and p.payloads("fluxworker/jobs/+/result"), timeout=30)
    assert all(r["status"] == "done" for r in results)
    wait_for(lambda: not any((bridge.inbox.root / "mqtt" / "missed").iterdir()), timeout=10,
             what="the reported jobs forgotten")
    listener.messages.clear()
    bridge.stop()
    bridge = bridge_factory(broker)  # reported once: a later start has nothing to send again
    wait_for(lambda: bridge.client.is_connected(), timeout=20, what="the bridge connected")
    time.sleep(1.0)
    assert listener.received("fluxworker/jobs/+/result") == []


def test_inbox_jobs_report_queued_running_then_their_result_like_mqtt_jobs(broker, probe_factory, bridge_factory):
    probe = probe_factory(broker, topics=["fluxworker/jobs/+/status"])
    bridge = bridge_factory(broker)
    wait_for(lambda: bridge.client.is_connected(), timeout=20, what="the bridge connected")
    queue_from_the_inbox(bridge, "from-inbox")
    finish_like_the_worker(bridge, "from-inbox")
    probe.wait_message("fluxworker/jobs/from-inbox/status", lambda m: m.json()["status"] == "done")
    statuses = [s["status"] for s in probe.payloads("fluxworker/jobs/from-inbox/status")]
    assert statuses == ["queued", "running", "done"]


def test_a_prompt_longer_than_home_assistant_accepts_is_refused_on_the_errors_topic(
        broker, probe_factory, bridge_factory):
    probe = probe_factory(broker, topics=["fluxworker/errors", "fluxworker/prompt"])
    bridge = bridge_factory(broker, hass_discovery=True)
    wait_for(lambda: bridge.client.is_connected(), timeout=20, what="the bridge connected")
    probe.publish("fluxworker/prompt/set", "a lighthouse at dusk")
    probe.wait_message("fluxworker/prompt", lambda m: m.payload == b"a lighthouse at dusk")
    probe.publish("fluxworker/prompt/set", "x" * 256)
    error = probe.wait_message("fluxworker/errors").json()["error"]
    assert error["code"] == "invalid_length" and error["field"] == "prompt" and "255" in error["message"]
    probe.publish("fluxworker/prompt/set", "y" * 255)
    probe.wait_message("fluxworker/prompt", lambda m: m.payload == b"y" * 255)
    assert all(len(m.payload) <= 255 for m in probe.received("fluxworker/prompt"))
    assert bridge.prompt.text == "y" * 255


def test_refused_messages_are_counted_for_the_metrics(broker, probe_factory, bridge_factory):
    from fluxworker.metrics import render

    probe = probe_factory(broker, topics=["fluxworker/errors"])
    bridge = bridge_factory(broker)
    wait_for(lambda: bridge.client.is_connected(), timeout=20, what="the bridge connected")
    for payload in (b"{ not json", b"[]", b'{"id": "bad", "width": -1}'):
        probe.publish("fluxworker/jobs", payload)
    probe.wait_for(lambda p: len(p.received("fluxworker/errors")) == 3, timeout=20, what="three errors")
    line = 'fluxworker_jobs_total{engine="none",outcome="rejected",transport="mqtt",type="unknown"} 3.0'
    wait_for(lambda: line in render(bridge.inbox).decode(), timeout=10, what="the refusals in the metrics")


def test_an_owed_result_whose_record_retention_removed_is_forgotten(broker, bridge_factory):
    bridge = bridge_factory(broker)
    wait_for(lambda: bridge.client.is_connected(), timeout=20, what="the bridge connected")
    broker.kill()
    wait_for(lambda: not bridge.client.is_connected(), timeout=20, what="the bridge to see the broker gone")
    # Owed (as after a request from MQTT), finished, and its record removed before the broker returns.
    bridge.pending.add("gone-job", None)
    bridge.inbox.submit(parse_job({"id": "gone-job", "prompt": "a fox"}, bridge.config.limits).spec)
    record = finish_like_the_worker(bridge, "gone-job")
    (bridge.inbox.outputs / record["file"]).unlink()
    bridge.inbox.completion_path("gone-job").unlink()
    bridge.pending.add("still-queued", None)
    queue_from_the_inbox(bridge, "still-queued")
    broker.start()
    wait_for(lambda: bridge.pending.get("gone-job") is None, timeout=30, what="the owed result forgotten")
    assert bridge.pending.get("still-queued") is not None  # its job is still to run


def test_a_message_over_the_size_limit_is_not_published_and_the_error_says_why(
        broker, probe_factory, bridge_factory):
    probe = probe_factory(broker)
    bridge = bridge_factory(broker, publish_image=True, max_publish_bytes=8192)
    online(probe)
    probe.publish("fluxworker/jobs", {"id": "big-image", "prompt": "a fox", "width": 256, "height": 256})
    probe.wait_message("fluxworker/jobs/big-image/status")
    path = wait_for(lambda: bridge.inbox.claim("big-image.json"), timeout=10)
    job = parse_job(json.loads(path.read_text()), bridge.config.limits)
    noise = Image.frombytes("RGB", (256, 256), os.urandom(256 * 256 * 3))  # incompressible: ~200 kB
    bridge.inbox.write_output(job.output_name, png_bytes(noise))
    record = done_record(job, seed=1, width=256, height=256, timings={})
    bridge.on_status({"state": "running", "job": {"id": "big-image", "step": 4, "total": 4}})
    bridge.on_status({"state": "idle", "job": None})
    bridge.inbox.finish(path, record)
    bridge.on_finished(record)
    assert probe.wait_message("fluxworker/jobs/big-image/result").json()["status"] == "done"
    error = probe.wait_message("fluxworker/errors").json()
    assert error["id"] == "big-image" and error["error"]["code"] == "message_too_large"
    assert "fluxworker/jobs/big-image/image" in error["error"]["message"]
    wait_for(lambda: bridge.pending.get("big-image") is None, timeout=10)
    assert probe.received("fluxworker/jobs/big-image/image") == []


def test_mqtt_3_1_1_takes_jobs_and_publishes_results(broker, probe_factory, bridge_factory):
    probe = probe_factory(broker, v5=False)
    bridge = bridge_factory(broker, protocol="v3.1.1")
    online(probe)
    probe.publish("fluxworker/jobs", {"id": "old-protocol", "prompt": "a fox", "width": 64, "height": 64})
    probe.wait_message("fluxworker/jobs/old-protocol/status")
    finish_like_the_worker(bridge, "old-protocol")
    assert probe.wait_message("fluxworker/jobs/old-protocol/result").json()["status"] == "done"


def test_a_clean_stop_publishes_offline_retained(broker, probe_factory, bridge_factory):
    probe = probe_factory(broker, topics=["fluxworker/status", "fluxworker/state"])
    bridge = bridge_factory(broker)
    online(probe)
    bridge.on_status({"state": "stopped", "job": None})
    bridge.stop()
    assert probe.wait_message("fluxworker/status").payload == b"offline"
    late = probe_factory(broker, topics=["fluxworker/status", "fluxworker/state"])
    message = late.wait_message("fluxworker/status")
    assert message.retain and message.payload == b"offline"
    assert late.wait_message("fluxworker/state").json()["state"] == "stopped"


def test_the_password_comes_from_the_environment_or_a_systemd_credential(tmp_path, monkeypatch):
    cfg = parse_config({"mqtt": {"username": "studio"}}, tmp_path).mqtt
    monkeypatch.delenv("FLUXWORKER_MQTT_PASSWORD", raising=False)
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    assert read_password(cfg) is None
    (tmp_path / "mqtt_password").write_text("from-credential\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    assert read_password(cfg) == "from-credential"
    monkeypatch.setenv("FLUXWORKER_MQTT_PASSWORD", "from-env")
    assert read_password(cfg) == "from-env"


def test_a_missing_tls_file_is_a_configuration_error(tmp_path):
    config = parse_config({"mqtt": {"enabled": True, "tls": True, "ca_file": "missing-ca.pem"}}, tmp_path)
    with pytest.raises(ConfigError, match="mqtt.ca_file: file not found"):
        MqttBridge(config, Inbox(config.paths.inbox, config.paths.outputs))


def test_tls_and_a_password_protected_broker(tmp_path, bridge_factory, monkeypatch, caplog):
    from brokers import Broker

    caplog.set_level(logging.DEBUG)
    certs = tmp_path / "certs"
    certs.mkdir()

    def openssl(*args):
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=certs)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=test CA",
            "-keyout", "ca.key", "-out", "ca.pem")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost", "-keyout", "server.key",
            "-out", "server.csr")
    (certs / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-days", "2", "-extfile", "san.ext", "-out", "server.pem")
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(certs / "passwd"), "studio", "s3cret"], check=True)
    secure = Broker(tmp_path / "secure")
    tls_port = secure.port
    secure.conf.write_text(secure.conf.read_text().replace("allow_anonymous true", "allow_anonymous false") + (
        f"password_file {certs}/passwd\n"
        f"cafile {certs}/ca.pem\ncertfile {certs}/server.pem\nkeyfile {certs}/server.key\n"))
    secure.start()
    try:
        monkeypatch.setenv("FLUXWORKER_MQTT_PASSWORD", "wr0ng-pass")
        refused = bridge_factory(secure, folder=tmp_path / "refused", tls=True, ca_file=str(certs / "ca.pem"),
                                 username="studio", host="localhost", port=tls_port)
        wait_for(lambda: "refused the connection" in caplog.text, timeout=20, what="a refused connection")
        assert not refused.client.is_connected()
        monkeypatch.setenv("FLUXWORKER_MQTT_PASSWORD", "s3cret")
        bridge = bridge_factory(secure, folder=tmp_path / "accepted", tls=True, ca_file=str(certs / "ca.pem"),
                                username="studio", host="localhost", port=tls_port)
        wait_for(lambda: bridge.client.is_connected(), timeout=20, what="a TLS connection")
        assert "connected to localhost" in caplog.text  # the log was captured, and holds no password
        assert "s3cret" not in caplog.text and "wr0ng-pass" not in caplog.text
    finally:
        secure.kill()
