"""Fuzzing the MQTT job topic: random bytes, random JSON, deep nesting, huge numbers and odd unicode,
published to a real mosquitto that a real worker subprocess (the tiny FLUX model) listens to.

Every message the job parser refuses must come back as an error on ``<prefix>/errors`` with a code,
a message and a field, and nothing may stop the worker: a valid job afterwards still completes.
The worker logs at DEBUG level and authenticates with a password, which its log must never hold.
"""

import json
import subprocess
from types import SimpleNamespace

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from brokers import Broker, Probe
from conftest import WorkerProcess, mqtt_section, write_config
from fluxworker.config import load_config
from fluxworker.errors import JobError
from fluxworker.jobs import JobSpec, parse_job, parse_json

PASSWORD = "fuzz-Pa55word-7c1e"  # distinctive: a log line can hold it only by leaking it


@pytest.fixture(scope="module")
def fuzz(tmp_path_factory, tiny_dir):
    folder = tmp_path_factory.mktemp("mqtt-fuzz")
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(folder / "passwd"), "studio", PASSWORD], check=True)
    # Anonymous clients (the probe) may connect; a client that names a user must give its password.
    broker = Broker(folder / "broker", extra=f"password_file {folder}/passwd\n").start()
    config_file = write_config(folder, tiny_dir, worker={"stop_timeout": 60.0, "log_level": "DEBUG"},
                               mqtt=mqtt_section(broker, username="studio"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FLUXWORKER_MQTT_PASSWORD", PASSWORD)
        patch.setenv("OMP_NUM_THREADS", "1")
        worker = WorkerProcess(config_file).start()
    probe = Probe(broker, topics=["fluxworker/errors", "fluxworker/jobs/+/result", "fluxworker/status"])
    probe.wait_message("fluxworker/status", lambda m: m.payload == b"online", timeout=60)
    yield SimpleNamespace(broker=broker, worker=worker, probe=probe, limits=load_config(config_file).limits)
    probe.close()
    worker.kill()
    broker.kill()


def refused(payload: bytes, limits) -> bool:
    """Whether the job model refuses this message (the same steps as the MQTT intake)."""
    try:
        data = parse_json(payload, limits.max_job_bytes)
        if isinstance(data, dict):
            data = {**data, "transport": "mqtt"}
        parse_job(data, limits, default_id="fuzz-oracle")
    except JobError:
        return True
    return False


odd_text = st.text(st.characters(codec=None, exclude_categories=()), max_size=40)
json_leaf = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**80), max_value=2**80),
    st.floats(allow_nan=True, allow_infinity=True), odd_text,
)
json_value = st.recursive(json_leaf, lambda children: st.one_of(
    st.lists(children, max_size=5), st.dictionaries(odd_text, children, max_size=5)), max_leaves=20)
job_like = st.dictionaries(st.sampled_from(list(JobSpec.model_fields) + ["steps", "ïd", "\u0000"]), json_value,
                           min_size=1, max_size=6)


def _encode(value) -> bytes:
    # Lone surrogates cannot be UTF-8: what they give is invalid bytes, also worth sending.
    return json.dumps(value, ensure_ascii=False, allow_nan=True).encode("utf-8", "surrogatepass")


def _nested(depth: int, kind: str) -> bytes:
    if kind == "list":
        return b"[" * depth + b"]" * depth
    return b'{"a":' * depth + b"1" + b"}" * depth


payloads = st.one_of(
    st.binary(max_size=300),
    json_value.map(_encode),
    job_like.map(_encode),
    st.builds(_nested, st.integers(min_value=50, max_value=200_000), st.sampled_from(["list", "object"])),
    st.integers(min_value=20, max_value=20_000).map(
        lambda digits: b'{"id": "huge", "prompt": "x", "width": 1' + b"0" * digits + b"}"),
    st.builds(lambda job_id, prompt: _encode({"id": job_id, "prompt": prompt, "width": 63}), odd_text, odd_text),
)


@settings(max_examples=80, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.filter_too_much, HealthCheck.data_too_large])
@given(payload=payloads)
# Always tried, whatever the draw: the shapes that break parsers.
@example(payload=b"[" * 100_000 + b"]" * 100_000)
@example(payload=b'{"a":' * 5_000 + b"1" + b"}" * 5_000)
@example(payload=b'{"id": "huge", "prompt": "x", "width": 1' + b"0" * 5_000 + b"}")
@example(payload=b'{"id": "huge-float", "prompt": "x", "width": 1e999, "seed": -1e999}')
@example(payload=b'{"id": "nan", "prompt": "x", "strength": NaN}')
@example(payload='{"id": "\ud800", "prompt": "\U0010ffff\u202e\u0000"}'.encode("utf-8", "surrogatepass"))
@example(payload=b"\xff\xfe\x00{")
@example(payload=b"")
def test_every_refused_message_gets_an_error_with_code_message_and_field(fuzz, payload):
    assume(refused(payload, fuzz.limits))
    probe = fuzz.probe
    before = len(probe.received("fluxworker/errors"))
    probe.publish("fluxworker/jobs", payload)
    errors = probe.wait_for(lambda p: len(p.received("fluxworker/errors")) > before and p.received("fluxworker/errors"),
                            timeout=30, what="the error of a refused message")
    record = errors[before].json()
    assert record["status"] == "failed"
    error = record["error"]
    assert {"code", "message", "field"} <= set(error), error
    assert isinstance(error["code"], str) and error["code"] and isinstance(error["message"], str) and error["message"]
    assert error["field"] is None or isinstance(error["field"], str)
    assert fuzz.worker.proc.poll() is None, fuzz.worker.log()[-3000:]


def test_a_valid_job_after_the_fuzzing_still_completes(fuzz):
    fuzz.probe.publish("fluxworker/jobs", {"id": "after-fuzz", "prompt": "a fox", "width": 64, "height": 64,
                                           "num_inference_steps": 1})
    result = fuzz.probe.wait_message("fluxworker/jobs/after-fuzz/result", timeout=120).json()
    assert result["status"] == "done"
    assert fuzz.worker.proc.poll() is None


def test_the_worker_log_never_holds_the_broker_password(fuzz):
    log = fuzz.worker.log()
    assert "mqtt: connected to" in log  # it got in with the password (a wrong one is refused)
    assert PASSWORD not in log
