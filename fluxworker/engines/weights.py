"""Weight files for the eraser and the upscaler, read by spandrel.

spandrel recognises the architecture from the weights alone, so the standard files load as they
are: ``RealESRGAN_x4plus.pth`` (``{"params_ema": ...}``) or a ``.safetensors`` copy, and LaMa's
TorchScript ``big-lama.pt`` or a ``.pth`` / ``.safetensors`` state dict. Pickled ``.pth`` files go
through spandrel's restricted unpickler, which refuses anything but tensors and dicts.

Every failure is a :class:`ModelFileError` whose message names the config key and the file, so the
log line and the job error say exactly what to fix.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

log = logging.getLogger(__name__)

SUFFIXES = (".pth", ".pt", ".safetensors", ".ckpt")


class ModelFileError(Exception):
    """A configured weight file is missing, unreadable, or holds another kind of model."""


def load_model_file(path: Path, key: str, *, purpose: str, scale: int = 1):
    """Load ``path`` (configured as ``key``) and check it is the kind of model the engine needs.

    ``purpose`` is ``"SR"`` for a super-resolution model of the given ``scale``, or
    ``"Inpainting"``. The model comes back on the CPU, in float32 and in eval mode.
    """
    from spandrel import ImageModelDescriptor, MaskedImageModelDescriptor, ModelLoader, UnsupportedModelError

    where = f"{key}: {path}"
    if not path.exists():
        raise ModelFileError(f"{where}: file not found")
    if not path.is_file():
        raise ModelFileError(f"{where}: not a file")
    if path.suffix.lower() not in SUFFIXES:
        raise ModelFileError(f"{where}: unsupported file type {path.suffix!r} (use {', '.join(SUFFIXES)})")
    try:
        with warnings.catch_warnings():
            # torch marks TorchScript loading as deprecated; big-lama.pt is TorchScript all the same.
            warnings.simplefilter("ignore", FutureWarning)
            descriptor = ModelLoader(device="cpu").load_from_file(path)
    except UnsupportedModelError:
        raise ModelFileError(f"{where}: the weights are not of a model architecture spandrel knows") from None
    except MemoryError:
        raise
    except Exception as exc:  # torch, pickle, zip and safetensors each raise their own types
        detail = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise ModelFileError(f"{where}: cannot read the weights ({detail})") from None

    found = f"{descriptor.architecture.name} ({descriptor.purpose}, x{descriptor.scale})"
    if purpose == "Inpainting":
        ok = isinstance(descriptor, MaskedImageModelDescriptor) and descriptor.input_channels == 3
        wanted = "an inpainting model such as big-lama.pt"
    else:
        ok = (
            isinstance(descriptor, ImageModelDescriptor)
            and descriptor.purpose == purpose
            and descriptor.scale == scale
            and descriptor.input_channels == 3
            and descriptor.output_channels == 3
        )
        wanted = f"an RGB x{scale} super-resolution model such as RealESRGAN_x4plus.pth"
    if not ok:
        raise ModelFileError(f"{where}: this is {found}, but the engine needs {wanted}")
    log.info("%s: %s, %s parameters", where, found, f"{sum(p.numel() for p in descriptor.model.parameters()):,}")
    return descriptor.eval()

