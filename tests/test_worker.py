"""The worker end to end: real subprocesses, real folders, the tiny real FLUX model on the CPU."""

import json
import os
import signal
import time
from datetime import datetime

from PIL import Image

from conftest import drop, png_b64, read_record, run_cli, wait_for, wait_record, write_config


def image_of(outputs, record):
    return Image.open(outputs / record["file"])


def small(job_id, **fields):
    return {"id": job_id, "prompt": "a lighthouse at dusk", "width": 64, "height": 64, **fields}


# -- one worker serves the tests that do not restart it ----------------------------------------


def test_text_to_image_through_the_inbox(shared_worker):
    outputs = shared_worker.folder / "outputs"
    drop(shared_worker.folder / "inbox", small("t2i", width=128, height=64, seed=11))
    record = wait_record(outputs, "t2i")
    assert record["status"] == "done", record
    assert record["url"] == "/outputs/t2i.png" and record["seed"] == 11
    assert set(record["timings"]) == {"queued_s", "run_s", "total_s"}
    assert image_of(outputs, record).size == (128, 64)


def test_image_to_image_and_inpainting_through_the_inbox(shared_worker):
    outputs = shared_worker.folder / "outputs"
    inbox = shared_worker.folder / "inbox"
    drop(inbox, small("i2i", image=png_b64((100, 60)), strength=0.5, height=128))
    drop(inbox, small("inpaint", image=png_b64((64, 64)), mask=png_b64((64, 64), color=(255, 255, 255))))
    for job_id, size in (("i2i", (64, 128)), ("inpaint", (64, 64))):
        record = wait_record(outputs, job_id)
        assert record["status"] == "done", record
        assert image_of(outputs, record).size == size


def test_same_seed_gives_identical_bytes_and_a_drawn_seed_reproduces(shared_worker):
    outputs = shared_worker.folder / "outputs"
    inbox = shared_worker.folder / "inbox"
    drop(inbox, small("seed-a", seed=1234))
    drop(inbox, small("seed-b", seed=1234))
    drop(inbox, small("seed-c", seed=1235))
    drop(inbox, small("seed-null", seed=None))
    records = {job_id: wait_record(outputs, job_id) for job_id in ("seed-a", "seed-b", "seed-c", "seed-null")}
    data = {job_id: (outputs / f"{job_id}.png").read_bytes() for job_id in records}
    assert data["seed-a"] == data["seed-b"]
    assert data["seed-a"] != data["seed-c"]
    drawn = records["seed-null"]["seed"]
    assert isinstance(drawn, int) and 0 <= drawn < 2**32
    drop(inbox, small("seed-again", seed=drawn))
    wait_record(outputs, "seed-again")
    assert (outputs / "seed-again.png").read_bytes() == data["seed-null"]


def test_a_file_written_slowly_in_place_runs_once_complete(shared_worker):
    inbox = shared_worker.folder / "inbox"
    text = json.dumps(small("slow"))
    with open(inbox / "slow.json", "w") as handle:
        for start in range(0, len(text), 8):
            handle.write(text[start:start + 8])
            handle.flush()
            time.sleep(0.05)
    record = wait_record(shared_worker.folder / "outputs", "slow")
    assert record["status"] == "done", record


def test_a_file_renamed_in_from_another_folder_runs(shared_worker, tmp_path):
    staging = tmp_path / "staging.json"
    staging.write_text(json.dumps(small("moved-in")))
    os.rename(staging, shared_worker.folder / "inbox" / "moved-in.json")
    assert wait_record(shared_worker.folder / "outputs", "moved-in")["status"] == "done"


def test_a_file_without_an_id_takes_its_name(shared_worker):
    job = small("x")
    del job["id"]
    drop(shared_worker.folder / "inbox", job, name="named-by-file.json")
    assert wait_record(shared_worker.folder / "outputs", "named-by-file")["status"] == "done"


def test_garbage_goes_to_failed_with_its_error_and_the_next_job_runs(shared_worker):
    inbox = shared_worker.folder / "inbox"
    outputs = shared_worker.folder / "outputs"
    (inbox / "garbage.json").write_bytes(b"\x00\x01 this is not json")
    drop(inbox, {"id": "bad-field", "prompt": "x", "width": 100})
    drop(inbox, small("after-garbage"))
    assert wait_record(outputs, "after-garbage")["status"] == "done"
    error = json.loads(wait_for(lambda: (inbox / "failed" / "garbage.json.error.json").exists()
                                and (inbox / "failed" / "garbage.json.error.json").read_text(), timeout=30))
    assert error["error"]["code"] == "invalid_json"
    bad = wait_record(outputs, "bad-field")
    assert bad["status"] == "failed"
    assert bad["error"] == {"code": "not_multiple_of_64", "message": bad["error"]["message"], "field": "width"}
    assert (inbox / "failed" / "bad-field.json").exists()
    assert shared_worker.proc.poll() is None


def test_jobs_for_engines_that_are_not_configured_fail_clearly(shared_worker):
    drop(shared_worker.folder / "inbox", {"id": "no-esrgan", "type": "upscale", "image": png_b64()})
    record = wait_record(shared_worker.folder / "outputs", "no-esrgan")
    assert record["status"] == "failed"
    assert record["error"]["code"] == "engine_unavailable"
    assert "models.esrgan" in record["error"]["message"]


def test_twenty_queued_jobs_give_twenty_records(shared_worker):
    inbox = shared_worker.folder / "inbox"
    ids = [f"bulk-{n:02d}" for n in range(20)]
    for job_id in ids:
        drop(inbox, small(job_id, seed=n_seed(job_id)))
    records = [wait_record(shared_worker.folder / "outputs", job_id) for job_id in ids]
    assert [r["status"] for r in records] == ["done"] * 20
    assert not list((inbox / "processing").glob("bulk-*"))


def n_seed(job_id):
    return int(job_id.rsplit("-", 1)[1])


def test_a_job_with_a_completion_record_never_runs_twice(shared_worker):
    inbox = shared_worker.folder / "inbox"
    outputs = shared_worker.folder / "outputs"
    drop(inbox, small("once", seed=1))
    first = wait_record(outputs, "once")
    drop(inbox, small("once", seed=2))
    drop(inbox, small("after-once"))
    wait_record(outputs, "after-once")
    assert read_record(outputs, "once") == first
    assert not (inbox / "once.json").exists()
    assert shared_worker.log().count("job once type=generate engine=flux done") == 1
    assert "job once already has a completion record" in shared_worker.log()


def test_submit_wait_prints_the_record(shared_worker, tmp_path):
    job_file = tmp_path / "job.json"
    job_file.write_text(json.dumps({"prompt": "a boat", "width": 64, "height": 64, "seed": 9}))
    result = run_cli("submit", str(job_file), "--wait", "--timeout", "90", "--config", str(shared_worker.config_file))
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout)
    assert record["status"] == "done" and record["seed"] == 9
    assert (shared_worker.folder / "outputs" / record["file"]).exists()


def test_submit_wait_exits_non_zero_for_a_failed_job(shared_worker, tmp_path):
    job_file = tmp_path / "job.json"
    job_file.write_text(json.dumps({"type": "upscale", "image": png_b64()}))
    result = run_cli("submit", str(job_file), "--wait", "--timeout", "90", "--config", str(shared_worker.config_file))
    assert result.returncode == 1
    assert json.loads(result.stdout)["error"]["code"] == "engine_unavailable"


def test_submit_refuses_an_invalid_job_before_it_reaches_the_inbox(shared_worker, tmp_path):
    job_file = tmp_path / "job.json"
    job_file.write_text(json.dumps({"prompt": "x", "num_inference_steps": 50}))
    before = set(os.listdir(shared_worker.folder / "inbox"))
    result = run_cli("submit", str(job_file), "--config", str(shared_worker.config_file))
    assert result.returncode == 2
    error = json.loads(result.stderr)["error"]
    assert (error["code"], error["field"]) == ("out_of_range", "num_inference_steps")
    assert set(os.listdir(shared_worker.folder / "inbox")) == before


# -- tests that start, kill and restart their own workers ---------------------------------------


def test_files_present_before_the_worker_starts_are_run(tmp_path, tiny_dir, worker_factory):
    config = write_config(tmp_path, tiny_dir)
    (tmp_path / "inbox").mkdir()
    for n in range(3):
        drop(tmp_path / "inbox", small(f"early-{n}"))
    worker_factory(config)
    for n in range(3):
        assert wait_record(tmp_path / "outputs", f"early-{n}")["status"] == "done"


def test_a_finished_job_is_written_while_the_next_one_runs(tmp_path, tiny_dir, worker_factory):
    """The finisher is handed a job when the next one starts: its record must not wait for the
    next job to end. Both files are there before the worker starts, so one scan takes both."""
    config = write_config(tmp_path, tiny_dir)
    inbox, outputs = tmp_path / "inbox", tmp_path / "outputs"
    inbox.mkdir()
    first = drop(inbox, small("before-long", seed=3))
    drop(inbox, small("long", seed=4, width=768, height=768, num_inference_steps=10))
    os.utime(first, (time.time() - 60, time.time() - 60))  # the older one runs first
    worker_factory(config)
    assert wait_record(outputs, "before-long")["status"] == "done"
    written = (outputs / "before-long.json").stat().st_mtime
    long = wait_record(outputs, "long")
    assert long["status"] == "done" and long["timings"]["run_s"] > 0.2  # 10 steps at 768x768
    long_ended = datetime.fromisoformat(long["finished_at"]).timestamp()  # when its engine run ended
    assert written < long_ended - 0.1, (written, long_ended)


def test_temporary_files_left_by_writers_killed_mid_write_are_removed(tmp_path, tiny_dir, worker_factory):
    """A writer killed between writing a file and renaming it leaves its temporary file behind.
    The worker removes those an hour old; newer ones (they may still be written) and files that
    are not its own temporaries stay."""
    config = write_config(tmp_path, tiny_dir)
    inbox, outputs = tmp_path / "inbox", tmp_path / "outputs"
    abandoned = [inbox / ".tmp-4242-1-job.json", inbox / "processing" / ".tmp-4242-2-.status.json",
                 inbox / "failed" / ".tmp-4242-3-x.json.error.json", inbox / "mqtt" / "pending" / ".tmp-4242-4-y.json",
                 outputs / ".tmp-4242-5-job.png", outputs / ".probe-4242"]
    kept_old = [inbox / ".upload.json.tmp", inbox / "processing" / ".attempts-job.json"]
    kept_new = [inbox / ".tmp-4242-6-new.json", outputs / ".tmp-4242-7-new.png"]
    for path in abandoned + kept_old + kept_new:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"partial")
    hour_ago = time.time() - 3700
    for path in abandoned + kept_old:
        os.utime(path, (hour_ago, hour_ago))

    worker = worker_factory(config)
    drop(inbox, small("after-sweep"))
    assert wait_record(outputs, "after-sweep")["status"] == "done"
    wait_for(lambda: not any(path.exists() for path in abandoned), timeout=30, what="the sweep")
    assert all(path.exists() for path in kept_old + kept_new)
    assert "removed 6 temporary file(s)" in worker.log()


def test_one_job_under_two_file_names_runs_once(tmp_path, tiny_dir, worker_factory):
    """Two files carrying one id, both queued before the worker starts (so one scan takes both):
    the second waits for the first one's record and is dropped as a duplicate."""
    config = write_config(tmp_path, tiny_dir)
    inbox, outputs = tmp_path / "inbox", tmp_path / "outputs"
    inbox.mkdir()
    first = drop(inbox, small("twin", seed=1), name="twin-a.json")
    drop(inbox, small("twin", seed=2), name="twin-b.json")
    os.utime(first, (time.time() - 60, time.time() - 60))  # the seed-1 copy runs first
    drop(inbox, small("after-twin"))
    worker = worker_factory(config)
    wait_record(outputs, "after-twin")
    assert read_record(outputs, "twin")["seed"] == 1
    assert worker.log().count("job twin type=generate engine=flux done") == 1
    assert "job twin already has a completion record" in worker.log()
    assert not list((inbox / "processing").glob("twin-*.json"))


def test_a_job_that_keeps_crashing_the_worker_is_failed_and_the_queue_goes_on(tmp_path, tiny_dir, worker_factory):
    config = write_config(tmp_path, tiny_dir)
    inbox, outputs = tmp_path / "inbox", tmp_path / "outputs"
    (inbox / "processing").mkdir(parents=True)
    # As a worker killed twice during this job leaves it: in processing/, with its attempt count.
    (inbox / "processing" / "poison.json").write_text(json.dumps(small("poison-job", type="generate")))
    (inbox / "processing" / ".attempts-poison.json").write_text("2")
    drop(inbox, small("after-poison"))
    worker = worker_factory(config)
    assert wait_record(outputs, "after-poison")["status"] == "done"
    record = read_record(outputs, "poison-job")
    assert record["status"] == "failed" and record["type"] == "generate"
    assert record["error"]["code"] == "worker_crashed"
    assert (inbox / "failed" / "poison.json").exists()
    assert worker.proc.poll() is None


def test_a_job_file_over_the_size_limit_is_refused_without_being_read(tmp_path, tiny_dir, worker_factory):
    config = write_config(tmp_path, tiny_dir, limits={"max_job_bytes": 4096})
    inbox, outputs = tmp_path / "inbox", tmp_path / "outputs"
    inbox.mkdir()
    huge = inbox / ".huge.json.tmp"
    with open(huge, "wb") as handle:
        handle.truncate(4 * 1024**3)  # sparse: 4 GiB that would not fit in memory twice
    os.rename(huge, inbox / "huge.json")
    drop(inbox, small("after-huge"))
    worker = worker_factory(config)
    assert wait_record(outputs, "after-huge")["status"] == "done"
    record = read_record(outputs, "huge")
    assert record["error"]["code"] == "too_large" and "4294967296 bytes" in record["error"]["message"]
    assert worker.proc.poll() is None


def test_a_second_worker_on_the_same_inbox_exits_with_a_clear_error(tmp_path, tiny_dir, worker_factory):
    config = write_config(tmp_path, tiny_dir)
    worker_factory(config)
    second = worker_factory(config, wait_ready=False)
    assert second.proc.wait(timeout=60) == 2
    assert "already serves" in second.log()


def slow_job(job_id):
    """A job long enough on the CPU (several seconds) to be interrupted mid-way."""
    return {"id": job_id, "prompt": "a slow one", "width": 1024, "height": 1024, "num_inference_steps": 10, "seed": 3}


def wait_running(worker, job_id):
    wait_for(lambda: (worker.status().get("job") or {}).get("id") == job_id
             and worker.status()["job"]["step"] >= 1, timeout=120, interval=0.02, what=f"{job_id} running")


def test_sigkill_during_a_job_then_restart_loses_nothing_and_runs_nothing_twice(tmp_path, tiny_dir, worker_factory):
    config = write_config(tmp_path, tiny_dir)
    inbox, outputs = tmp_path / "inbox", tmp_path / "outputs"
    first = worker_factory(config)
    drop(inbox, slow_job("victim"))
    time.sleep(0.05)
    ids = [f"after-kill-{n}" for n in range(4)]
    for job_id in ids:
        drop(inbox, small(job_id))
    wait_running(first, "victim")
    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait(timeout=30)
    assert read_record(outputs, "victim") is None
    assert (inbox / "processing" / "victim.json").exists()

    second = worker_factory(config)
    for job_id in ["victim", *ids]:
        assert wait_record(outputs, job_id, timeout=180)["status"] == "done"
    assert not [p for p in (inbox / "processing").glob("*.json") if not p.name.startswith(".")]
    assert not list(inbox.glob("*.json"))
    # The log line follows the completion record: wait for it before counting.
    wait_for(lambda: all(f"job {j} type=generate engine=flux done" in second.log() for j in ["victim", *ids]),
             timeout=30)
    logs = first.log() + second.log()
    for job_id in ["victim", *ids]:
        assert logs.count(f"job {job_id} type=generate engine=flux done") == 1, job_id
    assert "requeued 1 job(s)" in second.log()


def test_sigterm_finishes_the_job_in_hand_and_exits_zero(tmp_path, tiny_dir, worker_factory):
    config = write_config(tmp_path, tiny_dir)
    worker = worker_factory(config)
    drop(tmp_path / "inbox", slow_job("finish-me"))
    drop(tmp_path / "inbox", small("left-queued"))
    wait_running(worker, "finish-me")
    assert worker.terminate(timeout=120) == 0
    assert read_record(tmp_path / "outputs", "finish-me")["status"] == "done"
    assert read_record(tmp_path / "outputs", "left-queued") is None
    assert (tmp_path / "inbox" / "left-queued.json").exists()
    assert "stop requested" in worker.log()


def test_a_second_sigterm_exits_at_once_and_the_job_runs_again_at_the_next_start(tmp_path, tiny_dir, worker_factory):
    config = write_config(tmp_path, tiny_dir)
    worker = worker_factory(config)
    drop(tmp_path / "inbox", slow_job("interrupted"))
    wait_running(worker, "interrupted")
    worker.proc.send_signal(signal.SIGTERM)
    time.sleep(0.2)
    worker.proc.send_signal(signal.SIGTERM)
    assert worker.proc.wait(timeout=30) == -signal.SIGTERM
    assert read_record(tmp_path / "outputs", "interrupted") is None
    worker_factory(config)
    assert wait_record(tmp_path / "outputs", "interrupted", timeout=180)["status"] == "done"


def test_the_stop_timeout_bounds_the_job_in_hand(tmp_path, tiny_dir, worker_factory):
    config = write_config(tmp_path, tiny_dir, worker={"stop_timeout": 0.2})
    worker = worker_factory(config)
    drop(tmp_path / "inbox", slow_job("too-long"))
    wait_running(worker, "too-long")
    assert worker.terminate(timeout=60) == 75
    assert read_record(tmp_path / "outputs", "too-long") is None
    # Back at the head of the queue, not counted as a crash: a restart runs it as a first attempt.
    assert (tmp_path / "inbox" / "too-long.json").exists()
    assert not list((tmp_path / "inbox" / "processing").glob("*too-long.json"))


def test_warm_up_finishes_before_the_worker_reports_ready(tmp_path, tiny_dir, worker_factory):
    config = write_config(tmp_path, tiny_dir, performance={"warmup": True, "warmup_sizes": ["64x64", "128x64"]})
    worker = worker_factory(config)
    log = worker.log()
    warmed = log.index("FLUX warmed up")
    assert "fast 64x64" in log[warmed:] and "fast 128x64" in log[warmed:]
    assert warmed < log.index("engine flux loaded") < log.index("worker ready")
    outputs = tmp_path / "outputs"
    drop(tmp_path / "inbox", small("after-warm-up"))
    assert wait_record(outputs, "after-warm-up")["status"] == "done"
