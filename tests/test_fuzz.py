"""Fuzzing: random JSON, deep nesting, huge numbers, odd unicode and random bytes into the job
parser, as inbox files, and (schemathesis) into every endpoint of the running API."""

import itertools
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from conftest import ServerProcess, WorkerProcess, drop, png_b64, wait_record, write_config
from fluxworker.config import LimitsConfig, load_config
from fluxworker.errors import JobError
from fluxworker.jobs import JobSpec, parse_job, parse_json

LIMITS = LimitsConfig(max_width=256, max_height=256)
FIELDS = list(JobSpec.model_fields)
# Every answer: no 5xx, a body that matches its documented schema, the documented content type.
CHECKS = "not_a_server_error,response_schema_conformance,content_type_conformance"

json_leaf = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=50),
)
json_value = st.recursive(json_leaf, lambda children: st.one_of(
    st.lists(children, max_size=5), st.dictionaries(st.text(max_size=10), children, max_size=5)), max_leaves=25)
job_like = st.dictionaries(st.sampled_from(FIELDS + ["wait", "steps", "\u0000", "ïd"]), json_value, max_size=8)


def check_rejection(error: JobError) -> None:
    assert isinstance(error.code, str) and error.code
    assert isinstance(error.message, str) and error.message
    assert error.field is None or isinstance(error.field, str)
    if error.field is not None:
        assert error.field in FIELDS or error.code == "unknown_field"


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(job_like, json_value))
def test_the_parser_accepts_or_rejects_cleanly_any_json(data):
    try:
        job = parse_job(data, LIMITS)
    except JobError as error:
        check_rejection(error)
    else:
        assert job.id and job.spec.type in ("generate", "upscale")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_the_json_reader_accepts_or_rejects_cleanly_any_bytes(raw):
    try:
        data = parse_json(raw, 10_000)
    except JobError as error:
        assert error.code in ("invalid_json", "too_large") and error.message
    else:
        try:
            parse_job(data, LIMITS)
        except JobError as error:
            check_rejection(error)


@pytest.mark.parametrize("raw", [
    b"[" * 200_000 + b"]" * 200_000,
    b'{"a":' * 50_000 + b"1" + b"}" * 50_000,
    b'{"seed": ' + b"9" * 100_000 + b"}",
    b'{"prompt": "x", "seed": 1e999}',
    b'{"prompt": "\\ud800"}',
    b'{"prompt": "' + "\u202e\u0000\uffff🦀".encode() + b'"}',
    '{"prompt": "x", "width": 64, "height": 64, "ﬁeld": 1}'.encode(),
    b"\xef\xbb\xbf{\"prompt\": \"bom\"}",
])
def test_pathological_documents(raw):
    try:
        parse_job(parse_json(raw, 10**7), LIMITS)
    except JobError as error:
        check_rejection(error)


INBOX_LIMIT = 100_000  # the inbox worker's limits.max_job_bytes: files over it stay cheap to write


def _encode(value) -> bytes:
    return json.dumps(value, ensure_ascii=False, allow_nan=True).encode()


def _without_id(value):
    # A file that names a valid id gets its record under that id, once: the record must be found
    # under the file's own name, which is new for every example.
    if isinstance(value, dict):
        value.pop("id", None)
    return value


def _nested(depth: int, kind: str) -> bytes:
    if kind == "list":
        return b"[" * depth + b"]" * depth
    return b'{"a":' * depth + b"1" + b"}" * depth


def _oversized(extra: int) -> bytes:
    """A job that would be valid but for its size: one over limits.max_job_bytes by ``extra`` bytes."""
    head = _encode({"prompt": "", "width": 64, "height": 64})
    return head[:12] + b"x" * (INBOX_LIMIT + extra - len(head)) + head[12:]


inbox_files = st.one_of(
    st.binary(max_size=300),
    json_value.map(_without_id).map(_encode),
    job_like.map(_without_id).map(_encode),
    st.builds(_nested, st.integers(min_value=50, max_value=10_000), st.sampled_from(["list", "object"])),
    st.integers(min_value=1, max_value=100_000).map(_oversized),
)


@pytest.fixture(scope="module")
def inbox_fuzz(tmp_path_factory, tiny_dir):
    """One worker for the inbox fuzzing, quick to take files that do not parse."""
    folder = tmp_path_factory.mktemp("inbox-fuzz")
    config = write_config(folder, tiny_dir, limits={"max_width": 128, "max_height": 128, "max_job_bytes": INBOX_LIMIT},
                          inbox={"settle_seconds": 0.2, "scan_interval": 0.2})
    worker = WorkerProcess(config).start()
    yield SimpleNamespace(worker=worker, inbox=folder / "inbox", outputs=folder / "outputs",
                          limits=load_config(config).limits, names=itertools.count())
    worker.kill()


def refused(payload: bytes, limits: LimitsConfig, name: str) -> bool:
    """Whether the job model refuses this file (the worker's steps for a file of this name)."""
    try:
        parse_job(parse_json(payload, limits.max_job_bytes), limits, default_id=name)
    except JobError:
        return True
    return False


@settings(max_examples=50, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large,
                                 HealthCheck.large_base_example])
@given(payload=inbox_files)
# Always tried, whatever the draw: deep nesting, a file over the size limit, and jobs that parse
# but cannot run.
@example(payload=b"[" * 10_000 + b"]" * 10_000)
@example(payload=b'{"a":' * 10_000 + b"1" + b"}" * 10_000)
@example(payload=_oversized(1))
@example(payload=b"\xff\xfe\x00{")
@example(payload=b"")
@example(payload=_encode({"prompt": "x", "width": 10**40}))
@example(payload=_encode({"type": "upscale"}))
@example(payload=_encode({"prompt": "x", "image": "data:image/png;base64,AAAA"}))
@example(payload=_encode({"prompt": "x", "mask": png_b64()}))
def test_every_refused_inbox_file_gets_a_failed_record_with_code_message_and_field(inbox_fuzz, payload):
    name = f"fuzz-{next(inbox_fuzz.names)}"
    assume(refused(payload, inbox_fuzz.limits, name))
    temporary = inbox_fuzz.inbox / f".{name}.json.tmp"
    temporary.write_bytes(payload)
    os.rename(temporary, inbox_fuzz.inbox / f"{name}.json")
    record = wait_record(inbox_fuzz.outputs, name, timeout=30)
    assert record["status"] == "failed", record
    error = record["error"]
    assert {"code", "message", "field"} <= set(error), error
    check_rejection(JobError(error["code"], error["message"], error["field"]))
    assert (inbox_fuzz.inbox / "failed" / f"{name}.json").exists()
    assert inbox_fuzz.worker.proc.poll() is None, inbox_fuzz.worker.log()[-3000:]


def test_a_valid_inbox_job_after_the_fuzzing_still_runs(inbox_fuzz):
    drop(inbox_fuzz.inbox, {"id": "after-fuzz", "prompt": "still here", "width": 64, "height": 64,
                            "num_inference_steps": 1})
    assert wait_record(inbox_fuzz.outputs, "after-fuzz", timeout=120)["status"] == "done"
    assert inbox_fuzz.worker.proc.poll() is None
    assert "Traceback" not in inbox_fuzz.worker.log()


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory, tiny_dir, lama_file):
    folder = tmp_path_factory.mktemp("fuzz")
    config = write_config(
        folder, tiny_dir, limits={"max_width": 128, "max_height": 128, "max_upscale_pixels": 64 * 64},
        http={"max_queue": 200, "threads": 220, "max_body_bytes": 200_000},
        models={"esrgan": str(tiny_dir / "esrgan.pth"), "lama": str(lama_file)},
    )
    server = ServerProcess(config).start()
    yield server
    server.kill()


def test_schemathesis_finds_no_server_error_and_no_undocumented_answer(fuzz_server, tmp_path):
    """Every endpoint of /openapi.json, with schema-valid and schema-breaking inputs: no 5xx, and
    every answer has the content type and the body shape that /openapi.json documents for it."""
    max_examples = os.environ.get("FLUXWORKER_FUZZ_EXAMPLES", "30")
    seconds = os.environ.get("FLUXWORKER_FUZZ_SECONDS", "60")  # the reliability run gives it longer
    result = subprocess.run(
        [sys.executable, "-m", "schemathesis.cli", "run", f"{fuzz_server.url}/openapi.json",
         "--checks", CHECKS, "--phases", "examples,coverage,fuzzing",
         "--max-examples", max_examples, "--workers", "2", "--request-timeout", "120",
         "--generation-deterministic", "--suppress-health-check", "all", "--max-time", seconds],
        capture_output=True, text=True, timeout=float(seconds) + 300, cwd=tmp_path,
    )
    summary = result.stdout[-4000:] + result.stderr[-2000:]
    cases = next((line.strip() for line in result.stdout.splitlines() if "generated," in line), "?")
    print(f"schemathesis: {cases}")
    assert result.returncode == 0, summary
    assert "Traceback" not in fuzz_server.log(), fuzz_server.log()[-4000:]
    assert fuzz_server.proc.poll() is None
