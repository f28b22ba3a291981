"""MQTT end to end: a real mosquitto, real worker subprocesses, the tiny real FLUX model on the CPU."""

import base64
import io
import os
import shutil
import signal
import subprocess
import threading
import time
from types import SimpleNamespace

import pytest
from PIL import Image

from brokers import Broker
from conftest import WorkerProcess, mqtt_section, read_record, wait_for, wait_record, write_config
from test_hass import check_discovery
from test_worker import slow_job, small


def done_count(log: str, job_id: str) -> int:
    return log.count(f"job {job_id} type=generate engine=flux done")


def runs(workers, job_id) -> int:
    """How many times the workers ran a job, once each has logged it (the log line follows the
    result: wait for it)."""
    count = lambda: sum(done_count(w.log(), job_id) for w in workers)  # noqa: E731
    wait_for(count, timeout=10, what=f"{job_id} in the worker logs")
    time.sleep(0.2)
    return count()


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread_per_worker():
    """The workers here share the CPU with a broker, test clients and each other: one torch thread
    each keeps their thread pools from spinning against one another (a GPU worker has its own)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")
        yield


# -- a broker and a worker of its own for each test that does not restart them -----------------


@pytest.fixture
def studio(tmp_path_factory, tiny_dir):
    """A fresh broker (own config and persistence folder, free port) and worker for one test, so
    that no test sees another's retained messages, sessions or jobs."""
    folder = tmp_path_factory.mktemp("mqtt-studio")
    broker = Broker(folder / "broker").start()
    config = write_config(folder, tiny_dir, mqtt=mqtt_section(
        broker, publish_image=True, hass_discovery=True, hass_job={"width": 64, "height": 64}))
    worker = WorkerProcess(config).start()
    yield SimpleNamespace(broker=broker, worker=worker, outputs=folder / "outputs")
    worker.kill()
    broker.kill()


@pytest.fixture
def studio_probe(studio, probe_factory):
    probe = probe_factory(studio.broker, topics=["fluxworker/#", "replies/#", "homeassistant/#"])
    probe.wait_message("fluxworker/status", lambda m: m.payload == b"online", timeout=60)
    return probe


def test_a_job_published_on_mqtt_reports_queued_progress_and_done_and_answers_the_requester(studio, studio_probe):
    probe = studio_probe
    probe.publish("fluxworker/jobs", small("over-mqtt", seed=5), response_topic="replies/app-1",
                  correlation_data=b"req-42")
    result = probe.wait_message("fluxworker/jobs/over-mqtt/result").json()
    assert result["status"] == "done" and result["seed"] == 5 and result["url"] == "/outputs/over-mqtt.png"
    assert result == read_record(studio.outputs, "over-mqtt")
    reply = probe.wait_message("replies/app-1")
    assert reply.correlation_data == b"req-42" and reply.json() == result
    statuses = probe.payloads("fluxworker/jobs/over-mqtt/status")
    assert statuses[0] == {"id": "over-mqtt", "status": "queued"} and statuses[-1] == result
    steps = [s for s in statuses if s["status"] == "running" and s["total"]]
    assert steps and steps[-1] == {"id": "over-mqtt", "status": "running", "step": 4, "total": 4}
    image = probe.wait_message("fluxworker/jobs/over-mqtt/image").payload
    assert image == (studio.outputs / "over-mqtt.png").read_bytes()


def test_malformed_payloads_give_errors_and_the_next_job_runs(studio, studio_probe):
    probe = studio_probe
    probe.publish("fluxworker/jobs", b"{ not json")
    probe.publish("fluxworker/jobs", b'"just a string"')
    probe.publish("fluxworker/jobs", small("bad-steps", num_inference_steps=99))
    probe.publish("fluxworker/jobs", small("after-bad"))
    assert probe.wait_message("fluxworker/jobs/after-bad/result").json()["status"] == "done"
    errors = probe.payloads("fluxworker/errors")
    assert [(e["id"], e["error"]["code"]) for e in errors] == [
        (None, "invalid_json"), (None, "invalid_job"), ("bad-steps", "out_of_range")]
    bad = probe.wait_message("fluxworker/jobs/bad-steps/result").json()
    assert bad["status"] == "failed" and bad["error"]["field"] == "num_inference_steps"
    assert studio.worker.proc.poll() is None


def test_a_ten_megabyte_image_payload_works(studio, studio_probe):
    side = 1830  # random pixels do not compress: the PNG is about 10 MB
    buffer = io.BytesIO()
    Image.frombytes("RGB", (side, side), os.urandom(side * side * 3)).save(buffer, format="PNG", compress_level=1)
    assert buffer.tell() >= 10_000_000
    job = small("big-input", image="data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode(),
                strength=0.5)
    studio_probe.publish("fluxworker/jobs", job)
    result = studio_probe.wait_message("fluxworker/jobs/big-input/result", timeout=120).json()
    assert result["status"] == "done" and (result["width"], result["height"]) == (64, 64)


def test_home_assistant_discovery_prompt_and_button(studio, studio_probe):
    probe = studio_probe
    configs = probe.wait_for(lambda p: len(p.received("homeassistant/+/+/+/config")) >= 7
                             and p.received("homeassistant/+/+/+/config"))
    assert all(m.retain for m in configs)
    payloads = {m.topic: check_discovery(m.topic, m.payload) for m in configs}
    assert sorted(t.split("/")[1] for t in payloads) == ["button", "image", "sensor", "sensor", "sensor", "sensor",
                                                         "text"]
    # Home Assistant's birth message brings the discovery again.
    probe.publish("homeassistant/status", "online")
    probe.wait_for(lambda p: len(p.received("homeassistant/+/+/+/config")) >= 14)

    text = next(p for t, p in payloads.items() if t.split("/")[1] == "text")
    button = next(p for t, p in payloads.items() if t.split("/")[1] == "button")
    probe.publish(text["command_topic"], "a red barn in the snow")
    probe.wait_message(text["state_topic"], lambda m: m.payload == b"a red barn in the snow")
    probe.messages.clear()
    probe.publish(button["command_topic"], button["payload_press"])
    image = next(p for t, p in payloads.items() if t.split("/")[1] == "image")
    pressed_png = probe.wait_message(image["image_topic"], timeout=60).payload
    state = probe.wait_message("fluxworker/state", lambda m: m.json()["last_seed"] is not None
                               and m.json()["state"] == "idle").json()
    assert state["queue"] == 0 and state["last_image"].startswith("/outputs/mqtt-")

    # The button used the prompt of the text entity and the configured size: the same prompt and
    # seed give the same bytes.
    probe.publish("fluxworker/jobs", {"id": "same-as-button", "prompt": "a red barn in the snow",
                                      "seed": state["last_seed"], "width": 64, "height": 64})
    probe.wait_message("fluxworker/jobs/same-as-button/result")
    assert (studio.outputs / "same-as-button.png").read_bytes() == pressed_png


@pytest.mark.skipif(not shutil.which("mosquitto_pub"), reason="mosquitto-clients is not installed")
def test_the_readme_mosquitto_pub_and_sub_lines_work(studio, studio_probe):
    port = str(studio.broker.port)
    listen = subprocess.Popen(
        ["mosquitto_sub", "-p", port, "-V", "mqttv5", "-t", "replies/readme", "-C", "1", "-W", "60"],
        stdout=subprocess.PIPE, text=True)
    time.sleep(0.3)
    subprocess.run(
        ["mosquitto_pub", "-p", port, "-V", "mqttv5", "-q", "1", "-t", "fluxworker/jobs",
         "-D", "publish", "response-topic", "replies/readme", "-D", "publish", "correlation-data", "abc",
         "-m", '{"id": "from-cli", "prompt": "a lighthouse", "width": 64, "height": 64}'],
        check=True, timeout=30)
    out, _ = listen.communicate(timeout=90)
    assert '"id": "from-cli"' in out and '"status": "done"' in out


# -- tests that start, kill and restart brokers and workers ------------------------------------


def test_availability_online_then_offline_after_sigkill_and_after_a_clean_stop(
        tmp_path, tiny_dir, broker, probe_factory, worker_factory):
    config = write_config(tmp_path / "w", tiny_dir, mqtt=mqtt_section(broker))

    def retained_status():
        late = probe_factory(broker, topics=["fluxworker/status"])
        message = late.wait_message("fluxworker/status", timeout=10)
        late.close()
        assert message.retain
        return message.payload

    watcher = probe_factory(broker, topics=["fluxworker/status"])
    worker = worker_factory(config)
    watcher.wait_message("fluxworker/status", lambda m: m.payload == b"online", timeout=30)
    assert retained_status() == b"online"

    watcher.messages.clear()
    worker.proc.send_signal(signal.SIGKILL)
    worker.proc.wait(timeout=30)
    watcher.wait_message("fluxworker/status", lambda m: m.payload == b"offline", timeout=10)
    assert retained_status() == b"offline"

    watcher.messages.clear()
    worker = worker_factory(config)
    watcher.wait_message("fluxworker/status", lambda m: m.payload == b"online", timeout=30)
    watcher.messages.clear()
    assert worker.terminate() == 0
    watcher.wait_message("fluxworker/status", lambda m: m.payload == b"offline", timeout=10)
    assert retained_status() == b"offline"


def test_a_worker_killed_mid_job_runs_it_once_after_restart_and_results_outlive_a_broker_outage(
        tmp_path, tiny_dir, broker, probe_factory, worker_factory):
    config = write_config(tmp_path / "w", tiny_dir, mqtt=mqtt_section(broker))
    outputs = tmp_path / "w" / "outputs"
    listener = probe_factory(broker, topics=["fluxworker/jobs/+/result", "fluxworker/jobs/+/status"],
                             session="results-listener")
    first = worker_factory(config)
    broker.wait_saved()  # the listener's session survives the SIGKILL
    listener.publish("fluxworker/jobs", slow_job("victim"))
    listener.wait_message("fluxworker/jobs/victim/status", lambda m: m.json().get("step", 0) >= 1, timeout=120)
    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait(timeout=30)
    assert read_record(outputs, "victim") is None

    second = worker_factory(config)
    assert listener.wait_message("fluxworker/jobs/victim/result", timeout=180).json()["status"] == "done"
    assert runs([first, second], "victim") == 1
    assert len(listener.received("fluxworker/jobs/victim/result")) == 1

    # The broker goes away while a job runs, and the worker stops before it comes back: the
    # result is owed on disk and goes out when both are back.
    listener.publish("fluxworker/jobs", slow_job("through-outage"))
    listener.wait_message("fluxworker/jobs/through-outage/status", lambda m: m.json().get("step", 0) >= 1,
                          timeout=120)
    broker.kill()
    wait_record(outputs, "through-outage", timeout=180)
    assert second.terminate() == 0
    assert listener.received("fluxworker/jobs/through-outage/result") == []
    broker.start()
    third = worker_factory(config)
    assert listener.wait_message("fluxworker/jobs/through-outage/result", timeout=60).json()["status"] == "done"
    assert runs([second, third], "through-outage") == 1


def test_the_broker_killed_and_restarted_while_jobs_flow_loses_no_accepted_job_and_runs_none_twice(
        tmp_path, tiny_dir, broker, probe_factory, worker_factory):
    config = write_config(tmp_path / "w", tiny_dir, mqtt=mqtt_section(broker))
    outputs = tmp_path / "w" / "outputs"
    listener = probe_factory(broker, topics=["fluxworker/jobs/+/result"], session="flow-results")
    sender = probe_factory(broker, topics=["fluxworker/status"], session="flow-sender")
    worker = worker_factory(config)
    sender.wait_message("fluxworker/status", lambda m: m.payload == b"online", timeout=30)
    broker.wait_saved()  # the sessions of both probes survive the SIGKILL

    sent: dict[str, int] = {}
    stop_sending = threading.Event()

    def send():
        """One job every 80 ms, whatever happens to the broker."""
        for n in range(200):
            if stop_sending.is_set():
                return
            sent[f"flow-{n:03d}"] = sender.publish("fluxworker/jobs", small(f"flow-{n:03d}", seed=n), wait=False)
            time.sleep(0.08)

    sending = threading.Thread(target=send)
    sending.start()
    time.sleep(0.3)
    broker.wait_saved()
    time.sleep(0.3)
    last_save = broker.saved_at()
    broker.kill()
    time.sleep(1.0)  # paho holds the jobs sent meanwhile and sends them once the broker is back
    broker.start()
    restarted_at, restarted_clock = time.time(), time.monotonic()
    # The worker says online again once it has subscribed again (a retained copy is the old one).
    sender.wait_message("fluxworker/status", lambda m: m.payload == b"online" and not m.retain
                        and m.received_at > restarted_clock, timeout=30)
    time.sleep(0.6)
    stop_sending.set()
    sending.join()
    sender.wait_for(lambda p: all(mid in p.acks for mid in sent.values()), timeout=60, what="every PUBACK")

    # The broker accepted a job when its PUBACK said success. Reason 16 (no matching subscribers)
    # means it dropped the job: mosquitto 2.0.11 forgets shared subscriptions when it restarts, so
    # jobs sent before the worker subscribes again are refused that way. mosquitto saves its state
    # every second or two, and a SIGKILL loses what it accepted since its last save; such jobs
    # must still never run twice.
    acks = {job_id: sender.acks[mid] for job_id, mid in sent.items()}
    accepted = {job_id for job_id, (code, _) in acks.items() if code == 0}
    guaranteed = {job_id for job_id in accepted if acks[job_id][1] < last_save - 0.1 or acks[job_id][1] > restarted_at}
    assert len(guaranteed) >= 10, acks
    assert any(acks[job_id][1] > restarted_at for job_id in guaranteed), acks
    assert any(acks[job_id][1] < last_save for job_id in guaranteed), acks
    for job_id in sorted(guaranteed):
        assert wait_record(outputs, job_id, timeout=120)["status"] == "done", job_id
    time.sleep(1.0)
    log = worker.log()
    for job_id in sent:
        assert done_count(log, job_id) <= 1, job_id
        assert done_count(log, job_id) == 1 or job_id not in guaranteed, job_id
    listener.wait_for(lambda p: guaranteed <= {m["id"] for m in p.payloads("fluxworker/jobs/+/result")},
                      timeout=60, what="a result message for every accepted job")


def test_two_workers_on_one_shared_subscription_split_twenty_jobs_and_run_each_once(
        tmp_path, tiny_dir, broker, probe_factory, worker_factory):
    folders = {name: tmp_path / name for name in ("gpu-a", "gpu-b")}
    configs = {name: write_config(folder, tiny_dir, mqtt=mqtt_section(broker, worker_id=name))
               for name, folder in folders.items()}
    probe = probe_factory(broker, topics=["fluxworker/#"])
    workers = {name: worker_factory(config, wait_ready=False) for name, config in configs.items()}  # load together
    for name in workers:
        probe.wait_message(f"fluxworker/workers/{name}/status", lambda m: m.payload == b"online", timeout=60)
    ids = [f"split-{n:02d}" for n in range(20)]
    for job_id in ids:
        probe.publish("fluxworker/jobs", small(job_id, seed=1))
    results = probe.wait_for(lambda p: {m["id"] for m in p.payloads("fluxworker/jobs/+/result")} >= set(ids)
                             and p.payloads("fluxworker/jobs/+/result"), timeout=120)
    assert all(r["status"] == "done" for r in results)
    ran = {name: {job_id for job_id in ids if read_record(folders[name] / "outputs", job_id)} for name in folders}
    assert ran["gpu-a"] | ran["gpu-b"] == set(ids) and not ran["gpu-a"] & ran["gpu-b"]
    assert ran["gpu-a"] and ran["gpu-b"], ran
    for job_id in ids:
        assert runs(workers.values(), job_id) == 1
