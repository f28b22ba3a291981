"""The LaMa eraser (``model: "lama"`` with ``image`` and ``mask``): fills the masked area from its
surroundings, with no prompt and no seed.

- **Mask.** Read as luminance (transparent pixels count as white, as for FLUX masks), stretched to
  the image's size when the sizes differ (bilinear), then binarised: a pixel is erased when its
  luminance is at least ``MASK_THRESHOLD`` (128, the middle of 0..255).
- **Output.** The input image's size and mode family (see :mod:`.pixels`); the job's ``width`` and
  ``height`` are ignored. Pixels outside the mask are copied from the input, byte for byte.
- **Size.** An image whose longer side is at most ``erase.max_side`` is erased whole. A larger one
  is cropped to the mask's bounding box plus ``erase.crop_margin`` pixels; a crop still longer than
  ``max_side`` is scaled down for LaMa and its result scaled back up. Memory stays bounded.
- **Alpha.** A varying alpha channel is erased too, as a separate grayscale image, so a hole in a
  cut-out takes the transparency around it.
- float32 on every device: spandrel declares LaMa unfit for half precision.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from ..images import to_mask
from ..jobs import Job
from . import Engine, Result, RunContext
from .memory import free_memory, guard_out_of_memory
from .pixels import gray_to_rgb, join, rgb_to_gray, split, to_tensor, to_uint8
from .weights import load_model_file

MASK_THRESHOLD = 128
CONFIG_KEY = "models.lama"


def binary_mask(mask: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """The area to erase, as an H x W boolean array the size of the image."""
    mask = to_mask(mask)
    if mask.size != size:
        mask = mask.resize(size, Image.Resampling.BILINEAR)
    return np.asarray(mask) >= MASK_THRESHOLD


class EraseEngine(Engine):
    name = "lama"

    def __init__(self, path: Path, *, device: str, max_side: int, crop_margin: int):
        self.path = Path(path)
        self.device = device
        self.max_side = max_side
        self.crop_margin = crop_margin
        self.model = None

    def load(self) -> None:
        self.model = load_model_file(self.path, CONFIG_KEY, purpose="Inpainting").to(self.device)

    def close(self) -> None:
        self.model = None
        free_memory()

    def run(self, job: Job, ctx: RunContext) -> Result:
        return guard_out_of_memory(
            lambda: self._erase(job, ctx),
            "the GPU ran out of memory while erasing; lower erase.max_side or send a smaller image",
        )

    def _erase(self, job: Job, ctx: RunContext) -> Result:
        planes = split(job.image)
        mask = binary_mask(job.mask, planes.size)
        alpha = planes.alpha
        if not mask.any():
            ctx.progress(1, 1)
            return Result(image=join(planes.rgb, alpha, planes.gray))
        box = self.work_box(mask)
        alpha_varies = alpha is not None and alpha.min() != alpha.max()
        total = 2 if alpha_varies else 1
        rgb = self.erase_array(planes.rgb, mask, box)
        ctx.progress(1, total)
        if alpha_varies:
            alpha = rgb_to_gray(self.erase_array(gray_to_rgb(alpha), mask, box))
            ctx.progress(2, total)
        return Result(image=join(rgb, alpha, planes.gray))

    def work_box(self, mask: np.ndarray) -> tuple[int, int, int, int]:
        """The area LaMa sees, as (left, top, right, bottom): the whole image when it fits
        ``max_side``, else the mask's bounding box with ``crop_margin`` around it."""
        height, width = mask.shape
        if max(width, height) <= self.max_side:
            return 0, 0, width, height
        rows = np.flatnonzero(mask.any(axis=1))
        cols = np.flatnonzero(mask.any(axis=0))
        m = self.crop_margin
        return (max(int(cols[0]) - m, 0), max(int(rows[0]) - m, 0),
                min(int(cols[-1]) + 1 + m, width), min(int(rows[-1]) + 1 + m, height))

    def erase_array(self, array: np.ndarray, mask: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
        """``array`` (H x W x 3 uint8) with its masked pixels filled by LaMa; the others untouched."""
        import torch

        left, top, right, bottom = box
        region = array[top:bottom, left:right]
        region_mask = mask[top:bottom, left:right]
        width, height = right - left, bottom - top
        factor = min(1.0, self.max_side / max(width, height))
        image_in, mask_in = region, region_mask
        if factor < 1.0:
            small = (max(1, round(width * factor)), max(1, round(height * factor)))
            image_in = np.asarray(Image.fromarray(region).resize(small, Image.Resampling.LANCZOS))
            # BOX keeps every pixel that any erased pixel falls into: the small mask covers it all.
            mask_small = Image.fromarray(region_mask.astype(np.uint8) * 255).resize(small, Image.Resampling.BOX)
            mask_in = np.asarray(mask_small) > 0
        model = self.model
        with torch.inference_mode():
            image_t = to_tensor(image_in, model.device, model.dtype)
            mask_t = torch.from_numpy(np.ascontiguousarray(mask_in)).to(model.device, model.dtype)[None, None]
            filled = to_uint8(model(image_t, mask_t))
            del image_t, mask_t
        if factor < 1.0:
            filled = np.asarray(Image.fromarray(filled).resize((width, height), Image.Resampling.BICUBIC))
        out = array.copy()
        out[top:bottom, left:right][region_mask] = filled[region_mask]
        return out
