"""Real-ESRGAN x4 upscaling (``type: "upscale"``), tile by tile.

The image is cut into a grid of near-equal tiles of at most ``upscale.tile_size`` pixels a side.
Each tile is upscaled with ``upscale.tile_overlap`` pixels of its neighbours around it, and only
its own area is kept: the borrowed border gives the pixels near a tile's edge the context they have
in a whole-image run, so tiles meet without visible seams, while memory stays bounded by one tile
whatever the image size.
The result is assembled in 8-bit on the CPU.

fp16 on CUDA, float32 on the CPU. An alpha channel is upscaled by the same model as a separate
grayscale image (a constant alpha is simply repeated); grayscale inputs come back grayscale.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import JobError
from ..jobs import Job
from . import Engine, Result, RunContext
from .memory import free_memory, guard_out_of_memory
from .pixels import gray_to_rgb, join, rgb_to_gray, split, to_tensor, to_uint8
from .weights import load_model_file

SCALE = 4
CONFIG_KEY = "models.esrgan"


def tile_spans(length: int, tile: int) -> list[tuple[int, int]]:
    """Cut ``length`` into the fewest near-equal spans of at most ``tile``: no thin last tile."""
    count = math.ceil(length / tile)
    bounds = [length * n // count for n in range(count + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


class UpscaleEngine(Engine):
    name = "esrgan"

    def __init__(self, path: Path, *, device: str, tile_size: int, tile_overlap: int, max_input_pixels: int):
        self.path = Path(path)
        self.device = device
        self.tile_size = tile_size
        self.tile_overlap = tile_overlap
        self.max_input_pixels = max_input_pixels
        self.model = None

    def load(self) -> None:
        import torch

        model = load_model_file(self.path, CONFIG_KEY, purpose="SR", scale=SCALE).to(self.device)
        if self.device == "cuda" and model.supports_half:
            model = model.to(torch.float16)
        self.model = model

    def close(self) -> None:
        self.model = None
        free_memory()

    def run(self, job: Job, ctx: RunContext) -> Result:
        return guard_out_of_memory(
            lambda: self._upscale(job, ctx),
            "the GPU ran out of memory while upscaling; lower upscale.tile_size or send a smaller image",
        )

    def _upscale(self, job: Job, ctx: RunContext) -> Result:
        planes = split(job.image)
        width, height = planes.size
        if width * height > self.max_input_pixels:
            raise JobError(
                "image_too_large",
                f"image: {width}x{height} is over the upscale limit of {self.max_input_pixels} pixels "
                "(limits.max_upscale_pixels)",
                "image",
            )
        alpha = planes.alpha
        alpha_varies = alpha is not None and alpha.min() != alpha.max()
        tiles = len(tile_spans(width, self.tile_size)) * len(tile_spans(height, self.tile_size))
        total = tiles * (2 if alpha_varies else 1)
        done = 0

        def tile_done() -> None:
            nonlocal done
            done += 1
            ctx.progress(done, total)

        rgb = self.upscale_array(planes.rgb, tile_done)
        if alpha_varies:
            alpha = rgb_to_gray(self.upscale_array(gray_to_rgb(alpha), tile_done))
        elif alpha is not None:
            alpha = np.full((height * SCALE, width * SCALE), alpha.flat[0], dtype=np.uint8)
        return Result(image=join(rgb, alpha, planes.gray))

    def upscale_array(self, array: np.ndarray, on_tile: Callable[[], None] = lambda: None) -> np.ndarray:
        """Upscale H x W x 3 uint8 planes to 4H x 4W x 3, one overlapped tile at a time."""
        model, pad, s = self.model, self.tile_overlap, SCALE
        height, width = array.shape[:2]
        out = np.empty((height * s, width * s, 3), dtype=np.uint8)
        for y0, y1 in tile_spans(height, self.tile_size):
            for x0, x1 in tile_spans(width, self.tile_size):
                py0, py1 = max(y0 - pad, 0), min(y1 + pad, height)
                px0, px1 = max(x0 - pad, 0), min(x1 + pad, width)
                result = model(to_tensor(array[py0:py1, px0:px1], model.device, model.dtype))
                keep = result[:, :, (y0 - py0) * s:(y1 - py0) * s, (x0 - px0) * s:(x1 - px0) * s]
                out[y0 * s:y1 * s, x0 * s:x1 * s] = to_uint8(keep)
                del result, keep
                on_tile()
        return out
