"""fluxworker: a resident GPU worker for FLUX.1-schnell, LaMa and Real-ESRGAN jobs."""

__version__ = "0.1.0"
