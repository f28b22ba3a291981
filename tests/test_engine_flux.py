"""The FLUX engine in-process on the tiny real diffusers model (CPU, float32)."""

import pytest
import torch
from PIL import Image

from conftest import png_b64
from fluxworker.config import DEFAULT_NO_TEXT_SUFFIX, LimitsConfig
from fluxworker.engines import RunContext
from fluxworker.engines.flux import FluxEngine, fit
from fluxworker.errors import JobError
from fluxworker.images import png_bytes
from fluxworker.jobs import parse_job


@pytest.fixture(scope="module")
def engine(tiny_dir):
    engine = FluxEngine(str(tiny_dir / "flux"), device="cpu", dtype=torch.float32,
                        no_text_suffix=DEFAULT_NO_TEXT_SUFFIX)
    engine.load()
    yield engine
    engine.close()


def run(engine, seed=1, **fields):
    job = parse_job({"prompt": "a red cube", "width": 64, "height": 64, **fields}, LimitsConfig())
    steps = []
    result = engine.run(job, RunContext(seed=seed, progress=lambda s, n: steps.append((s, n))))
    return result, steps


def test_text_to_image_has_the_requested_size_and_reports_progress(engine):
    result, steps = run(engine, width=128, height=64, num_inference_steps=3)
    assert result.image.size == (128, 64)
    assert result.image.mode == "RGB"
    assert steps == [(1, 3), (2, 3), (3, 3)]


def test_same_seed_gives_identical_bytes_and_another_seed_differs(engine):
    first = png_bytes(run(engine, seed=42)[0].image)
    again = png_bytes(run(engine, seed=42)[0].image)
    other = png_bytes(run(engine, seed=43)[0].image)
    assert first == again
    assert first != other


def test_image_to_image_fits_the_input_to_the_requested_size(engine):
    result, steps = run(engine, image=png_b64((200, 90)), width=64, height=128, strength=0.5)
    assert result.image.size == (64, 128)
    assert steps[-1] == (2, 2)  # strength 0.5 of 4 steps


def test_inpainting_runs_with_a_mask_of_another_size(engine):
    result, _ = run(engine, image=png_b64((64, 64)), mask=png_b64((32, 32), color=(255, 255, 255)),
                    width=64, height=64, strength=1.0)
    assert result.image.size == (64, 64)


def test_img2img_is_reproducible_too(engine):
    fields = dict(image=png_b64((64, 64), color=(1, 2, 3)), strength=0.8)
    assert png_bytes(run(engine, seed=5, **fields)[0].image) == png_bytes(run(engine, seed=5, **fields)[0].image)


def test_no_text_appends_the_documented_constraint(engine):
    job = parse_job({"prompt": "a shop front ", "no_text": True}, LimitsConfig())
    assert engine.prompt_for(job) == f"a shop front {DEFAULT_NO_TEXT_SUFFIX}"
    plain = parse_job({"prompt": "a shop front"}, LimitsConfig())
    assert engine.prompt_for(plain) == "a shop front"
    with_text = png_bytes(run(engine, seed=3, no_text=True)[0].image)
    without = png_bytes(run(engine, seed=3)[0].image)
    assert with_text != without


def test_fit_covers_and_crops_the_centre():
    image = Image.new("RGB", (300, 100), (0, 0, 0))
    image.paste((255, 255, 255), (100, 0, 200, 100))  # white centre third
    fitted = fit(image, (64, 64), Image.Resampling.NEAREST)
    assert fitted.size == (64, 64)
    assert fitted.getpixel((32, 32)) == (255, 255, 255)
    assert fitted.getpixel((1, 32)) == (255, 255, 255)  # the black sides were cropped away


def test_missing_model_folder_is_a_clear_error(tmp_path):
    engine = FluxEngine(str(tmp_path / "nothing"), device="cpu", dtype=torch.float32, no_text_suffix="x")
    with pytest.raises(JobError) as caught:
        engine.load()
    assert caught.value.code == "model_not_found"
    assert "models.flux" in caught.value.message and str(tmp_path / "nothing") in caught.value.message
