"""FLUX.1-schnell through diffusers: text-to-image, image-to-image and inpainting.

The three pipelines share one set of loaded modules (``from_pipe``), so switching job types never
reloads weights. Noise comes from a CPU ``torch.Generator`` seeded per job, so a seed and the same
parameters give the same image. Prompt embeddings are kept for reuse (``performance.prompt_cache``).

On CUDA the engine applies the ``performance`` section at load: speed-ups that keep bfloat16
numerics (:mod:`.tuning`), the weights' layout for each ``performance_mode`` (:mod:`.placement`):
``fast`` keeps every weight on the GPU, ``balanced`` stays under a memory budget by streaming
blocks from host memory. A job that asks for the other mode than the previous one moves the
streamed blocks once. Compilation and warm-up, when configured, run inside :meth:`FluxEngine.load`,
so the worker reports ready only after them. On the CPU none of this applies unless asked for
(``accelerated=True``, which the benchmark's smoke run and the tests use).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Callable

from PIL import Image, ImageOps

from ..config import DEFAULT_NO_TEXT_SUFFIX, PerformanceConfig, looks_like_path
from ..errors import JobError
from ..images import to_mask, to_rgb
from ..jobs import Job
from . import Engine, Result, RunContext
from .memory import free_memory, guard_out_of_memory
from .prompts import PromptCache

log = logging.getLogger(__name__)

GUIDANCE_SCALE = 0.0  # schnell is guidance-distilled: guidance is off
MAX_SEQUENCE_LENGTH = 256  # schnell's prompt length in T5 tokens
WARMUP_STEPS = 1  # shapes, not steps, decide what compiles and what the GPU libraries set up
GIB = 2**30


class FluxEngine(Engine):
    name = "flux"

    def __init__(self, ref: str, *, device: str, dtype, no_text_suffix: str, allow_download: bool = False,
                 performance: PerformanceConfig | None = None, accelerated: bool | None = None,
                 compile_backend: str | Callable = "inductor"):
        self.ref = ref
        self.device = device
        self.dtype = dtype
        self.no_text_suffix = no_text_suffix
        self.allow_download = allow_download
        self.performance = performance or PerformanceConfig()
        # The GPU-side features (speed-ups, placement, compilation) are for CUDA; True turns them
        # on for any device, so that the CPU can run the same code with tiny models.
        self.accelerated = device == "cuda" if accelerated is None else accelerated
        self.compile_backend = compile_backend
        self.max_sequence_length = MAX_SEQUENCE_LENGTH
        self.pipes: dict[str, object] = {}
        self.placement = None
        self.prompts = PromptCache(self.performance.prompt_cache)
        self.tuned: list[str] = []
        self.compiled = False
        self.compile_error: str | None = None  # why compilation was given up, when it was
        self.warmup_seconds: dict[str, float] = {}

    @classmethod
    def from_pipeline(cls, pipe, *, device: str, dtype, no_text_suffix: str = DEFAULT_NO_TEXT_SUFFIX,
                      **options) -> "FluxEngine":
        """An engine over a FluxPipeline already in memory, prepared exactly as :meth:`load` prepares
        the one it reads (speed-ups, placement, compilation, warm-up)."""
        engine = cls(f"<{type(pipe).__name__} in memory>", device=device, dtype=dtype,
                     no_text_suffix=no_text_suffix, **options)
        engine.prepare(pipe)
        return engine

    def load(self) -> None:
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        from diffusers import FluxPipeline
        from diffusers.utils import logging as dlogging

        dlogging.disable_progress_bar()  # a service's log is not a terminal
        if looks_like_path(self.ref) and not Path(self.ref, "model_index.json").is_file():
            raise JobError(
                "model_not_found",
                f"models.flux: {self.ref} is not a diffusers model folder (no model_index.json)",
                "model",
            )
        try:
            base = FluxPipeline.from_pretrained(
                self.ref, dtype=self.dtype, local_files_only=not self.allow_download
            )
        except (OSError, ValueError) as exc:
            hint = "" if self.allow_download else " (downloads are off: set models.allow_download)"
            raise JobError("model_not_found", f"models.flux: cannot load {self.ref}: {exc}{hint}", "model") from None
        self.prepare(base)

    def prepare(self, base) -> None:
        """Build the three pipelines over ``base``'s modules, apply the performance settings, and warm up."""
        from diffusers import FluxImg2ImgPipeline, FluxInpaintPipeline
        from diffusers.utils import logging as dlogging

        dlogging.disable_progress_bar()
        # from_pipe casts the shared modules to its dtype argument, float32 when none is given:
        # pass the engine's. It also warns about float32 modules even when there are none, so
        # it is quieted for these two calls only.
        verbosity = dlogging.get_verbosity()
        dlogging.set_verbosity_error()
        try:
            self.pipes = {
                "text2img": base,
                "img2img": FluxImg2ImgPipeline.from_pipe(base, dtype=self.dtype),
                "inpaint": FluxInpaintPipeline.from_pipe(base, dtype=self.dtype),
            }
        finally:
            dlogging.set_verbosity(verbosity)
        for pipe in self.pipes.values():
            pipe.set_progress_bar_config(disable=True)
        performance = self.performance
        if self.accelerated:
            from . import tuning
            from .placement import Placement, plan_balanced

            self.tuned = tuning.apply(base, performance, self.device, self.dtype)
            plan = plan_balanced(base, int(performance.balanced_vram_gib * GIB),
                                 int(performance.balanced_reserve_gib * GIB))
            self.placement = Placement(base, self.device, plan, pin=self.device == "cuda")
            self.placement.use(performance.start_mode)
            if performance.compiles(self.device):
                if self.compile_backend == "inductor":
                    log.info("compiled kernels are kept in %s", tuning.use_compile_cache(performance.compile_cache))
                tuning.compile_blocks(base.transformer, backend=self.compile_backend)
                self.compiled = True
            if self.tuned:
                log.info("FLUX speed-ups: %s", ", ".join(self.tuned))
        else:
            ignored = [key for key in ("compile", "fp8_storage") if getattr(performance, key) is True]
            if ignored:
                log.warning("performance.%s applies on CUDA only: ignored on %s", " and ".join(ignored), self.device)
        if self.compiled:
            self._warm_up_compiled()
        elif performance.warmup is True or (performance.warmup == "auto" and self.device == "cuda"):
            self.warm_up()

    def _warm_up_compiled(self) -> None:
        """Warm up, which compiles; if compiling fails (no C compiler or Python headers for Triton,
        a GPU the compiler does not support), run the blocks uncompiled instead: a slower worker
        serves, one that cannot start does not."""
        import torch

        try:
            self.warm_up()
            return
        except torch.OutOfMemoryError:
            raise
        except Exception as exc:  # the compiler stack raises many kinds
            self.compile_error = f"{type(exc).__name__}: {exc}".strip()[:1000]
        from .tuning import uncompile_blocks

        log.warning("compiling FLUX's blocks failed, so they run uncompiled (slower); install a C compiler "
                    "and Python's headers (Debian/Ubuntu: build-essential python3-dev) or set "
                    "performance.compile: false. The error: %s", self.compile_error)
        uncompile_blocks(self.pipes["text2img"].transformer)
        self.compiled = False
        self.warmup_seconds.clear()
        self.warm_up()

    @property
    def pixel_settings(self) -> dict[str, bool]:
        """The settings in use that change the images' pixels, for their metadata."""
        return {"fp8_storage": "fp8 storage" in self.tuned, "compile": self.compiled}

    @property
    def mode(self) -> str:
        """The performance mode the weights are laid out for."""
        return self.placement.mode if self.placement is not None else "fast"

    def _place(self, mode: str) -> None:
        if self.placement is not None:
            self.placement.use(mode)

    def embeddings(self, prompt: str):
        """The prompt's (T5 embeddings, pooled CLIP embedding), from the cache or the encoders.
        Call it under ``torch.inference_mode``."""
        key = (prompt, self.max_sequence_length)
        cached = self.prompts.get(key)
        if cached is not None:
            return cached
        embeds, pooled, _ = self.pipes["text2img"].encode_prompt(
            prompt=prompt, prompt_2=None, num_images_per_prompt=1, max_sequence_length=self.max_sequence_length)
        self.prompts.put(key, (embeds, pooled))
        return embeds, pooled

    def _generate(self, pipe, mode: str, prompt: str, kwargs: dict, on_step_end=None) -> Image.Image:
        import torch

        self._place(mode)
        with torch.inference_mode():
            embeds, pooled = self.embeddings(prompt)
            return pipe(prompt_embeds=embeds, pooled_prompt_embeds=pooled, guidance_scale=GUIDANCE_SCALE,
                        max_sequence_length=self.max_sequence_length, output_type="pil",
                        callback_on_step_end=on_step_end, **kwargs).images[0]

    def warm_up(self) -> dict[str, float]:
        """Make one short image per warm-up size in each mode that needs it (fast first when compiled,
        then the start mode), so no job pays for first-time setup or compilation at these sizes."""
        import torch

        modes = list(dict.fromkeys((["fast"] if self.compiled else []) + [self.performance.start_mode]))
        if self.placement is None:
            modes = ["fast"]
        for mode in modes:
            for width, height in self.performance.sizes:
                started = time.perf_counter()
                self._generate(self.pipes["text2img"], mode, "", dict(
                    width=width, height=height, num_inference_steps=WARMUP_STEPS,
                    generator=torch.Generator(device="cpu").manual_seed(0)))
                self.warmup_seconds[f"{mode} {width}x{height}"] = time.perf_counter() - started
        self._place(self.performance.start_mode)
        log.info("FLUX warmed up in %.1fs: %s", sum(self.warmup_seconds.values()),
                 ", ".join(f"{key} {value:.1f}s" for key, value in self.warmup_seconds.items()))
        return dict(self.warmup_seconds)

    def prompt_for(self, job: Job) -> str:
        """The prompt the encoders get. With ``no_text``, the constraint goes at the end, and a
        prompt too long for T5's ``max_sequence_length`` tokens is shortened so that the
        constraint still fits (otherwise T5 would cut the constraint off)."""
        prompt = job.spec.prompt or ""
        if not job.spec.no_text:
            return prompt
        prompt = prompt.rstrip()
        tokenizer = self.pipes["text2img"].tokenizer_2
        suffix_tokens = len(tokenizer(f" {self.no_text_suffix}", add_special_tokens=False).input_ids)
        room = self.max_sequence_length - 1 - suffix_tokens  # 1: the end-of-sequence token
        ids = tokenizer(prompt, add_special_tokens=False).input_ids
        if len(ids) > room:
            prompt = tokenizer.decode(ids[:max(room, 0)], skip_special_tokens=True).rstrip()
            log.info("prompt shortened to %d T5 tokens so that the no_text constraint fits", max(room, 0))
        return f"{prompt} {self.no_text_suffix}"

    def run(self, job: Job, ctx: RunContext) -> Result:
        import torch

        spec = job.spec
        size = (spec.width, spec.height)
        kwargs = dict(
            width=spec.width,
            height=spec.height,
            num_inference_steps=spec.num_inference_steps,
            generator=torch.Generator(device="cpu").manual_seed(ctx.seed),
        )
        if job.image is None:
            pipe = self.pipes["text2img"]
        else:
            kwargs["image"] = fit(to_rgb(job.image), size, Image.Resampling.LANCZOS)
            kwargs["strength"] = spec.strength
            if job.mask is None:
                pipe = self.pipes["img2img"]
            else:
                pipe = self.pipes["inpaint"]
                kwargs["mask_image"] = fit_mask(to_mask(job.mask), job.image.size, size)

        def on_step_end(pipeline, step, timestep, callback_kwargs):
            ctx.progress(step + 1, pipeline.num_timesteps)
            return {}

        image = guard_out_of_memory(
            lambda: self._generate(pipe, spec.performance_mode, self.prompt_for(job), kwargs, on_step_end),
            "the GPU ran out of memory for this job; try a smaller size or performance_mode balanced")
        return Result(image=image, seed=ctx.seed)

    def stats(self) -> dict:
        """What the engine did to be fast: speed-ups, placement and its moves, cache use, warm-up."""
        return {
            "mode": self.mode, "accelerated": self.accelerated, "tuned": list(self.tuned), "compiled": self.compiled,
            "compile_error": self.compile_error,
            "warmup_seconds": dict(self.warmup_seconds),
            "prompt_cache": {"size": self.prompts.size, "hits": self.prompts.hits, "misses": self.prompts.misses},
            "placement": self.placement.stats() if self.placement is not None else None,
        }

    def close(self) -> None:
        if self.placement is not None:
            self.placement.close()
        self.placement = None
        self.pipes.clear()
        self.prompts.clear()
        free_memory()


def fit(image: Image.Image, size: tuple[int, int], resample) -> Image.Image:
    """Scale ``image`` to cover ``size`` and crop the centre: no distortion, no borders."""
    if image.size == size:
        return image
    return ImageOps.fit(image, size, method=resample, centering=(0.5, 0.5))


def fit_mask(mask: Image.Image, image_size: tuple[int, int], size: tuple[int, int]) -> Image.Image:
    """A mask of another size is stretched onto its image first, then fitted like the image, so
    that mask and image stay aligned whatever their shapes."""
    if mask.size != image_size:
        mask = mask.resize(image_size, Image.Resampling.BILINEAR)
    return fit(mask, size, Image.Resampling.BILINEAR)
