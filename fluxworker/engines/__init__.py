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
    """The engines this worker serves, and why the others are missing.

    Engines load at start and stay resident, except those named in ``on_demand``: with ``lazy``
    they load on their first job instead, and with ``unload_after`` > 0 they are freed after that
    many idle seconds and load again on their next job. A failure to load at start removes the
    engine (its error becomes the reason jobs are given); a failure to load on demand fails the
    job in hand with the same reason and is tried again on the next job.
    """

    engines: dict[str, Engine]
    missing: dict[str, str] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)  # configured, but failed to load at start
    load_seconds: dict[str, float] = field(default_factory=dict)
    on_demand: frozenset[str] = frozenset()
    lazy: bool = False
    unload_after: float = 0.0
    loaded: set[str] = field(default_factory=set)
    _last_used: dict[str, float] = field(default_factory=dict)
    _used: set[str] = field(default_factory=set)

    def load(self) -> None:
        """Load every engine that is not left to load on demand. One that fails to load leaves the
        set, with its error as the reason, so the worker keeps serving the others."""
        for name, engine in list(self.engines.items()):
            if self.lazy and name in self.on_demand:
                path = getattr(engine, "path", None)
                if path is not None and not path.exists():
                    log.warning("engine %s: %s does not exist; its jobs fail until it does", name, path)
                log.info("engine %s loads on its first job", name)
                continue
            try:
                self._load(name)
            except Exception as exc:  # a broken model must not stop the other engines
                log.error("engine %s failed to load: %s", name, exc)
                del self.engines[name]
                self.missing[name] = self.failed[name] = f"the {name} engine failed to load: {exc}"

    def _load(self, name: str) -> None:
        started = time.monotonic()
        self.engines[name].load()
        self.loaded.add(name)
        self._last_used[name] = time.monotonic()
        self.load_seconds[name] = time.monotonic() - started
        log.info("engine %s loaded in %.2fs", name, self.load_seconds[name])

    def get(self, name: str) -> Engine:
        """The engine for a job, loaded now if it was left to load on demand."""
        field_name = "model" if name != "esrgan" else None
        engine = self.engines.get(name)
        if engine is None:
            reason = self.missing.get(name, f"no engine named {name!r}")
            raise JobError("engine_unavailable", reason, field_name)
        if name not in self.loaded:
            try:
                self._load(name)
            except Exception as exc:
                log.error("engine %s failed to load: %s", name, exc)
                engine.close()
                raise JobError("engine_unavailable", f"the {name} engine failed to load: {exc}", field_name) from None
        self._used.add(name)
        return engine

    def maintain(self, now: float | None = None) -> None:
        """Free on-demand engines idle for ``unload_after`` seconds. The worker calls this between
        jobs, never during one: an engine handed out since the last call starts its idle time now."""
        now = time.monotonic() if now is None else now
        for name in self._used:
            self._last_used[name] = now
        self._used.clear()
        if self.unload_after <= 0:
            return
        for name in sorted(self.loaded & self.on_demand):
            idle = now - self._last_used.get(name, now)
            if idle >= self.unload_after:
                self.engines[name].close()
                self.loaded.discard(name)
                log.info("engine %s unloaded after %.0fs idle", name, idle)

    def close(self) -> None:
        for name in sorted(self.loaded):
            self.engines[name].close()
        self.loaded.clear()


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
    from .esrgan import UpscaleEngine
    from .flux import FluxEngine
    from .lama import EraseEngine

    models = config.models
    device = resolve_device(models.device)
    engines: dict[str, Engine] = {
        "flux": FluxEngine(
            models.flux,
            device=device,
            dtype=resolve_dtype(models.dtype, device),
            no_text_suffix=config.worker.no_text_suffix,
            allow_download=models.allow_download,
            performance=config.performance,
        )
    }
    missing: dict[str, str] = {}
    if models.esrgan is None:
        missing["esrgan"] = "upscaling is not available on this worker (models.esrgan is not configured)"
    else:
        engines["esrgan"] = UpscaleEngine(
            models.esrgan,
            device=device,
            tile_size=config.upscale.tile_size,
            tile_overlap=config.upscale.tile_overlap,
            max_input_pixels=config.limits.max_upscale_pixels,
        )
    if models.lama is None:
        missing["lama"] = "the lama eraser is not available on this worker (models.lama is not configured)"
    else:
        engines["lama"] = EraseEngine(
            models.lama, device=device, max_side=config.erase.max_side, crop_margin=config.erase.crop_margin
        )
    return EngineSet(
        engines, missing, on_demand=frozenset({"esrgan", "lama"}), lazy=models.lazy_load,
        unload_after=models.unload_after,
    )
