"""Fuzzing: random JSON, deep nesting, huge numbers, odd unicode and random bytes into the job
parser, as inbox files, and (schemathesis) into every endpoint of the running API."""

import json
import os
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import ServerProcess, png_b64, wait_record, write_config
from fluxworker.config import LimitsConfig
from fluxworker.errors import JobError
from fluxworker.jobs import JobSpec, parse_job, parse_json

LIMITS = LimitsConfig(max_width=256, max_height=256)
FIELDS = list(JobSpec.model_fields)

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


def test_random_inbox_files_never_stop_the_worker(tmp_path, tiny_dir, worker_factory):
    """Random bytes and random JSON dropped as job files: each ends in failed/ with its error, or
    runs; the worker stays up and the next real job still runs."""
    import random

    config = write_config(tmp_path, tiny_dir, limits={"max_width": 128, "max_height": 128},
                          inbox={"settle_seconds": 0.5})
    worker = worker_factory(config)
    inbox = tmp_path / "inbox"
    rng = random.Random(7)
    payloads = [bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200))) for _ in range(15)]
    payloads += [json.dumps(doc).encode() for doc in (
        [], 1, "job", None, {"prompt": 1}, {"prompt": "x", "width": 10**40}, {"type": "upscale"},
        {"prompt": "x", "image": "data:image/png;base64,AAAA"}, {"prompt": "x", "mask": png_b64()},
        {"prompt": "\u0000" * 3, "width": 64, "height": 64, "num_inference_steps": 1},
    )]
    for n, payload in enumerate(payloads):
        (inbox / f"fuzz-{n}.json").write_bytes(payload)
    (inbox / "after-fuzz.json").write_text(json.dumps({"prompt": "still here", "width": 64, "height": 64}))
    assert wait_record(tmp_path / "outputs", "after-fuzz", timeout=120)["status"] == "done"
    for n in range(len(payloads)):
        record = wait_record(tmp_path / "outputs", f"fuzz-{n}", timeout=60)
        if record["status"] == "failed":
            check_rejection(JobError(**record["error"]))
    assert worker.proc.poll() is None
    assert "Traceback" not in worker.log()


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


def test_schemathesis_finds_no_server_error_on_any_endpoint(fuzz_server, tmp_path):
    """Every endpoint of /openapi.json, with schema-valid and schema-breaking inputs: no 5xx."""
    max_examples = os.environ.get("FLUXWORKER_FUZZ_EXAMPLES", "30")
    seconds = os.environ.get("FLUXWORKER_FUZZ_SECONDS", "60")  # the reliability run gives it longer
    result = subprocess.run(
        [sys.executable, "-m", "schemathesis.cli", "run", f"{fuzz_server.url}/openapi.json",
         "--checks", "not_a_server_error", "--phases", "examples,coverage,fuzzing",
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
