"""Operations: metrics, retention, parameters in PNGs, status, readiness notification."""

import json
import os
import re
import socket
import subprocess
import time

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from conftest import ServerProcess, drop, png_b64, run_cli, wait_for, wait_record, write_config
from fluxworker.inbox import Inbox
from fluxworker.metadata import read_parameters
from fluxworker.retention import enforce


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_dir):
    folder = tmp_path_factory.mktemp("ops")
    server = ServerProcess(write_config(folder, tiny_dir, models={"esrgan": str(tiny_dir / "esrgan.pth")})).start()
    yield server
    server.kill()


def scrape(server) -> dict:
    text = requests.get(server.url + "/metrics", timeout=30).text
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = (sample.name, tuple(sorted(sample.labels.items())))
            values[key] = sample.value
    return values


def sample(values, name, **labels):
    return values.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_parse_and_move_with_jobs(server):
    before = scrape(server)
    labels = dict(type="generate", engine="flux", transport="http", outcome="done")
    for n in range(2):
        assert requests.post(server.url + "/generate", json={"prompt": f"m{n}", "width": 64, "height": 64},
                             timeout=60).status_code == 200
    (server.folder / "inbox" / "broken.json").write_text("[]")
    wait_for(lambda: (server.folder / "inbox" / "failed" / "broken.json").exists(), timeout=30)
    after = wait_for(lambda: (v := scrape(server)) and sample(v, "fluxworker_jobs_total", type="unknown", engine="none",
                                                                 transport="inbox", outcome="rejected") > 0 and v,
                     timeout=30)
    assert sample(after, "fluxworker_jobs_total", **labels) == sample(before, "fluxworker_jobs_total", **labels) + 2
    count = sample(after, "fluxworker_job_run_seconds_count", type="generate", engine="flux")
    assert count == sample(before, "fluxworker_job_run_seconds_count", type="generate", engine="flux") + 2
    assert sample(after, "fluxworker_job_run_seconds_bucket", type="generate", engine="flux", le="+Inf") == count
    assert sample(after, "fluxworker_queue_depth") == 0
    assert sample(after, "fluxworker_worker_ready") == 1
    assert sample(after, "fluxworker_model_load_seconds", engine="flux") > 0
    assert sample(after, "fluxworker_steps_per_second") > 0


def test_steps_per_second_is_flux_steps_over_the_engine_time_and_an_upscale_leaves_it(server):
    def counted(values, job_type, engine):
        return sample(values, "fluxworker_jobs_total", type=job_type, engine=engine, transport="http", outcome="done")

    before = scrape(server)
    body = requests.post(server.url + "/generate", json={"prompt": "speed", "width": 64, "height": 64,
                                                         "num_inference_steps": 3}, timeout=60).json()
    run_s = wait_record(server.folder / "outputs", body["id"])["timings"]["run_s"]
    after = wait_for(lambda: (v := scrape(server)) and counted(v, "generate", "flux") > counted(
        before, "generate", "flux") and v, timeout=30, what="the generate job in the metrics")
    # The engine's time, as in the completion record: not the PNG encoding and writing after it.
    assert sample(after, "fluxworker_steps_per_second") == pytest.approx(3 / run_s)
    run_sum = "fluxworker_job_run_seconds_sum"
    assert sample(after, run_sum, type="generate", engine="flux") - sample(before, run_sum, type="generate",
                                                                            engine="flux") == pytest.approx(run_s)

    # Tiles are no denoising steps.
    upscaled = requests.post(server.url + "/upscale", json={"image": png_b64((96, 64))}, timeout=60)
    assert upscaled.status_code == 200, upscaled.text
    last = wait_for(lambda: (v := scrape(server)) and counted(v, "upscale", "esrgan") > counted(
        after, "upscale", "esrgan") and v, timeout=30, what="the upscale job in the metrics")
    assert sample(last, "fluxworker_steps_per_second") == sample(after, "fluxworker_steps_per_second")
    assert sample(last, "fluxworker_job_run_seconds_count", type="upscale", engine="esrgan") >= 1


def test_png_parameters_round_trip_and_rerun_gives_the_same_bytes(server, tmp_path):
    body = requests.post(server.url + "/generate", json={
        "prompt": "a red kite, über the dunes", "width": 128, "height": 64, "num_inference_steps": 3,
        "no_text": True, "performance_mode": "fast"}, timeout=60).json()
    image = server.folder / "outputs" / body["url"].rsplit("/", 1)[1]
    found = read_parameters(image)
    lines = found["parameters"].splitlines()
    assert lines[0] == "a red kite, über the dunes"
    assert f"Seed: {body['seed']}" in lines[1] and "Steps: 3" in lines[1] and "Size: 128x64" in lines[1]
    # The tiny model's folder is named "flux"; a worker that does not pass its model names FLUX.1-schnell.
    assert re.search(r"Model: (flux|FLUX\.1-schnell),", lines[1]) and "fluxworker" in lines[1]
    assert "Mode: txt2img" in lines[1]
    # what the engine applied, not the config's words: compile defaults to auto, off on the CPU
    assert found["fluxworker"]["settings"] == {"fp8_storage": False, "compile": False}
    job = found["fluxworker"]["job"]
    assert job["seed"] == body["seed"] and job["performance_mode"] == "fast" and job["no_text"] is True
    assert "id" not in job and "transport" not in job

    info = run_cli("info", str(image))
    assert info.returncode == 0 and found["parameters"] in info.stdout
    rerun = run_cli("info", "--job", str(image))
    (tmp_path / "rerun.json").write_text(rerun.stdout)
    submitted = run_cli("submit", str(tmp_path / "rerun.json"), "--wait", "--timeout", "60",
                        "--config", str(server.config_file))
    assert submitted.returncode == 0, submitted.stderr
    record = json.loads(submitted.stdout)
    assert (server.folder / "outputs" / record["file"]).read_bytes() == image.read_bytes()


def test_parameters_name_the_configured_model_the_mode_and_the_settings_that_change_pixels(tmp_path):
    from fluxworker.config import parse_config
    from fluxworker.jobs import parse_job
    from fluxworker.metadata import job_parameters

    (tmp_path / "my-flux-finetune").mkdir()
    config = parse_config({"models": {"flux": "my-flux-finetune"}}, tmp_path)
    job = parse_job({"id": "p1", "prompt": "a kite", "width": 64, "height": 64, "seed": 3}, config.limits)
    chunks = job_parameters(job, 3, (64, 64), model=config.models.flux,
                            settings={"fp8_storage": True, "compile": False})
    details = chunks["parameters"].splitlines()[1]
    for item in ("Model: my-flux-finetune,", "Mode: txt2img,", "FP8 storage: true,", "Compiled: false,"):
        assert item in details
    document = json.loads(chunks["fluxworker"])
    assert document["model"] == "my-flux-finetune"
    assert document["settings"] == {"fp8_storage": True, "compile": False}
    assert parse_job(document["job"], config.limits).spec.seed == 3  # still a job to submit again

    hub = job_parameters(job, 3, (64, 64), model="black-forest-labs/FLUX.1-schnell")
    assert "Model: black-forest-labs/FLUX.1-schnell," in hub["parameters"] and "FP8" not in hub["parameters"]
    assert "Model: FLUX.1-schnell," in job_parameters(job, 3, (64, 64))["parameters"]  # callers that pass nothing


def test_info_on_an_image_without_parameters(tmp_path):
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
    result = run_cli("info", str(tmp_path / "plain.png"))
    assert result.returncode == 1 and "no generation parameters" in result.stderr


def test_status_prints_the_worker_the_queue_and_the_last_results(server):
    requests.post(server.url + "/generate", json={"prompt": "status", "width": 64, "height": 64, "id": "st-1"},
                  timeout=60)
    result = run_cli("status", "--config", str(server.config_file))
    assert result.returncode == 0, result.stderr
    assert "worker: idle" in result.stdout and "queued: 0" in result.stdout
    assert "st-1  done  /outputs/st-1.png" in result.stdout
    data = json.loads(run_cli("status", "--json", "--config", str(server.config_file)).stdout)
    assert data["worker"]["state"] == "idle" and data["queued"] == []


def test_status_of_a_worker_never_started_and_of_one_that_died_mid_job(tmp_path, config_file):
    never = run_cli("status", "--config", str(config_file))
    assert never.returncode == 0, never.stderr
    assert "worker: never started (no status file)" in never.stdout and "None" not in never.stdout
    assert json.loads(run_cli("status", "--json", "--config", str(config_file)).stdout)["worker"] == {"alive": False}

    gone = subprocess.Popen(["true"])
    gone.wait()
    inbox = Inbox(tmp_path / "inbox", tmp_path / "outputs")
    inbox.ensure()
    inbox.status_path.write_text(json.dumps({"state": "running", "pid": gone.pid, "ready": True,
                                             "job": {"id": "lost", "type": "generate", "engine": "flux"}}))
    dead = run_cli("status", "--config", str(config_file))
    assert f"worker: running (process {gone.pid} is gone)" in dead.stdout and "running: lost" not in dead.stdout
    worker = json.loads(run_cli("status", "--json", "--config", str(config_file)).stdout)["worker"]
    assert worker["state"] == "running" and worker["alive"] is False

    inbox.status_path.write_text(json.dumps({"state": "idle", "pid": os.getpid()}))
    live = json.loads(run_cli("status", "--json", "--config", str(config_file)).stdout)["worker"]
    assert live == {"state": "idle", "pid": os.getpid(), "alive": True}


# -- retention ------------------------------------------------------------------------------------


def make_output(inbox, job_id, age_days, size=1000, now=None):
    now = now or time.time()
    png = inbox.outputs / f"{job_id}.png"
    png.write_bytes(b"x" * size)
    record = inbox.outputs / f"{job_id}.json"
    record.write_text(json.dumps({"id": job_id, "status": "done", "file": f"{job_id}.png"}))
    stamp = now - age_days * 86400
    for path in (png, record):
        os.utime(path, (stamp, stamp))


def test_retention_by_age_removes_exactly_the_old_jobs(tmp_path):
    inbox = Inbox(tmp_path / "inbox", tmp_path / "outputs")
    inbox.ensure()
    now = time.time()
    for job_id, age in (("old-1", 10), ("old-2", 8), ("new-1", 1), ("new-2", 0)):
        make_output(inbox, job_id, age, now=now)
    (inbox.failed / "bad.json").write_text("x")
    (inbox.failed / "bad.json.error.json").write_text("{}")
    for path in inbox.failed.iterdir():
        os.utime(path, (now - 30 * 86400, now - 30 * 86400))
    removed = enforce(inbox, max_age_s=7 * 86400, max_total_bytes=None, now=now)
    assert sorted(p.name for p in removed) == sorted(
        ["old-1.png", "old-1.json", "old-2.png", "old-2.json", "bad.json", "bad.json.error.json"])
    assert sorted(p.name for p in inbox.outputs.iterdir()) == ["new-1.json", "new-1.png", "new-2.json", "new-2.png"]


def test_retention_by_size_removes_the_oldest_until_under_the_limit(tmp_path):
    inbox = Inbox(tmp_path / "inbox", tmp_path / "outputs")
    inbox.ensure()
    now = time.time()
    for n in range(5):
        make_output(inbox, f"job-{n}", age_days=5 - n, size=1000, now=now)  # job-0 is the oldest
    record_size = (inbox.outputs / "job-0.json").stat().st_size
    removed = enforce(inbox, max_age_s=None, max_total_bytes=3 * (1000 + record_size), now=now)
    assert sorted({p.stem for p in removed}) == ["job-0", "job-1"]
    assert not (inbox.outputs / "job-1.png").exists() and (inbox.outputs / "job-2.png").exists()


def test_retention_never_touches_a_job_in_processing(tmp_path):
    inbox = Inbox(tmp_path / "inbox", tmp_path / "outputs")
    inbox.ensure()
    make_output(inbox, "busy", age_days=100)
    (inbox.processing / "busy.json").write_text("{}")
    assert enforce(inbox, max_age_s=1, max_total_bytes=1) == []
    assert (inbox.outputs / "busy.png").exists()


def test_retention_off_by_default_removes_nothing(tmp_path):
    inbox = Inbox(tmp_path / "inbox", tmp_path / "outputs")
    inbox.ensure()
    make_output(inbox, "ancient", age_days=1000)
    assert enforce(inbox, None, None) == []


def test_the_worker_enforces_retention_and_logs_it(tmp_path, tiny_dir, worker_factory):
    config = write_config(tmp_path, tiny_dir, retention={"max_age_days": 2, "interval": 10})
    inbox = Inbox(tmp_path / "inbox", tmp_path / "outputs")
    inbox.ensure()
    make_output(inbox, "stale", age_days=3)
    make_output(inbox, "fresh", age_days=1)
    worker = worker_factory(config)
    wait_for(lambda: not (inbox.outputs / "stale.png").exists(), timeout=30, what="retention")
    assert (inbox.outputs / "fresh.png").exists()
    drop(tmp_path / "inbox", {"id": "after-retention", "prompt": "x", "width": 64, "height": 64})
    assert wait_record(tmp_path / "outputs", "after-retention")["status"] == "done"
    assert "retention removed 2 file(s) of 1 job(s)" in worker.log()
    assert re.search(r"retention removed .*: outputs/stale\.(json|png), outputs/stale\.(json|png)$", worker.log(),
                     re.MULTILINE)


def test_retention_logs_the_first_names_and_counts_the_rest(tmp_path, caplog):
    inbox = Inbox(tmp_path / "inbox", tmp_path / "outputs")
    inbox.ensure()
    for n in range(15):
        make_output(inbox, f"old-{n:02}", age_days=10 + n)
    with caplog.at_level("INFO", logger="fluxworker.retention"):
        assert len(enforce(inbox, max_age_s=86400, max_total_bytes=None)) == 30
    line = caplog.messages[-1]
    assert "old-14.png" in line and line.count("outputs/") == 20 and line.endswith(" and 10 more")


# -- readiness for systemd ------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["worker", "api"])
def test_ready_is_notified_to_systemd_once_serving(tmp_path, tiny_dir, command):
    import subprocess
    import sys

    config = write_config(tmp_path, tiny_dir)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(tmp_path / "notify.sock"))
    listener.settimeout(120)
    args = [sys.executable, "-m", "fluxworker", command, "--config", str(config)]
    if command == "api":
        from conftest import free_port

        args += ["--port", str(free_port())]
    proc = subprocess.Popen(args, env={**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify.sock")},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        message = listener.recv(4096).decode()
        assert "READY=1" in message
        if command == "worker":
            assert (tmp_path / "inbox" / "processing" / ".status.json").exists()
            assert json.loads((tmp_path / "inbox" / "processing" / ".status.json").read_text())["ready"]
        proc.terminate()
        assert proc.wait(timeout=60) == 0
        assert "STOPPING=1" in listener.recv(4096).decode()
    finally:
        proc.kill()
        listener.close()
