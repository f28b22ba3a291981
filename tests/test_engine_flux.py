"""The FLUX engine in-process on the tiny real diffusers model (CPU, float32).

The performance tests run the GPU-side code (placement, streaming, speed-ups, compilation) on the
CPU with ``accelerated=True``; only what CUDA itself does (side-stream copies, page-locked memory,
generated kernels) is left to the GPU benchmark.
"""

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import png_b64, streaming_performance, tiny_flux_pipeline
from fluxworker.config import DEFAULT_NO_TEXT_SUFFIX, LimitsConfig, PerformanceConfig
from fluxworker.engines import RunContext
from fluxworker.engines.flux import FluxEngine, fit, fit_mask
from fluxworker.engines.prompts import PromptCache
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


@pytest.mark.parametrize("mask", [None, png_b64((1, 1), color=(255, 255, 255))], ids=["img2img", "inpaint"])
def test_a_one_pixel_image_is_fitted_to_the_requested_size(engine, mask):
    result, steps = run(engine, image=png_b64((1, 1), color=(10, 200, 30)), mask=mask, width=128, height=64,
                        strength=1.0, num_inference_steps=2)
    assert result.image.size == (128, 64) and result.image.mode == "RGB"
    assert steps[-1] == (2, 2)
    fitted = fit(Image.new("RGB", (1, 1), (10, 200, 30)), (128, 64), Image.Resampling.LANCZOS)
    assert fitted.size == (128, 64) and fitted.getcolors() == [(128 * 64, (10, 200, 30))]


def test_a_one_pixel_mask_is_stretched_over_the_whole_image(engine):
    result, _ = run(engine, image=png_b64((64, 64)), mask=png_b64((1, 1), color=(255, 255, 255)), strength=1.0)
    assert result.image.size == (64, 64)
    assert fit_mask(Image.new("L", (1, 1), 255), (64, 64), (64, 64)).getextrema() == (255, 255)


def test_a_mask_of_another_shape_stays_aligned_with_its_image():
    """A 200x100 image fitted to 64x64 loses its left and right quarters. A square mask marking
    the image's left quarter (stretched onto the image) marks only what was cropped away."""
    mask = Image.new("L", (100, 100), 0)
    mask.paste(255, (0, 0, 25, 100))
    fitted = fit_mask(mask, (200, 100), (64, 64))
    assert fitted.size == (64, 64) and fitted.getextrema()[1] < 128  # the pipeline binarises at half
    same_shape = Image.new("L", (200, 100), 0)
    same_shape.paste(255, (50, 0, 100, 100))  # the second quarter: the left half of what is kept
    kept = fit_mask(same_shape, (200, 100), (64, 64))
    assert kept.getpixel((8, 32)) > 128 and kept.getpixel((56, 32)) < 128


def test_no_text_still_fits_after_a_prompt_longer_than_t5_reads(engine):
    long_prompt = " ".join(["a lighthouse on a cliff above a stormy sea"] * 60)  # about 2,600 characters
    job = parse_job({"prompt": long_prompt, "no_text": True}, LimitsConfig(max_prompt_length=5000))
    prompt = engine.prompt_for(job)
    assert prompt.endswith(f" {DEFAULT_NO_TEXT_SUFFIX}")
    tokenizer = engine.pipes["text2img"].tokenizer_2
    assert len(tokenizer(prompt).input_ids) <= engine.max_sequence_length  # the constraint is not cut off


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


# -- the performance settings --------------------------------------------------------------------

def images(engine, *jobs, seed=4):
    """PNG bytes of each (fields) job, in order."""
    return [png_bytes(run(engine, seed=seed, **fields)[0].image) for fields in jobs]


def test_on_the_cpu_the_gpu_features_stay_off_by_default(engine):
    assert engine.placement is None and engine.tuned == [] and not engine.compiled
    assert engine.mode == "fast"


def test_every_module_keeps_the_configured_dtype(tiny_dir):
    # A GPU runs bfloat16; building the img2img and inpaint pipelines over the loaded one once cast
    # the shared modules to float32 (twice the memory, several times slower), which float32 on the
    # CPU cannot show. bfloat16 on the CPU can.
    half = FluxEngine(str(tiny_dir / "flux"), device="cpu", dtype=torch.bfloat16, no_text_suffix="")
    half.load()
    try:
        run(half, width=64, height=64, num_inference_steps=1)
        run(half, image=png_b64(), strength=0.5, num_inference_steps=2)
        for name, pipe in half.pipes.items():
            for component, module in pipe.components.items():
                if isinstance(module, torch.nn.Module):
                    dtypes = {p.dtype for p in module.parameters()}
                    assert dtypes == {torch.bfloat16}, (name, component, dtypes)
    finally:
        half.close()


def test_an_engine_over_a_pipeline_in_memory_matches_one_loaded_from_disk(engine, tiny_dir):
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(str(tiny_dir / "flux"), dtype=torch.float32)
    in_memory = FluxEngine.from_pipeline(pipe, device="cpu", dtype=torch.float32)
    job = dict(prompt="a blue sphere", width=64, height=128)
    assert images(in_memory, job) == images(engine, job)
    assert in_memory.ref.startswith("<FluxPipeline")


def test_a_cached_prompt_makes_the_image_its_text_makes(engine, tiny_dir):
    uncached = FluxEngine(str(tiny_dir / "flux"), device="cpu", dtype=torch.float32, no_text_suffix="x",
                          performance=PerformanceConfig(prompt_cache=0))
    uncached.load()
    job = dict(prompt="a green cone")
    hits = engine.prompts.hits
    first, again = images(engine, job, job)
    assert first == again == images(uncached, job)[0]
    assert engine.prompts.hits == hits + 1
    assert uncached.prompts.hits == 0 and len(uncached.prompts) == 0


def test_the_prompt_cache_keeps_the_most_recently_used():
    cache = PromptCache(2)
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1  # a is now the most recent
    cache.put("c", 3)
    assert cache.get("b") is None and cache.get("a") == 1 and cache.get("c") == 3


def test_fast_and_balanced_make_identical_images_and_only_a_mode_change_moves_weights():
    plain = FluxEngine.from_pipeline(tiny_flux_pipeline(), device="cpu", dtype=torch.float32)
    pipe = tiny_flux_pipeline()
    placed = FluxEngine.from_pipeline(pipe, device="cpu", dtype=torch.float32, accelerated=True,
                                      performance=streaming_performance(pipe))
    assert placed.mode == "balanced"  # the start mode
    assert placed.placement.plan.transformer_streamed and placed.placement.plan.encoder_streamed
    fast, balanced = dict(performance_mode="fast"), dict(performance_mode="balanced")
    expected = images(plain, fast)[0]
    assert images(placed, balanced, balanced, fast, fast, balanced) == [expected] * 5
    moves = [(s["from"], s["to"]) for s in placed.placement.switches]
    assert moves == [(None, "balanced"), ("balanced", "fast"), ("fast", "balanced")]
    assert all(s.misses == 0 for s in placed.placement.streamers)


def test_the_speed_ups_stay_within_rounding_of_the_plain_engine():
    plain = FluxEngine.from_pipeline(tiny_flux_pipeline(), device="cpu", dtype=torch.float32)
    pipe = tiny_flux_pipeline()
    tuned = FluxEngine.from_pipeline(pipe, device="cpu", dtype=torch.float32, accelerated=True,
                                     performance=streaming_performance(pipe, fuse_qkv=True, vae_channels_last=True))
    assert any(name.startswith("fused qkv") for name in tuned.tuned) and "VAE channels_last" in tuned.tuned
    attention = pipe.transformer.transformer_blocks[0]
    attention = getattr(attention, "inner", attention).attn
    assert attention.fused_projections and not hasattr(attention, "to_q")  # the unfused copies are gone
    a = np.asarray(run(plain, seed=9)[0].image, dtype=int)
    b = np.asarray(run(tuned, seed=9)[0].image, dtype=int)
    assert np.abs(a - b).max() <= 2


def test_warm_up_runs_inside_load_for_every_configured_size(tiny_dir, engine):
    warm = FluxEngine(str(tiny_dir / "flux"), device="cpu", dtype=torch.float32, no_text_suffix=DEFAULT_NO_TEXT_SUFFIX,
                      performance=PerformanceConfig(warmup=True, warmup_sizes=["64x64", "128x64"]))
    warm.load()
    assert set(warm.warmup_seconds) == {"fast 64x64", "fast 128x64"}
    job = dict(prompt="a red cube", width=128, height=64)
    assert images(warm, job) == images(engine, job)  # warming up changes no later image


def test_compiled_blocks_warm_up_in_fast_mode_and_jobs_of_those_sizes_compile_nothing():
    # The eager backend traces the blocks exactly as inductor would, without generating kernels,
    # which is what a CPU can check; kernel generation and its disk cache need the GPU benchmark.
    from torch._dynamo.utils import counters

    from fluxworker.engines.tuning import uncompile_blocks

    plain = FluxEngine.from_pipeline(tiny_flux_pipeline(), device="cpu", dtype=torch.float32)
    pipe = tiny_flux_pipeline()
    compiled = FluxEngine.from_pipeline(
        pipe, device="cpu", dtype=torch.float32, accelerated=True, compile_backend="eager",
        performance=streaming_performance(pipe, compile=True, warmup_sizes=["64x64"]))
    try:
        assert set(compiled.warmup_seconds) == {"fast 64x64", "balanced 64x64"} and compiled.mode == "balanced"
        graphs = counters["stats"]["unique_graphs"]
        jobs = [dict(performance_mode="fast"), dict(performance_mode="balanced"), dict(performance_mode="fast")]
        assert images(compiled, *jobs) == images(plain, *jobs)
        assert counters["stats"]["unique_graphs"] == graphs
    finally:
        uncompile_blocks(pipe.transformer)


def test_after_two_warm_up_sizes_a_third_size_compiles_nothing():
    # The second size makes PyTorch mark the image's dimensions dynamic; the graph it compiles
    # then fits other sizes too. Traced with the eager backend, as the test above explains.
    from torch._dynamo.utils import counters

    from fluxworker.engines.tuning import uncompile_blocks

    pipe = tiny_flux_pipeline()
    compiled = FluxEngine.from_pipeline(
        pipe, device="cpu", dtype=torch.float32, accelerated=True, compile_backend="eager",
        performance=streaming_performance(pipe, compile=True, start_mode="fast", warmup_sizes=["64x64", "128x64"]))
    try:
        graphs = counters["stats"]["unique_graphs"]
        run(compiled, width=128, height=192, performance_mode="fast")
        assert counters["stats"]["unique_graphs"] == graphs
    finally:
        uncompile_blocks(pipe.transformer)


def test_a_compiler_that_fails_leaves_the_engine_running_uncompiled(caplog):
    # What a machine without a C compiler does to Triton, told by a backend that raises.
    def broken(graph, example_inputs):
        raise RuntimeError("Failed to find C compiler. Please specify via CC environment variable.")

    plain = FluxEngine.from_pipeline(tiny_flux_pipeline(), device="cpu", dtype=torch.float32)
    pipe = tiny_flux_pipeline()
    with caplog.at_level("WARNING", logger="fluxworker.engines.flux"):
        fallback = FluxEngine.from_pipeline(
            pipe, device="cpu", dtype=torch.float32, accelerated=True, compile_backend=broken,
            performance=streaming_performance(pipe, compile=True, warmup_sizes=["64x64"]))
    assert not fallback.compiled and "Failed to find C compiler" in fallback.compile_error
    assert fallback.pixel_settings == {"fp8_storage": False, "compile": False}
    assert "run uncompiled" in caplog.text and "build-essential" in caplog.text
    assert set(fallback.warmup_seconds) == {"balanced 64x64"}
    jobs = [dict(performance_mode="fast"), dict(performance_mode="balanced")]
    assert images(fallback, *jobs) == images(plain, *jobs)


def test_closing_takes_the_stand_ins_out_and_frees_the_pipelines():
    pipe = tiny_flux_pipeline()
    placed = FluxEngine.from_pipeline(pipe, device="cpu", dtype=torch.float32, accelerated=True,
                                      performance=streaming_performance(pipe))
    placed.close()
    assert placed.pipes == {} and placed.placement is None
    assert not any(type(m).__name__ == "_StreamedBlock" for m in pipe.transformer.modules())
