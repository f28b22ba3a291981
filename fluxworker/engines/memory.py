"""Device memory: give cached GPU memory back, and turn a GPU out-of-memory error into a job error.

Models share one GPU with FLUX, so a job that runs out of memory must fail on its own and leave
the memory it held free for the next one.
"""

from __future__ import annotations

from typing import Callable, TypeVar

from ..errors import JobError

T = TypeVar("T")


def free_memory() -> None:
    """Return cached GPU memory to the driver once the tensors that held it are gone."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def guard_out_of_memory(run: Callable[[], T], message: str) -> T:
    """Call ``run``; a GPU out-of-memory error becomes ``JobError("out_of_memory", message)``
    after the failed call's tensors are released and the cache is emptied."""
    import torch

    try:
        return run()
    except torch.OutOfMemoryError:
        pass  # leave the handler first: its traceback keeps the failed call's tensors alive
    free_memory()
    raise JobError("out_of_memory", message)
