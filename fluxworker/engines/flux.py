"""FLUX.1-schnell through diffusers: text-to-image, image-to-image and inpainting.

The three pipelines share one set of loaded modules (``from_pipe``), so switching job types never
reloads weights. Noise comes from a CPU ``torch.Generator`` seeded per job, so a seed and the same
parameters give the same image.

Placement on CUDA (``performance_mode``):
- ``fast``: every module stays on the GPU.
- ``balanced``: diffusers' model offload; each module moves to the GPU only while it runs, so peak
  VRAM is the largest module rather than the sum. Switching modes moves the modules once, on the
  first job that asks for the other mode.
On the CPU both modes are the same.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from PIL import Image, ImageOps

from ..config import looks_like_path
from ..errors import JobError
from ..images import to_mask, to_rgb
from ..jobs import Job
from . import Engine, Result, RunContext
from .memory import guard_out_of_memory

log = logging.getLogger(__name__)

GUIDANCE_SCALE = 0.0  # schnell is guidance-distilled: guidance is off
MAX_SEQUENCE_LENGTH = 256  # schnell's prompt length in T5 tokens


class FluxEngine(Engine):
    name = "flux"

    def __init__(self, ref: str, *, device: str, dtype, no_text_suffix: str, allow_download: bool = False):
        self.ref = ref
        self.device = device
        self.dtype = dtype
        self.no_text_suffix = no_text_suffix
        self.allow_download = allow_download
        self.pipes: dict[str, object] = {}
        self.placement: str | None = None
        self._offloaded_pipe = None

    def load(self) -> None:
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        from diffusers import FluxImg2ImgPipeline, FluxInpaintPipeline, FluxPipeline
        from diffusers.utils import logging as dlogging

        dlogging.disable_progress_bar()
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
        # from_pipe re-applies the dtype the modules already have, which makes diffusers warn
        # about float32 modules even when there are none: quiet it for these two calls only.
        verbosity = dlogging.get_verbosity()
        dlogging.set_verbosity_error()
        try:
            self.pipes = {
                "text2img": base,
                "img2img": FluxImg2ImgPipeline.from_pipe(base),
                "inpaint": FluxInpaintPipeline.from_pipe(base),
            }
        finally:
            dlogging.set_verbosity(verbosity)
        for pipe in self.pipes.values():
            pipe.set_progress_bar_config(disable=True)
        self._place("fast" if self.device != "cuda" else "balanced", base)

    def _place(self, mode: str, pipe) -> None:
        """Put the modules where ``mode`` wants them before ``pipe`` runs."""
        if self.device != "cuda":
            self.placement = "fast"  # loaded on the CPU already: nothing to move
            return
        if mode == "fast":
            if self.placement != "fast":
                if self._offloaded_pipe is not None:
                    self._offloaded_pipe.remove_all_hooks()
                    self._offloaded_pipe = None
                self.pipes["text2img"].to("cuda")
                self.placement = "fast"
            return
        # Offload hooks live on the shared modules but are tracked per pipeline, so the pipeline
        # about to run takes them over.
        if self.placement != "balanced" or self._offloaded_pipe is not pipe:
            if self.placement == "fast":
                self.pipes["text2img"].to("cpu")
            pipe.enable_model_cpu_offload()
            self._offloaded_pipe = pipe
            self.placement = "balanced"

    def prompt_for(self, job: Job) -> str:
        prompt = job.spec.prompt or ""
        if job.spec.no_text:
            prompt = f"{prompt.rstrip()} {self.no_text_suffix}"
        return prompt

    def run(self, job: Job, ctx: RunContext) -> Result:
        import torch

        spec = job.spec
        size = (spec.width, spec.height)
        kwargs = dict(
            prompt=self.prompt_for(job),
            width=spec.width,
            height=spec.height,
            num_inference_steps=spec.num_inference_steps,
            guidance_scale=GUIDANCE_SCALE,
            max_sequence_length=MAX_SEQUENCE_LENGTH,
            generator=torch.Generator(device="cpu").manual_seed(ctx.seed),
            output_type="pil",
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
                kwargs["mask_image"] = fit(to_mask(job.mask), size, Image.Resampling.BILINEAR)

        def on_step_end(pipeline, step, timestep, callback_kwargs):
            ctx.progress(step + 1, pipeline.num_timesteps)
            return {}

        def generate():
            self._place(spec.performance_mode, pipe)
            with torch.inference_mode():
                return pipe(callback_on_step_end=on_step_end, **kwargs).images[0]

        image = guard_out_of_memory(
            generate, "the GPU ran out of memory for this job; try a smaller size or performance_mode balanced")
        return Result(image=image, seed=ctx.seed)

    def close(self) -> None:
        self.pipes.clear()
        self._offloaded_pipe = None
        self.placement = None


def fit(image: Image.Image, size: tuple[int, int], resample) -> Image.Image:
    """Scale ``image`` to cover ``size`` and crop the centre: no distortion, no borders."""
    if image.size == size:
        return image
    return ImageOps.fit(image, size, method=resample, centering=(0.5, 0.5))
