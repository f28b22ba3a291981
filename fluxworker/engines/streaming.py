"""Weight streaming: run a model's blocks from host memory through a small ring of device buffers.

A streamed block's tensors are packed once into one flat host buffer (page-locked on CUDA, so a
copy runs asynchronously at full bus speed), and its parameters point into that buffer: the block
takes no other host memory, and no device memory while it is not running. The ring holds a few
device buffers the size of the largest streamed block, allocated once. Blocks run in a fixed
order: while one computes, the next is copied into a free buffer on a side stream; the compute
stream waits only for that copy, and a buffer is reused only after the compute stream is done with
it. Nothing in the loop waits on the host.

On the CPU the same code runs with plain copies, which is how the tests check it.
"""

from __future__ import annotations

import logging
import weakref
from typing import Sequence

import torch
from torch import nn

log = logging.getLogger(__name__)

ALIGN = 256  # bytes: each tensor starts where any dtype's view, and the copy engine, are happy


def unique_tensors(module: nn.Module) -> list[torch.Tensor]:
    """The module's parameters and buffers, each once (tied weights appear once)."""
    seen: set[int] = set()
    tensors = []
    for tensor in [*module.parameters(), *module.buffers()]:
        if id(tensor) not in seen:
            seen.add(id(tensor))
            tensors.append(tensor)
    return tensors


def tensor_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in unique_tensors(module))


def _pin(buffer: torch.Tensor) -> bool:
    """Page-lock ``buffer`` in place. Unlike ``pin_memory()``, which rounds each allocation up to a
    power of two, this locks exactly its bytes."""
    code = int(torch.cuda.cudart().cudaHostRegister(buffer.data_ptr(), buffer.numel(), 0))
    if code != 0:
        log.warning("could not page-lock %d MB of host memory (CUDA error %d): its copies run synchronously",
                    buffer.numel() >> 20, code)
        return False
    return True


def _unpin(pointer: int) -> None:
    torch.cuda.cudart().cudaHostUnregister(pointer)


class Packed:
    """One block's tensors in one flat host buffer, with their data pointing into it."""

    def __init__(self, module: nn.Module, pin: bool):
        self.module = module
        self.tensors = unique_tensors(module)
        self.layout: list[tuple[int, int, torch.dtype, torch.Size]] = []
        offset = 0
        for tensor in self.tensors:
            if not tensor.is_contiguous():
                tensor.data = tensor.data.contiguous()
            nbytes = tensor.numel() * tensor.element_size()
            self.layout.append((offset, nbytes, tensor.dtype, tensor.shape))
            offset += -(-nbytes // ALIGN) * ALIGN
        self.nbytes = max(offset, ALIGN)
        self.host = torch.empty(self.nbytes, dtype=torch.uint8)
        self.pinned = pin and _pin(self.host)
        if self.pinned:
            weakref.finalize(self, _unpin, self.host.data_ptr())
        self.host_views = self.views(self.host)
        with torch.no_grad():
            for tensor, view in zip(self.tensors, self.host_views):
                view.copy_(tensor.data)
        self.to_host()

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """The block's tensors laid out over ``flat`` (a byte buffer at least ``nbytes`` long)."""
        return [flat[offset:offset + nbytes].view(dtype).view(shape) for offset, nbytes, dtype, shape in self.layout]

    def point(self, views: Sequence[torch.Tensor]) -> None:
        for tensor, view in zip(self.tensors, views):
            tensor.data = view

    def to_host(self) -> None:
        """Point the tensors back at host memory; device memory they used is released with them."""
        self.point(self.host_views)

    def to_device(self, device: torch.device) -> None:
        """Give the block its own device copy (the whole model resident)."""
        flat = torch.empty(self.nbytes, dtype=torch.uint8, device=device)
        flat.copy_(self.host, non_blocking=self.pinned)
        self.point(self.views(flat))


class _StreamedBlock(nn.Module):
    """Stands in for a streamed block in its ModuleList: loads it, runs it, hands its buffer on."""

    def __init__(self, streamer: "BlockStreamer", index: int, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self._streamer = streamer
        self._index = index

    def forward(self, *args, **kwargs):
        self._streamer.before(self._index)
        try:
            # _call_impl runs the block eagerly even when it was compiled: its weights live in a
            # different buffer on every visit, and the step is bound by the copies, not compute.
            return self.inner._call_impl(*args, **kwargs)
        finally:
            self._streamer.after(self._index)


class BlockStreamer:
    """Streams ``packed`` blocks of one model through a ring of ``slots`` device buffers.

    ``packed`` maps a block's place (its ModuleList and index) to its packed tensors, in execution
    order. ``cyclic``: the blocks run over and over (denoising steps), so after the last block the
    first ones are fetched again and the ring stays allocated; otherwise (a text encoder, run once
    per prompt) the ring is allocated for one pass and released after the last block.
    """

    def __init__(self, packed: Sequence[tuple[nn.ModuleList, int, Packed]], device, *, slots: int = 2,
                 cyclic: bool = True):
        if not packed:
            raise ValueError("nothing to stream")
        self.places = [(modules, index) for modules, index, _ in packed]
        self.blocks = [block for _, _, block in packed]
        self.device = torch.device(device)
        self.slots = max(1, min(slots, len(self.blocks)))
        self.cyclic = cyclic
        self.slot_bytes = max(block.nbytes for block in self.blocks)
        self.cuda = self.device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.ring: list[torch.Tensor] | None = None
        self.holder: list[int | None] = [None] * self.slots
        self._views: dict[tuple[int, int], list[torch.Tensor]] = {}
        self._ready = [torch.cuda.Event() for _ in range(self.slots)] if self.cuda else []
        self._free = [torch.cuda.Event() for _ in range(self.slots)] if self.cuda else []
        self.installed = False
        self.loads = 0
        self.bytes_copied = 0
        self.misses = 0

    @property
    def ring_bytes(self) -> int:
        return self.slots * self.slot_bytes

    # -- installing ----------------------------------------------------------------------------

    def install(self) -> None:
        """Put the stand-ins into the ModuleLists; a cyclic streamer starts fetching at once."""
        if self.installed:
            return
        for index, (modules, position) in enumerate(self.places):
            modules[position] = _StreamedBlock(self, index, modules[position])
        self.installed = True
        if self.cyclic:
            self.start()

    def uninstall(self) -> None:
        """Put the blocks back and release the ring; their tensors point at host memory."""
        if not self.installed:
            return
        self.stop()
        for modules, position in self.places:
            modules[position] = modules[position].inner
        self.installed = False

    # -- the ring ------------------------------------------------------------------------------

    def start(self) -> None:
        if self.ring is not None:
            return
        with torch.inference_mode(False):
            self.ring = [torch.empty(self.slot_bytes, dtype=torch.uint8, device=self.device)
                         for _ in range(self.slots)]
        self.holder = [None] * self.slots
        self._views.clear()
        for slot in range(self.slots):
            self._load(slot, slot)

    def stop(self) -> None:
        if self.ring is None:
            return
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_stream(self.copy_stream)
        for block in self.blocks:
            block.to_host()
        self.ring = None
        self._views.clear()
        self.holder = [None] * self.slots

    def _slot_views(self, slot: int, index: int) -> list[torch.Tensor]:
        key = (slot, index)
        if key not in self._views:
            with torch.inference_mode(False):
                self._views[key] = self.blocks[index].views(self.ring[slot])
        return self._views[key]

    def _load(self, index: int, slot: int) -> None:
        """Copy block ``index`` into ``slot`` once the compute stream is done with the slot."""
        block = self.blocks[index]
        target = self.ring[slot][:block.nbytes]
        if self.cuda:
            self.copy_stream.wait_event(self._free[slot])
            with torch.cuda.stream(self.copy_stream):
                target.copy_(block.host, non_blocking=block.pinned)
            self._ready[slot].record(self.copy_stream)
        else:
            target.copy_(block.host)
        self.holder[slot] = index
        self.loads += 1
        self.bytes_copied += block.nbytes

    def _next(self, index: int) -> int | None:
        """The first block after ``index``, in running order, that no slot holds or is fetching."""
        count = len(self.blocks)
        for step in range(1, count + 1):
            candidate = index + step
            if candidate >= count:
                if not self.cyclic:
                    return None
                candidate %= count
            if candidate not in self.holder:
                return candidate
        return None

    # -- around each block ---------------------------------------------------------------------

    def before(self, index: int) -> None:
        if self.ring is None:
            self.start()
        if index not in self.holder:
            # Blocks ran out of order (a pass was cut short by an error): refill from this block.
            self.misses += 1
            if self.cuda:
                for event in self._free:
                    event.record(torch.cuda.current_stream(self.device))
            self.holder = [None] * self.slots
            for slot in range(self.slots):
                candidate = index if slot == 0 else self._next(index)
                if candidate is not None:
                    self._load(candidate, slot)
        slot = self.holder.index(index)
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_event(self._ready[slot])
        self.blocks[index].point(self._slot_views(slot, index))

    def after(self, index: int) -> None:
        if self.ring is None or index not in self.holder:
            return
        slot = self.holder.index(index)
        if self.cuda:
            self._free[slot].record(torch.cuda.current_stream(self.device))
        self.blocks[index].to_host()
        self.holder[slot] = None
        following = self._next(index)
        if following is not None:
            self._load(following, slot)
        elif not self.cyclic and index == len(self.blocks) - 1:
            self.stop()

    def stats(self) -> dict:
        return {"blocks": len(self.blocks), "slots": self.slots, "ring_bytes": self.ring_bytes,
                "loads": self.loads, "bytes_copied": self.bytes_copied, "misses": self.misses}
