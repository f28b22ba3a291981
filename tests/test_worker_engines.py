"""Upscale and erase jobs end to end: real worker subprocesses, real folders, the tiny Real-ESRGAN
and a random-weight LaMa of the real architecture, on the CPU."""

import base64
import io
import os

import numpy as np
import pytest
from PIL import Image

from conftest import WorkerProcess, drop, png_b64, wait_for, wait_record, write_config


def data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def photo(width, height, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def engines_worker(tmp_path_factory, tiny_dir, lama_file):
    folder = tmp_path_factory.mktemp("engines")
    config = write_config(folder, tiny_dir, models={"esrgan": str(tiny_dir / "esrgan.pth"), "lama": str(lama_file)},
                          limits={"max_upscale_pixels": 64 * 64})
    worker = WorkerProcess(config).start()
    yield worker
    worker.kill()


def test_an_upscale_job_through_the_inbox(engines_worker):
    outputs = engines_worker.folder / "outputs"
    rgba = Image.fromarray(np.dstack([photo(24, 16), np.full((16, 24), 180, np.uint8)]), "RGBA")
    drop(engines_worker.folder / "inbox", {"id": "up-1", "type": "upscale", "image": data_url(rgba)})
    record = wait_record(outputs, "up-1")
    assert record["status"] == "done", record
    assert record["type"] == "upscale" and record["model"] == "esrgan" and record["seed"] is None
    assert record["url"] == "/outputs/upscale_up-1.png" and record["file"] == "upscale_up-1.png"
    assert (record["width"], record["height"]) == (96, 64)
    image = Image.open(outputs / "upscale_up-1.png")
    assert image.size == (96, 64) and image.mode == "RGBA"
    assert image.getchannel("A").getextrema() == (180, 180)


def test_a_lama_job_through_the_inbox(engines_worker):
    outputs = engines_worker.folder / "outputs"
    array = photo(45, 31)
    mask = Image.new("L", (45, 31), 0)
    mask.paste(255, (10, 8, 30, 20))
    drop(engines_worker.folder / "inbox",
         {"id": "erase-1", "model": "lama", "image": data_url(Image.fromarray(array)), "mask": data_url(mask)})
    record = wait_record(outputs, "erase-1")
    assert record["status"] == "done", record
    assert record["type"] == "generate" and record["model"] == "lama"
    assert isinstance(record["seed"], int)  # drawn and echoed like every generate job's; the eraser ignores it
    assert record["url"] == "/outputs/erase-1.png"
    assert (record["width"], record["height"]) == (45, 31)
    out = np.asarray(Image.open(outputs / "erase-1.png"))
    erased = np.asarray(mask) > 0
    assert np.array_equal(out[~erased], array[~erased])
    assert (out[erased] != array[erased]).any()


def test_an_upscale_over_the_limit_is_refused(engines_worker):
    drop(engines_worker.folder / "inbox", {"id": "up-big", "type": "upscale", "image": png_b64((65, 64))})
    record = wait_record(engines_worker.folder / "outputs", "up-big")
    assert record["status"] == "failed"
    assert (record["error"]["code"], record["error"]["field"]) == ("image_too_large", "image")


def test_a_lama_job_without_a_mask_is_refused(engines_worker):
    drop(engines_worker.folder / "inbox", {"id": "erase-nomask", "model": "lama", "image": png_b64((32, 32))})
    record = wait_record(engines_worker.folder / "outputs", "erase-nomask")
    assert record["status"] == "failed"
    assert (record["error"]["code"], record["error"]["field"]) == ("missing_field", "mask")


def test_bad_weight_files_fail_their_jobs_and_the_worker_serves_the_rest(tmp_path, tiny_dir, worker_factory):
    corrupt = tmp_path / "weights" / "RealESRGAN_x4plus.pth"
    corrupt.parent.mkdir()
    corrupt.write_bytes(os.urandom(2048))
    missing = tmp_path / "weights" / "big-lama.pt"
    config = write_config(tmp_path, tiny_dir, models={"esrgan": str(corrupt), "lama": str(missing)})
    worker = worker_factory(config)
    status = worker.status()
    assert "models.esrgan" in status["unavailable"]["esrgan"] and "models.lama" in status["unavailable"]["lama"]
    assert status["ready"] is False  # configured models failed: /ready answers 503 until they are fixed
    assert "worker started without esrgan" in worker.log()

    inbox, outputs = tmp_path / "inbox", tmp_path / "outputs"
    drop(inbox, {"id": "up", "type": "upscale", "image": png_b64((16, 16))})
    drop(inbox, {"id": "erase", "model": "lama", "image": png_b64((16, 16)), "mask": png_b64((16, 16))})
    drop(inbox, {"id": "flux", "prompt": "still serving", "width": 64, "height": 64, "seed": 1})
    up, erase, flux = (wait_record(outputs, job_id) for job_id in ("up", "erase", "flux"))
    assert up["status"] == "failed" and up["error"]["code"] == "engine_unavailable"
    assert f"models.esrgan: {corrupt}: cannot read the weights" in up["error"]["message"]
    assert erase["status"] == "failed" and erase["error"]["field"] == "model"
    assert f"models.lama: {missing}: file not found" in erase["error"]["message"]
    assert flux["status"] == "done", flux
    assert worker.proc.poll() is None


def test_lazy_engines_load_on_first_use_and_are_freed_when_idle(tmp_path, tiny_dir, worker_factory):
    config = write_config(tmp_path, tiny_dir, models={"esrgan": str(tiny_dir / "esrgan.pth"), "lazy_load": True,
                                                      "unload_after": 1.0},
                          inbox={"scan_interval": 0.2})
    worker = worker_factory(config)
    assert "engine esrgan loads on its first job" in worker.log()
    assert "engine esrgan loaded" not in worker.log()
    inbox, outputs = tmp_path / "inbox", tmp_path / "outputs"
    drop(inbox, {"id": "lazy-1", "type": "upscale", "image": png_b64((8, 8))})
    assert wait_record(outputs, "lazy-1")["status"] == "done"
    wait_for(lambda: "engine esrgan unloaded" in worker.log(), timeout=30, what="idle unload")
    drop(inbox, {"id": "lazy-2", "type": "upscale", "image": png_b64((8, 8))})
    assert wait_record(outputs, "lazy-2")["status"] == "done"
    assert worker.log().count("engine esrgan loaded") == 2
