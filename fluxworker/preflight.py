"""What a valid configuration still needs from this machine: the files it names, the device, and
a systemd unit that gives the worker the time to stop that ``worker.stop_timeout`` promises.

A config can be well formed and still name a model folder that is not there. ``check-config``
reports both kinds of finding. Errors are what the worker cannot start without (it refuses to,
with the key named); warnings are what only some jobs need: the worker starts, the engine
concerned fails its jobs with a clear error, and the others serve.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

from .config import Config, MqttConfig

WORKER_UNIT = "fluxworker-worker.service"
SHIPPED_TIMEOUT_STOP_S = 660.0  # TimeoutStopSec of deploy/fluxworker-worker.service
# After stop_timeout the worker still ends the step under way, puts the job back and writes the results it holds.
STOP_MARGIN_S = 60.0
# Where systemd reads units and their drop-ins, the first found winning.
UNIT_DIRS = ("/etc/systemd/system", "/run/systemd/system", "/usr/local/lib/systemd/system",
             "/usr/lib/systemd/system", "/lib/systemd/system")


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
    stop_timeout, where = unit_stop_timeout()
    if config.worker.stop_timeout + STOP_MARGIN_S > stop_timeout:
        found.warnings.append(
            f"worker.stop_timeout: {config.worker.stop_timeout:g} s, but systemd kills the worker "
            f"{stop_timeout:g} s after asking it to stop ({where}), so a stop or restart can cut the job in hand "
            f"short; give it at least {config.worker.stop_timeout + STOP_MARGIN_S:g} s in a drop-in: "
            f"sudo systemctl edit {WORKER_UNIT.removesuffix('.service')}, then [Service] and "
            f"TimeoutStopSec={math.ceil(config.worker.stop_timeout + STOP_MARGIN_S)}")
    return found


def unit_stop_timeout() -> tuple[float, str]:
    """The worker unit's ``TimeoutStopSec`` in seconds and where it comes from: the installed unit
    with its drop-ins where systemd would read them, else the shipped unit's value."""
    unit = next((Path(folder, WORKER_UNIT) for folder in UNIT_DIRS if Path(folder, WORKER_UNIT).is_file()), None)
    if unit is None:
        return SHIPPED_TIMEOUT_STOP_S, f"TimeoutStopSec of the shipped {WORKER_UNIT}"
    dropins: dict[str, Path] = {}
    for folder in reversed(UNIT_DIRS):  # a drop-in in /etc replaces one of the same name further down
        for path in Path(folder, WORKER_UNIT + ".d").glob("*.conf"):
            dropins[path.name] = path
    seconds, where = 90.0, "systemd's default"  # DefaultTimeoutStopSec
    for path in [unit, *(dropins[name] for name in sorted(dropins))]:
        try:
            lines = path.read_text(errors="replace").splitlines()
        except OSError:
            continue
        for line in lines:
            key, _, value = line.strip().partition("=")
            if key.strip() in ("TimeoutStopSec", "TimeoutSec"):
                parsed = parse_timespan(value)
                if parsed is not None:
                    seconds, where = parsed, f"{key.strip()} in {path}"
    return seconds, where


_UNITS = {"us": 1e-6, "usec": 1e-6, "ms": 1e-3, "msec": 1e-3, "": 1.0, "s": 1.0, "sec": 1.0, "second": 1.0,
          "seconds": 1.0, "m": 60.0, "min": 60.0, "minute": 60.0, "minutes": 60.0, "h": 3600.0, "hr": 3600.0,
          "hour": 3600.0, "hours": 3600.0, "d": 86400.0, "day": 86400.0, "days": 86400.0, "w": 604800.0,
          "week": 604800.0, "weeks": 604800.0}


def parse_timespan(text: str) -> float | None:
    """Seconds in a systemd time span (``660``, ``11min``, ``1h 30min``, ``infinity``); an empty
    value is systemd's default; ``None`` for what is not a time span."""
    text = text.strip()
    if not text:
        return 90.0
    if text == "infinity":
        return math.inf
    if not re.fullmatch(r"(?:\d+(?:\.\d+)?\s*[a-z]*\s*)+", text):
        return None
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", text)
    if any(unit not in _UNITS for _, unit in parts):
        return None
    return sum(float(number) * _UNITS[unit] for number, unit in parts)


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
