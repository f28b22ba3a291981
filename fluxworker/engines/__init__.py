"""Engines: models loaded once that then run many jobs, behind one small interface.

The worker picks an engine by ``Job.engine`` (``flux``, ``lama`` or ``esrgan``). An engine that is
not configured stays out of the set, and jobs that need it fail with a clear error while the other
engines keep serving.
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Callable

from PIL import Image

from ..config import Config
from ..errors import JobError
from ..jobs import Job

log = logging.getLogger(__name__)


@dataclass
class RunContext:
    """What a running job may use besides its spec: its resolved seed and a progress callback."""

    seed: int | None
    progress: Callable[[int, int], None] = lambda step, total: None


@dataclass
class Result:
    image: Image.Image
    seed: int | None = None


class Engine(ABC):
    """A model that loads once (``load``) and then runs jobs (``run``)."""

    name: str = ""

    @abstractmethod
    def load(self) -> None:
        """Load weights; called once before the first job."""

    @abstractmethod
    def run(self, job: Job, ctx: RunContext) -> Result:
        """Run one job and return its image. Raise :class:`JobError` for a failure the client caused."""

    def close(self) -> None:
        """Free the model's memory."""


@dataclass
class EngineSet:
    """The engines this worker serves, and why the others are missing."""

    engines: dict[str, Engine]
    missing: dict[str, str] = field(default_factory=dict)
    load_seconds: dict[str, float] = field(default_factory=dict)

    def load(self) -> None:
        """Load every engine. One that fails to load leaves the set, with its error as the reason,
        so the worker keeps serving the others."""
        for name, engine in list(self.engines.items()):
            started = time.monotonic()
            try:
                engine.load()
            except Exception as exc:  # a broken model must not stop the other engines
                log.error("engine %s failed to load: %s", name, exc)
                del self.engines[name]
                self.missing[name] = f"the {name} engine failed to load: {exc}"
                continue
            self.load_seconds[name] = time.monotonic() - started
            log.info("engine %s loaded in %.2fs", name, self.load_seconds[name])

    def get(self, name: str) -> Engine:
        engine = self.engines.get(name)
        if engine is None:
            reason = self.missing.get(name, f"no engine named {name!r}")
            raise JobError("engine_unavailable", reason, "model" if name != "esrgan" else None)
        return engine

    def close(self) -> None:
        for engine in self.engines.values():
            engine.close()


def resolve_device(setting: str) -> str:
    """``auto`` means CUDA when a GPU is visible, else the CPU."""
    import torch

    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if setting == "cuda" and not torch.cuda.is_available():
        raise JobError("device_unavailable", "models.device is 'cuda' but no CUDA device is visible")
    return setting


def resolve_dtype(setting: str, device: str):
    """``auto`` means bfloat16 on CUDA and float32 on the CPU (bf16 convolutions are slow there)."""
    import torch

    if setting == "auto":
        return torch.bfloat16 if device == "cuda" else torch.float32
    return getattr(torch, setting)


def build_engines(config: Config) -> EngineSet:
    """The engine set described by the configuration (nothing is loaded yet)."""
    from .flux import FluxEngine

    device = resolve_device(config.models.device)
    engines: dict[str, Engine] = {
        "flux": FluxEngine(
            config.models.flux,
            device=device,
            dtype=resolve_dtype(config.models.dtype, device),
            no_text_suffix=config.worker.no_text_suffix,
            allow_download=config.models.allow_download,
        )
    }
    missing = {
        "lama": "the lama eraser is not available on this worker (models.lama is not configured)",
        "esrgan": "upscaling is not available on this worker (models.esrgan is not configured)",
    }
    return EngineSet(engines, missing)
