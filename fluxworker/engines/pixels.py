"""Input images as the arrays LaMa and Real-ESRGAN work on, and back.

Both models see 8-bit RGB. Whatever the input's mode, :func:`split` gives its RGB planes, its alpha
channel kept apart (``None`` when it has none) and whether it was grayscale, and :func:`join` builds
an output of the same family: ``L`` or ``LA`` for grayscale inputs, ``RGB`` or ``RGBA`` otherwise.
Palette images become RGB (RGBA with transparency); 16-bit and float images become 8-bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from ..images import to_rgb

_GRAY_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}


@dataclass
class Planes:
    rgb: np.ndarray  # H x W x 3, uint8
    alpha: np.ndarray | None  # H x W, uint8
    gray: bool

    @property
    def size(self) -> tuple[int, int]:
        """(width, height), as PIL counts them."""
        return self.rgb.shape[1], self.rgb.shape[0]


def split(image: Image.Image) -> Planes:
    """The RGB planes, the alpha channel and the grayscale flag of any decoded image."""
    gray = image.mode in _GRAY_MODES
    alpha = None
    if image.has_transparency_data:
        # Converting to RGBA applies palette and tRNS transparency as well as real alpha channels.
        rgba = image.convert("RGBA")
        alpha = np.asarray(rgba.getchannel("A")).copy()
        rgb = rgba.convert("RGB")
    else:
        rgb = to_rgb(image)
    return Planes(np.asarray(rgb, dtype=np.uint8).copy(), alpha, gray)


def join(rgb: np.ndarray, alpha: np.ndarray | None, gray: bool) -> Image.Image:
    """The output image for planes computed from :func:`split`'s."""
    image = Image.fromarray(np.ascontiguousarray(rgb), "RGB")
    if gray:
        image = image.convert("L")
    if alpha is not None:
        image.putalpha(Image.fromarray(np.ascontiguousarray(alpha), "L"))
    return image


def gray_to_rgb(plane: np.ndarray) -> np.ndarray:
    """A single channel repeated into three, so an RGB model can process it."""
    return np.repeat(plane[:, :, None], 3, axis=2)


def rgb_to_gray(rgb: np.ndarray) -> np.ndarray:
    """Luminance of RGB planes, as PIL computes it (exact for R = G = B)."""
    return np.asarray(Image.fromarray(np.ascontiguousarray(rgb), "RGB").convert("L"))


def to_tensor(array: np.ndarray, device, dtype):
    """H x W x C uint8 to a 1 x C x H x W tensor in [0, 1] on ``device``."""
    import torch

    if not array.flags.writeable or not array.flags.c_contiguous:
        array = np.array(array)  # torch wants memory it may write to (arrays from PIL are read-only)
    tensor = torch.from_numpy(array).to(device)
    return tensor.permute(2, 0, 1).unsqueeze(0).to(dtype).div_(255)


def to_uint8(tensor) -> np.ndarray:
    """1 x C x H x W in [0, 1] to H x W x C uint8, rounded to the nearest level."""
    import torch

    out = tensor[0].float().clamp(0, 1).mul(255).round().to("cpu", dtype=torch.uint8)
    return out.permute(1, 2, 0).numpy()
