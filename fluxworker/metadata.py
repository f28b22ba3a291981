"""How an image was made, carried inside its PNG.

Two text chunks:
- ``parameters``: the line format most image tools read (prompt on the first line, then
  ``Steps: 4, Sampler: ..., Seed: ..., Size: WxH, ...``);
- ``fluxworker``: JSON with the job as it ran (``{"version", "job", "inputs"}``, and for FLUX
  ``"model"`` and ``"settings"``), where ``job`` is a valid job spec with its seed, ready to submit
  again. Input images are not embedded; ``inputs`` gives their SHA-256 so a rerun can be checked
  against the right files. ``model`` is the configured FLUX model (its hub id, or its folder's name)
  and ``settings`` the worker settings that change the pixels (float8 weights, compilation): the
  same job gives the same image only with the same model and settings.

Neither chunk holds the job id or any time, so a rerun of the same job gives the same bytes.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from typing import Any

from PIL import Image

from . import __version__
from .jobs import Job

PARAMETERS_KEY = "parameters"
JSON_KEY = "fluxworker"
_INTERNAL = {"id", "image", "mask", "transport"}
_ENGINE_NAMES = {"flux": "FLUX.1-schnell", "lama": "LaMa", "esrgan": "Real-ESRGAN x4"}


def _input_digest(value: str | None) -> str | None:
    if value is None:
        return None
    payload = value.split(",", 1)[1] if value.startswith("data:") else value
    try:
        raw = base64.b64decode("".join(payload.split()), validate=True)
    except ValueError:
        return None
    return hashlib.sha256(raw).hexdigest()


def model_name(reference: str | None) -> str:
    """How a FLUX model reference is named in an image: a hub id as it is, a local folder by its
    name (its full path says nothing on another machine)."""
    if not reference:
        return _ENGINE_NAMES["flux"]
    if os.path.isabs(reference) or reference.startswith((".", "~")):
        return os.path.basename(os.path.normpath(reference)) or reference
    return reference


def job_parameters(job: Job, seed: int | None, size: tuple[int, int], *, model: str | None = None,
                   settings: dict[str, bool] | None = None) -> dict[str, str]:
    """The PNG text chunks for an image made by ``job`` with ``seed``. ``model`` is the configured
    FLUX model (``models.flux``) and ``settings`` the FLUX engine's pixel-changing settings as it
    applied them (``FluxEngine.pixel_settings``: float8 storage, compilation); without them the
    model is named FLUX.1-schnell and those settings are not recorded."""
    spec = job.spec
    fields = {k: v for k, v in spec.model_dump(mode="json").items() if k not in _INTERNAL}
    if job.engine != "flux":
        fields = {k: fields[k] for k in ("type", "model") if k in fields}
    else:
        fields["seed"] = seed
    inputs = {name: _input_digest(getattr(spec, name)) for name in ("image", "mask") if getattr(spec, name)}
    if job.engine != "flux" or not settings:
        settings = None
    else:
        settings = {"fp8_storage": bool(settings.get("fp8_storage")), "compile": bool(settings.get("compile"))}

    if job.engine == "flux":
        lines = [spec.prompt or ""]
        details = [
            f"Steps: {spec.num_inference_steps}", "Sampler: Euler", "Schedule type: Flow matching",
            "CFG scale: 0", f"Seed: {seed}", f"Size: {size[0]}x{size[1]}", f"Model: {model_name(model)}",
        ]
        if spec.image is not None:
            details.append(f"Denoising strength: {spec.strength:g}")
            details.append("Mode: inpaint" if spec.mask is not None else "Mode: img2img")
        else:
            details.append("Mode: txt2img")
        details += [f"Performance mode: {spec.performance_mode}", f"No text: {str(spec.no_text).lower()}"]
        if settings:
            details += [f"FP8 storage: {str(settings['fp8_storage']).lower()}",
                        f"Compiled: {str(settings['compile']).lower()}"]
    else:
        lines = [""]
        details = [f"Model: {_ENGINE_NAMES[job.engine]}", f"Size: {size[0]}x{size[1]}"]
    details.append(f"Version: fluxworker {__version__}")
    lines.append(", ".join(details))
    document: dict[str, Any] = {"version": __version__, "job": fields, "inputs": inputs}
    if job.engine == "flux":
        document["model"] = model_name(model)
        if settings:
            document["settings"] = settings
    return {PARAMETERS_KEY: "\n".join(lines), JSON_KEY: json.dumps(document, ensure_ascii=False, sort_keys=True)}


def read_parameters(path) -> dict[str, Any]:
    """The parameters stored in a PNG: ``{"parameters": str | None, "fluxworker": dict | None}``."""
    with Image.open(path) as image:
        text = dict(getattr(image, "text", {}) or {})
    document = None
    if JSON_KEY in text:
        try:
            document = json.loads(text[JSON_KEY])
        except ValueError:
            document = None
    return {PARAMETERS_KEY: text.get(PARAMETERS_KEY), JSON_KEY: document}
