"""The LaMa eraser in-process, on the real architecture with random weights (CPU, float32)."""

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import png_b64
from fluxworker.config import LimitsConfig
from fluxworker.engines import RunContext
from fluxworker.engines.lama import MASK_THRESHOLD, EraseEngine, binary_mask
from fluxworker.errors import JobError
from fluxworker.jobs import Job, JobSpec, parse_job

ERASE = JobSpec(id="erase", model="lama")


def photo(width, height, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


def rect_mask(size, box, value=255):
    mask = Image.new("L", size, 0)
    mask.paste(value, box)
    return mask


class Recording:
    """The loaded model, with the shapes of the images it is given."""

    def __init__(self, model):
        self.model = model
        self.shapes = []

    def __getattr__(self, name):
        return getattr(self.model, name)

    def __call__(self, image, mask):
        self.shapes.append(tuple(image.shape[2:]))
        return self.model(image, mask)


@pytest.fixture(scope="module")
def loaded(lama_file):
    engine = EraseEngine(lama_file, device="cpu", max_side=2048, crop_margin=256)
    engine.load()
    return engine.model


def eraser(loaded, max_side=2048, crop_margin=256):
    engine = EraseEngine("unused.pth", device="cpu", max_side=max_side, crop_margin=crop_margin)
    engine.model = Recording(loaded)
    return engine


def run(engine, image, mask):
    steps = []
    result = engine.run(Job(ERASE, image, mask), RunContext(seed=None, progress=lambda s, n: steps.append((s, n))))
    return result.image, steps


def assert_only_masked_pixels_change(before, after, erased):
    before, after = np.asarray(before), np.asarray(after)
    assert after.shape == before.shape
    assert np.array_equal(after[~erased], before[~erased])
    assert (after[erased] != before[erased]).any()


@pytest.mark.parametrize("size", [(64, 48), (37, 23), (13, 9), (101, 67)])
def test_outside_the_mask_every_pixel_is_identical_at_any_size(loaded, size):
    image = Image.fromarray(photo(*size))
    mask = rect_mask(size, (size[0] // 4, size[1] // 4, size[0] // 2 + 1, size[1] // 2 + 1))
    engine = eraser(loaded)
    out, steps = run(engine, image, mask)
    assert out.size == size and out.mode == "RGB"
    assert_only_masked_pixels_change(image, out, np.asarray(mask) > 0)
    assert engine.model.shapes == [(size[1], size[0])]
    assert steps == [(1, 1)]


def lama_job(image, mask):
    return parse_job({"model": "lama", "image": image, "mask": mask}, LimitsConfig())


@pytest.mark.parametrize("mode, color", [("RGB", (10, 20, 30)), ("RGBA", (10, 20, 30, 128)), ("L", 77)])
def test_a_one_pixel_image_is_erased_at_its_own_size(loaded, mode, color):
    """LaMa needs 16 x 16 pixels at least: the single pixel is padded up to it and cropped back."""
    job = lama_job(png_b64((1, 1), color=color, mode=mode), png_b64((1, 1), color=(255, 255, 255)))
    engine = eraser(loaded)
    result = engine.run(job, RunContext(seed=None))
    assert result.image.size == (1, 1) and result.image.mode == mode
    assert engine.model.shapes == [(1, 1)]
    if mode == "RGBA":
        assert result.image.getpixel((0, 0))[3] == 128  # a constant alpha is kept


def test_a_one_pixel_image_with_an_empty_mask_comes_back_unchanged(loaded):
    job = lama_job(png_b64((1, 1), color=(10, 20, 30)), png_b64((1, 1), color=(0, 0, 0)))
    engine = eraser(loaded)
    result = engine.run(job, RunContext(seed=None))
    assert result.image.size == (1, 1) and result.image.getpixel((0, 0)) == (10, 20, 30)
    assert engine.model.shapes == []


def test_a_one_pixel_mask_is_stretched_over_the_whole_image(loaded):
    job = lama_job(png_b64((40, 30)), png_b64((1, 1), color=(255, 255, 255)))
    engine = eraser(loaded)
    result = engine.run(job, RunContext(seed=None))
    assert result.image.size == (40, 30)
    assert engine.model.shapes == [(30, 40)]


def test_width_and_height_of_the_job_are_ignored(loaded):
    job = parse_job({"model": "lama", "image": png_b64((40, 30)), "mask": png_b64((40, 30), color=(255, 255, 255)),
                     "width": 512, "height": 256}, LimitsConfig())
    result = eraser(loaded).run(job, RunContext(seed=None))
    assert result.image.size == (40, 30)


def test_mask_is_binarised_at_the_documented_threshold(loaded):
    assert MASK_THRESHOLD == 128
    image = Image.fromarray(photo(48, 32))
    mask = rect_mask((48, 32), (0, 0, 24, 32), MASK_THRESHOLD - 1)
    mask.paste(MASK_THRESHOLD, (24, 0, 48, 16))
    out, _ = run(eraser(loaded), image, mask)
    erased = np.zeros((32, 48), bool)
    erased[0:16, 24:48] = True
    assert_only_masked_pixels_change(image, out, erased)


def test_a_mask_of_another_size_is_stretched_to_the_image():
    mask = rect_mask((10, 10), (0, 0, 5, 10))  # left half white
    erased = binary_mask(mask, (60, 20))
    assert erased.shape == (20, 60)
    assert erased[:, :29].all() and not erased[:, 31:].any()


def test_transparent_mask_pixels_count_as_white():
    mask = Image.new("RGBA", (8, 8), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (0, 0, 4, 8))
    erased = binary_mask(mask, (8, 8))
    assert erased[:, :4].all() and not erased[:, 4:].any()


def test_an_empty_mask_returns_the_image_without_running_the_model(loaded):
    image = Image.fromarray(photo(30, 20))
    engine = eraser(loaded)
    out, steps = run(engine, image, Image.new("L", (30, 20), MASK_THRESHOLD - 1))
    assert np.array_equal(np.asarray(out), np.asarray(image))
    assert engine.model.shapes == [] and steps == [(1, 1)]


def test_rgba_keeps_its_alpha_outside_the_mask_and_erases_it_inside(loaded):
    rgba = np.dstack([photo(40, 40), np.tile(np.linspace(0, 255, 40).astype(np.uint8), (40, 1))])
    image = Image.fromarray(rgba, "RGBA")
    mask = rect_mask((40, 40), (10, 10, 30, 30))
    engine = eraser(loaded)
    out, steps = run(engine, image, mask)
    assert out.mode == "RGBA"
    erased = np.asarray(mask) > 0
    assert np.array_equal(np.asarray(out)[~erased], rgba[~erased])
    assert steps == [(1, 2), (2, 2)] and len(engine.model.shapes) == 2


def test_a_constant_alpha_is_kept_as_is(loaded):
    rgba = np.dstack([photo(24, 24), np.full((24, 24), 200, np.uint8)])
    out, steps = run(eraser(loaded), Image.fromarray(rgba, "RGBA"), rect_mask((24, 24), (4, 4, 12, 12)))
    assert out.mode == "RGBA" and out.getchannel("A").getextrema() == (200, 200)
    assert steps == [(1, 1)]


def test_grayscale_stays_grayscale(loaded):
    gray = Image.fromarray(photo(33, 21)[:, :, 0], "L")
    mask = rect_mask((33, 21), (5, 5, 15, 15))
    out, _ = run(eraser(loaded), gray, mask)
    assert out.mode == "L"
    assert_only_masked_pixels_change(gray, out, np.asarray(mask) > 0)


def test_a_large_image_is_cropped_around_the_mask(loaded):
    image = Image.fromarray(photo(200, 120))
    mask = rect_mask((200, 120), (150, 20, 170, 40))
    engine = eraser(loaded, max_side=64, crop_margin=8)
    out, _ = run(engine, image, mask)
    assert out.size == (200, 120)
    assert engine.model.shapes == [(36, 36)]  # the 20 x 20 box and 8 pixels around it
    assert_only_masked_pixels_change(image, out, np.asarray(mask) > 0)


def test_a_crop_still_too_large_is_scaled_down_for_lama(loaded):
    image = Image.fromarray(photo(200, 120))
    mask = rect_mask((200, 120), (10, 10, 190, 110))
    engine = eraser(loaded, max_side=64, crop_margin=8)
    out, _ = run(engine, image, mask)
    assert out.size == (200, 120)
    (height, width), = engine.model.shapes
    assert max(height, width) == 64
    assert_only_masked_pixels_change(image, out, np.asarray(mask) > 0)


def test_gpu_out_of_memory_fails_the_job_and_the_engine_goes_on(loaded):
    """No GPU here: the model call raises torch's out-of-memory error as CUDA would."""

    class OutOfMemoryOnce(Recording):
        def __call__(self, image, mask):
            if not self.shapes:
                self.shapes.append(None)
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")
            return super().__call__(image, mask)

    engine = eraser(loaded)
    engine.model = OutOfMemoryOnce(loaded)
    image, mask = Image.fromarray(photo(24, 24)), rect_mask((24, 24), (4, 4, 12, 12))
    with pytest.raises(JobError) as caught:
        run(engine, image, mask)
    assert caught.value.code == "out_of_memory" and "erase.max_side" in caught.value.message
    assert run(engine, image, mask)[0].size == (24, 24)
    assert engine.model.shapes == [None, (24, 24)]
