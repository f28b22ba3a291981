"""The Real-ESRGAN upscaler in-process, on the tiny random model and on a nearest-neighbour one.

The nearest-neighbour file is a real RRDBNet whose weights copy each pixel into a 4 x 4 block:
it makes exact checks possible (alpha, grayscale, tiling), where the random model only shows that
results are close.
"""

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import png_b64
from fluxworker.config import LimitsConfig
from fluxworker.engines import RunContext
from fluxworker.engines.esrgan import UpscaleEngine, tile_spans
from fluxworker.errors import JobError
from fluxworker.jobs import Job, JobSpec, parse_job
from fluxworker.tiny import build_esrgan_state_dict

UPSCALE = JobSpec(id="up", type="upscale")


def photo(width, height, seed=0):
    """Smooth gradients with noise: content on which tiles would show their seams."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx / width, yy / height, (xx + yy) / (width + height)], axis=2) * 200
    return (base + rng.normal(0, 20, (height, width, 3))).clip(0, 255).astype(np.uint8)


def nearest_state_dict(num_feat=16):
    """RRDBNet weights that upscale by copying pixels: the trunk is cut off by a zero conv_body,
    and the other convolutions pass channels 0..2 through their centre tap (inputs stay >= 0, so
    the leaky ReLUs pass them unchanged)."""
    state = build_esrgan_state_dict(num_feat=num_feat)
    for name in ("conv_first", "conv_body", "conv_up1", "conv_up2", "conv_hr", "conv_last"):
        state[f"{name}.weight"].zero_()
        state[f"{name}.bias"].zero_()
        if name != "conv_body":
            for channel in range(3):
                state[f"{name}.weight"][channel, channel, 1, 1] = 1.0
    return state


def upscaler(path, tile_size=512, tile_overlap=32, max_input_pixels=2048 * 2048):
    engine = UpscaleEngine(path, device="cpu", tile_size=tile_size, tile_overlap=tile_overlap,
                           max_input_pixels=max_input_pixels)
    engine.load()
    return engine


@pytest.fixture(scope="module")
def random_file(tiny_dir):
    return tiny_dir / "esrgan.pth"


@pytest.fixture(scope="module")
def nearest(tmp_path_factory):
    path = tmp_path_factory.mktemp("nearest") / "nearest.pth"
    torch.save({"params_ema": nearest_state_dict()}, path)
    return upscaler(path)


def run(engine, image):
    steps = []
    result = engine.run(Job(UPSCALE, image), RunContext(seed=None, progress=lambda s, n: steps.append((s, n))))
    return result.image, steps


def nearest_x4(array):
    return array.repeat(4, axis=0).repeat(4, axis=1)


def test_tile_spans_are_near_equal_and_cover_the_length():
    assert tile_spans(100, 512) == [(0, 100)]
    assert tile_spans(520, 512) == [(0, 260), (260, 520)]
    spans = tile_spans(1001, 256)
    assert spans[0][0] == 0 and spans[-1][1] == 1001 and len(spans) == 4
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    assert max(e - s for s, e in spans) - min(e - s for s, e in spans) <= 1


@pytest.mark.parametrize("size", [(37, 23), (1, 1), (64, 48)])
def test_output_is_exactly_four_times_the_input(random_file, size):
    image, _ = run(upscaler(random_file, tile_size=32, tile_overlap=8), Image.fromarray(photo(*size)))
    assert image.size == (size[0] * 4, size[1] * 4) and image.mode == "RGB"


def test_nearest_model_copies_each_pixel_into_a_block(nearest):
    array = photo(19, 13)
    image, _ = run(nearest, Image.fromarray(array))
    assert np.array_equal(np.asarray(image), nearest_x4(array))


def test_tiled_equals_untiled_within_a_small_tolerance(random_file):
    array = photo(96, 64)
    whole, steps_whole = run(upscaler(random_file, tile_size=512), Image.fromarray(array))
    tiled, steps_tiled = run(upscaler(random_file, tile_size=32, tile_overlap=24), Image.fromarray(array))
    whole, tiled = np.asarray(whole).astype(int), np.asarray(tiled).astype(int)
    assert whole.std() > 10  # the random model's output follows its input; it is not flat
    assert np.abs(whole - tiled).max() <= 2
    assert steps_whole == [(1, 1)]
    assert steps_tiled == [(n, 6) for n in range(1, 7)]  # 3 x 2 tiles


def test_without_overlap_the_tiles_show_seams(random_file):
    """The tolerance above is meaningful: the same tiles without borrowed context differ."""
    array = photo(96, 64)
    whole, _ = run(upscaler(random_file, tile_size=512), Image.fromarray(array))
    seamed, _ = run(upscaler(random_file, tile_size=32, tile_overlap=0), Image.fromarray(array))
    assert np.abs(np.asarray(whole).astype(int) - np.asarray(seamed).astype(int)).max() > 10


def test_rgba_stays_rgba_with_its_alpha_upscaled(nearest):
    rgb = photo(24, 16)
    alpha = np.zeros((16, 24), np.uint8)
    alpha[:, 12:] = 255
    alpha[4:8, 2:6] = 100
    image, steps = run(nearest, Image.fromarray(np.dstack([rgb, alpha]), "RGBA"))
    assert image.mode == "RGBA" and image.size == (96, 64)
    out = np.asarray(image)
    assert np.array_equal(out[:, :, 3], nearest_x4(alpha))
    assert np.array_equal(out[:, :, :3], nearest_x4(rgb))
    assert steps == [(1, 2), (2, 2)]  # the alpha channel is a second pass of the model


def test_a_constant_alpha_is_repeated_without_a_second_pass(random_file):
    rgba = Image.new("RGBA", (20, 12), (10, 200, 30, 77))
    image, steps = run(upscaler(random_file), rgba)
    assert image.mode == "RGBA" and image.size == (80, 48)
    assert image.getchannel("A").getextrema() == (77, 77)
    assert steps == [(1, 1)]


def test_grayscale_stays_grayscale(nearest):
    gray = photo(21, 11)[:, :, 0]
    image, _ = run(nearest, Image.fromarray(gray, "L"))
    assert image.mode == "L"
    assert np.array_equal(np.asarray(image), nearest_x4(gray))


def test_grayscale_with_alpha_and_sixteen_bit_inputs(nearest):
    la = Image.fromarray(np.dstack([photo(8, 8)[:, :, 0], np.full((8, 8), 9, np.uint8)]), "LA")
    assert run(nearest, la)[0].mode == "LA"
    sixteen = Image.fromarray(photo(8, 6)[:, :, 0].astype(np.uint16) * 257)
    assert sixteen.mode == "I;16"
    image, _ = run(nearest, sixteen)
    assert image.mode == "L" and np.array_equal(np.asarray(image), nearest_x4(photo(8, 6)[:, :, 0]))


def test_palette_images_with_and_without_transparency(nearest):
    palette = Image.fromarray(photo(16, 16)).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    image, _ = run(nearest, palette)
    assert image.mode == "RGB"
    assert np.array_equal(np.asarray(image), nearest_x4(np.asarray(palette.convert("RGB"))))
    palette.info["transparency"] = 0
    image, _ = run(nearest, palette)
    assert image.mode == "RGBA"
    assert np.array_equal(np.asarray(image), nearest_x4(np.asarray(palette.convert("RGBA"))))


def test_over_limit_inputs_are_rejected_by_the_engine(random_file):
    engine = upscaler(random_file, max_input_pixels=32 * 32)
    with pytest.raises(JobError) as caught:
        run(engine, Image.new("RGB", (33, 32)))
    assert (caught.value.code, caught.value.field) == ("image_too_large", "image")
    assert "limits.max_upscale_pixels" in caught.value.message
    assert run(engine, Image.new("RGB", (32, 32)))[0].size == (128, 128)


def test_over_limit_inputs_are_rejected_when_the_job_is_parsed():
    limits = LimitsConfig(max_upscale_pixels=64 * 64)
    with pytest.raises(JobError) as caught:
        parse_job({"type": "upscale", "image": png_b64((65, 64))}, limits)
    assert (caught.value.code, caught.value.field) == ("image_too_large", "image")
    assert parse_job({"type": "upscale", "image": png_b64((64, 64))}, limits).image.size == (64, 64)
    # The limit is for upscale inputs only.
    assert parse_job({"prompt": "x", "image": png_b64((65, 64))}, limits).image.size == (65, 64)


def test_gpu_out_of_memory_fails_the_job_and_the_engine_goes_on(random_file, monkeypatch):
    """No GPU here: the model call raises torch's out-of-memory error as CUDA would."""
    engine = upscaler(random_file, tile_size=16, tile_overlap=4)
    model = engine.model
    calls = []

    class OutOfMemoryOnce:
        def __getattr__(self, name):
            return getattr(model, name)

        def __call__(self, tensor):
            calls.append(tensor.shape)
            if len(calls) == 2:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return model(tensor)

    engine.model = OutOfMemoryOnce()
    with pytest.raises(JobError) as caught:
        run(engine, Image.fromarray(photo(32, 32)))
    assert caught.value.code == "out_of_memory" and "upscale.tile_size" in caught.value.message
    image, _ = run(engine, Image.fromarray(photo(32, 32)))
    assert image.size == (128, 128)
