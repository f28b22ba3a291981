"""What a valid configuration still needs from this machine: the files it names and the device.

A config can be well formed and still name a model folder that is not there. ``check-config``
reports both kinds of finding. Errors are what the worker cannot start without (it refuses to,
with the key named); warnings are what only some jobs need: the worker starts, the engine
concerned fails its jobs with a clear error, and the others serve.
"""

from __future__ import annotations

import os
import shutil
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

from .config import Config, MqttConfig


@dataclass
class Findings:
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def preflight(config: Config) -> Findings:
    """Check the files and the device that ``config`` names, without loading anything."""
    found = Findings()
    models = config.models
    if Path(models.flux).is_absolute():  # a local folder (the config resolved it)
        if not (Path(models.flux) / "model_index.json").is_file():
            found.warnings.append(f"models.flux: {models.flux}: not a diffusers model folder (no model_index.json); "
                                  "FLUX jobs will fail")
    elif not models.allow_download and not _in_hub_cache(models.flux):
        found.warnings.append(f"models.flux: {models.flux!r} is not in the local hub cache and "
                              "models.allow_download is false; FLUX jobs will fail")
    for key, jobs in (("esrgan", "upscale jobs"), ("lama", "lama erase jobs")):
        path = getattr(models, key)
        if path is not None and not path.is_file():
            found.warnings.append(f"models.{key}: {path}: file not found; {jobs} will fail")
    if models.device == "cuda" and not _cuda_visible():
        found.errors.append("models.device: 'cuda', but no CUDA device is visible (use auto or cpu)")
    if models.device != "cpu" and config.performance.compiles("cuda"):
        missing = missing_build_tools()  # checked first: cheaper than importing torch
        if missing and _cuda_visible():
            found.warnings.append(
                f"performance.compile: {' and '.join(missing)} not found; compiling FLUX's blocks needs them "
                "(Debian/Ubuntu: apt install build-essential python3-dev), so the worker will run them "
                "uncompiled (slower)")
    if config.mqtt.enabled:
        found.errors.extend(missing_tls_files(config.mqtt))
    return found


def _cuda_visible() -> bool:
    import torch

    return torch.cuda.is_available()


def missing_build_tools() -> list[str]:
    """What Triton needs to build its small C helpers at run time, and this machine lacks."""
    missing = []
    compilers = [os.environ.get("CC", ""), "cc", "gcc", "clang"]
    if not any(name and shutil.which(name) for name in compilers):
        missing.append("a C compiler (cc, gcc or clang)")
    if not Path(sysconfig.get_paths()["include"], "Python.h").is_file():
        missing.append("Python's headers (Python.h)")
    return missing


def missing_tls_files(mqtt: MqttConfig) -> list[str]:
    """``mqtt.<key>: file not found (got '<path>')`` for each TLS file the MQTT client would need."""
    if not mqtt.tls:
        return []
    paths = ((key, getattr(mqtt, key)) for key in ("ca_file", "cert_file", "key_file"))
    return [f"mqtt.{key}: file not found (got {str(path)!r})" for key, path in paths
            if path is not None and not path.is_file()]


def _in_hub_cache(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    return isinstance(try_to_load_from_cache(repo_id, "model_index.json"), str)
