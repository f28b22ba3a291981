"""The engine set: what loads when, what is freed when idle, and the errors for missing engines."""

import shutil

import pytest

from fluxworker.config import parse_config
from fluxworker.engines import EngineSet, build_engines
from fluxworker.engines.esrgan import UpscaleEngine
from fluxworker.engines.lama import EraseEngine
from fluxworker.errors import JobError


def upscaler(path):
    return UpscaleEngine(path, device="cpu", tile_size=64, tile_overlap=8, max_input_pixels=1 << 20)


def engine_set(path, **options):
    return EngineSet({"esrgan": upscaler(path)}, on_demand=frozenset({"esrgan"}), **options)


def test_by_default_engines_load_at_start_and_stay_resident(tiny_dir):
    engines = engine_set(tiny_dir / "esrgan.pth")
    engines.load()
    engine = engines.engines["esrgan"]
    assert engines.loaded == {"esrgan"} and engine.model is not None
    assert engines.get("esrgan") is engine
    engines.maintain(now=1e12)
    assert engine.model is not None


def test_lazy_engines_load_on_their_first_job(tiny_dir):
    engines = engine_set(tiny_dir / "esrgan.pth", lazy=True)
    engines.load()
    engine = engines.engines["esrgan"]
    assert engines.loaded == set() and engine.model is None
    assert engines.get("esrgan") is engine
    assert engines.loaded == {"esrgan"} and engine.model is not None


def test_idle_engines_are_freed_and_load_again_when_needed(tiny_dir):
    engines = engine_set(tiny_dir / "esrgan.pth", unload_after=60.0)
    engines.load()
    engine = engines.engines["esrgan"]
    engines.get("esrgan")
    engines.maintain(now=1000.0)  # the job handed out ends: its idle time starts now
    engines.maintain(now=1059.0)
    assert engine.model is not None
    engines.maintain(now=1060.0)
    assert engines.loaded == set() and engine.model is None
    assert engines.get("esrgan").model is not None


def test_a_long_job_does_not_count_as_idle_time(tiny_dir):
    engines = engine_set(tiny_dir / "esrgan.pth", unload_after=1.0)
    engines.load()
    engines.get("esrgan")
    # maintain runs between jobs only; the first call after the job stamps its end.
    engines.maintain(now=10_000_000.0)
    assert engines.loaded == {"esrgan"}


def test_engines_outside_on_demand_are_never_freed(tiny_dir):
    engines = EngineSet({"esrgan": upscaler(tiny_dir / "esrgan.pth")}, unload_after=1.0)
    engines.load()
    engines.maintain(now=1e12)
    assert engines.loaded == {"esrgan"}


def test_a_file_that_fails_at_start_leaves_the_set_with_its_reason(tmp_path, lama_file):
    missing = tmp_path / "RealESRGAN_x4plus.pth"
    engines = EngineSet(
        {"esrgan": upscaler(missing), "lama": EraseEngine(lama_file, device="cpu", max_side=64, crop_margin=16)},
        on_demand=frozenset({"esrgan", "lama"}),
    )
    engines.load()
    assert set(engines.engines) == {"lama"}
    with pytest.raises(JobError) as caught:
        engines.get("esrgan")
    error = caught.value
    assert error.code == "engine_unavailable" and error.field is None
    assert f"models.esrgan: {missing}: file not found" in error.message
    assert engines.get("lama").model is not None


def test_a_lazy_engine_whose_file_fails_is_tried_again_on_the_next_job(tmp_path, tiny_dir):
    path = tmp_path / "esrgan.pth"
    engines = engine_set(path, lazy=True)
    engines.load()
    with pytest.raises(JobError) as caught:
        engines.get("esrgan")
    assert caught.value.code == "engine_unavailable"
    assert f"models.esrgan: {path}: file not found" in caught.value.message
    shutil.copy(tiny_dir / "esrgan.pth", path)
    assert engines.get("esrgan").model is not None


def test_unconfigured_engines_name_their_config_key(tmp_path):
    engines = build_engines(parse_config({"models": {"flux": "./flux", "device": "cpu"}}, tmp_path))
    assert set(engines.engines) == {"flux"}
    with pytest.raises(JobError) as caught:
        engines.get("lama")
    assert (caught.value.code, caught.value.field) == ("engine_unavailable", "model")
    assert "models.lama is not configured" in caught.value.message
    with pytest.raises(JobError, match="models.esrgan is not configured"):
        engines.get("esrgan")


def test_configured_engines_take_their_settings_from_the_config(tmp_path):
    config = parse_config({
        "models": {"flux": "./flux", "device": "cpu", "esrgan": "w/x4.pth", "lama": "w/big-lama.pt",
                   "lazy_load": True, "unload_after": 30},
        "upscale": {"tile_size": 256, "tile_overlap": 16},
        "erase": {"max_side": 1024, "crop_margin": 64},
        "limits": {"max_upscale_pixels": 1_000_000},
    }, tmp_path)
    engines = build_engines(config)
    esrgan, lama = engines.engines["esrgan"], engines.engines["lama"]
    assert esrgan.path == tmp_path / "w" / "x4.pth" and lama.path == tmp_path / "w" / "big-lama.pt"
    assert (esrgan.tile_size, esrgan.tile_overlap, esrgan.max_input_pixels) == (256, 16, 1_000_000)
    assert (lama.max_side, lama.crop_margin) == (1024, 64)
    assert engines.lazy and engines.unload_after == 30 and engines.on_demand == {"esrgan", "lama"}
