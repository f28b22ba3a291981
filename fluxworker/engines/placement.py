"""Where FLUX's weights live in each performance mode, and the moves between modes.

``fast``: every weight on the GPU. ``balanced``: GPU memory stays under a budget. The VAE, CLIP
and everything outside the transformer's and T5's repeated blocks stay resident in both modes. In
balanced mode the T5 encoder's blocks (run once per new prompt) stream from host memory, and so do
as many of the transformer's blocks (run once per step) as the budget requires; they are chosen
spread evenly through the running order, so each copy overlaps the compute of the resident blocks
before it.

A streamed block's host copy is made once, at start, and kept: entering balanced mode only points
the weights back at it and frees their device memory, and entering fast mode is one host-to-device
copy per streamed block. Nothing is re-registered or re-pinned between modes.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

from .streaming import BlockStreamer, Packed, tensor_bytes, unique_tensors

log = logging.getLogger(__name__)

GIB = 2**30
SLOTS = 2  # device buffers per streamed model: one computing, one being filled


def transformer_places(transformer: nn.Module) -> list[tuple[nn.ModuleList, int]]:
    """The transformer's repeated blocks in running order: the double-stream blocks, then the single ones."""
    return [(blocks, index) for blocks in (transformer.transformer_blocks, transformer.single_transformer_blocks)
            for index in range(len(blocks))]


def encoder_places(text_encoder: nn.Module) -> list[tuple[nn.ModuleList, int]]:
    """The T5 encoder's blocks in running order."""
    blocks = text_encoder.encoder.block
    return [(blocks, index) for index in range(len(blocks))]


def pipeline_modules(pipe) -> list[nn.Module]:
    return [module for module in pipe.components.values() if isinstance(module, nn.Module)]


def spread(sizes: list[int], need: int) -> list[int]:
    """Indices of blocks to stream, at least ``need`` bytes in all, spread evenly over the order."""
    total = sum(sizes)
    if need <= 0:
        return []
    if need >= total:
        return list(range(len(sizes)))
    share = need / total
    chosen: list[int] = []
    streamed = cumulative = 0
    for index, size in enumerate(sizes):
        cumulative += size
        if streamed + size / 2 <= share * cumulative:
            chosen.append(index)
            streamed += size
    for index in reversed(range(len(sizes))):  # rounding can leave it short: top up from the end
        if streamed >= need:
            break
        if index not in chosen:
            chosen.append(index)
            streamed += sizes[index]
    return sorted(chosen)


@dataclass
class Plan:
    """What balanced mode streams, and the GPU memory it expects to hold."""

    transformer_streamed: list[int]
    encoder_streamed: list[int]
    budget_bytes: int
    reserve_bytes: int
    total_bytes: int  # every weight of the pipeline
    resident_bytes: int  # weights on the GPU in balanced mode
    ring_bytes: int  # the transformer's streaming buffers
    encoder_ring_bytes: int  # T5's, only while a prompt is encoded
    streamed_per_step: int  # bytes copied to the GPU per transformer pass

    @property
    def expected_peak_bytes(self) -> int:
        return self.resident_bytes + self.ring_bytes + max(self.reserve_bytes, self.encoder_ring_bytes)

    def summary(self) -> dict:
        figures = asdict(self)
        figures["expected_peak_gib"] = round(self.expected_peak_bytes / GIB, 3)
        return figures


def plan_balanced(pipe, budget_bytes: int, reserve_bytes: int, slots: int = SLOTS) -> Plan:
    """Decide which blocks balanced mode streams so that weights, buffers and the reserve fit the budget."""
    transformer_sizes = [tensor_bytes(modules[i]) for modules, i in transformer_places(pipe.transformer)]
    encoder_sizes = [tensor_bytes(modules[i]) for modules, i in encoder_places(pipe.text_encoder_2)]
    total = sum(tensor_bytes(module) for module in pipeline_modules(pipe))
    fixed = total - sum(transformer_sizes) - sum(encoder_sizes)

    def plan(transformer: list[int], encoder: list[int]) -> Plan:
        streamed = sum(transformer_sizes[i] for i in transformer)
        ring = slots * max((transformer_sizes[i] for i in transformer), default=0)
        encoder_ring = slots * max((encoder_sizes[i] for i in encoder), default=0)
        resident = total - streamed - sum(encoder_sizes[i] for i in encoder)
        return Plan(transformer, encoder, budget_bytes, reserve_bytes, total, resident, ring, encoder_ring, streamed)

    everything = plan([], [])
    if everything.expected_peak_bytes <= budget_bytes:
        return everything
    # T5 runs once per new prompt, the transformer once per step: stream T5 first.
    encoder_all = list(range(len(encoder_sizes)))
    encoder_only = plan([], encoder_all)
    if encoder_only.expected_peak_bytes <= budget_bytes:
        return encoder_only
    ring = slots * max(transformer_sizes)
    room = budget_bytes - fixed - ring - max(reserve_bytes, encoder_only.encoder_ring_bytes)
    chosen = plan(spread(transformer_sizes, sum(transformer_sizes) - max(room, 0)), encoder_all)
    if chosen.expected_peak_bytes > budget_bytes:
        log.warning("balanced mode expects %.2f GiB, over its budget of %.2f GiB: the parts that always stay "
                    "on the GPU need more", chosen.expected_peak_bytes / GIB, budget_bytes / GIB)
    return chosen


def _at(place: tuple[nn.ModuleList, int]) -> nn.Module:
    modules, index = place
    return modules[index]


class Placement:
    """Moves FLUX's weights between the layouts of the two performance modes."""

    def __init__(self, pipe, device, plan: Plan, *, pin: bool):
        started = time.perf_counter()
        self.device = torch.device(device)
        self.plan = plan
        self.mode: str | None = None
        self.switches: list[dict] = []
        transformer_places_ = transformer_places(pipe.transformer)
        encoder_places_ = encoder_places(pipe.text_encoder_2)
        transformer = [(*transformer_places_[p], Packed(_at(transformer_places_[p]), pin))
                       for p in plan.transformer_streamed]
        encoder = [(*encoder_places_[p], Packed(_at(encoder_places_[p]), pin)) for p in plan.encoder_streamed]
        self.packed = [block for _, _, block in transformer + encoder]
        streamed = {id(tensor) for block in self.packed for tensor in block.tensors}
        with torch.no_grad():
            for module in pipeline_modules(pipe):
                for tensor in unique_tensors(module):
                    if id(tensor) not in streamed and tensor.device != self.device:
                        tensor.data = tensor.data.to(self.device)
        self.streamers = [BlockStreamer(transformer, self.device, cyclic=True)] if transformer else []
        if encoder:
            self.streamers.append(BlockStreamer(encoder, self.device, cyclic=False))
        self.prepare_seconds = time.perf_counter() - started
        pinned = sum(block.nbytes for block in self.packed if block.pinned)
        log.info("balanced plan: %d transformer and %d T5 blocks stream (%.2f GiB in host memory, %.2f GiB "
                 "page-locked), expected peak %.2f GiB; prepared in %.1fs", len(transformer), len(encoder),
                 self.host_bytes / GIB, pinned / GIB, plan.expected_peak_bytes / GIB, self.prepare_seconds)

    @property
    def host_bytes(self) -> int:
        return sum(block.nbytes for block in self.packed)

    def use(self, mode: str) -> float:
        """Lay the weights out for ``mode``; returns the seconds it took (0 when already there).
        If the move fails (the GPU is out of memory, say), the weights go back to the balanced
        layout, which needs the least device memory, and the error is raised."""
        if mode == self.mode:
            return 0.0
        started = time.perf_counter()
        try:
            with torch.inference_mode(False), torch.no_grad():
                moved = self._to_fast() if mode == "fast" else self._to_balanced()
        except BaseException:
            self.mode = None
            self._to_balanced()
            self.mode = "balanced"
            raise
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - started
        self.switches.append({"from": self.mode, "to": mode, "seconds": seconds, "bytes": moved})
        log.info("performance mode %s: weights placed in %.3fs (%.2f GiB copied to the device)",
                 mode, seconds, moved / GIB)
        self.mode = mode
        return seconds

    def _to_fast(self) -> int:
        for streamer in self.streamers:
            streamer.uninstall()
        for block in self.packed:
            block.to_device(self.device)
        return self.host_bytes

    def _to_balanced(self) -> int:
        for block in self.packed:
            block.to_host()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()  # hand the fast-mode copies back: other programs may want them
        for streamer in self.streamers:
            streamer.install()
        return 0

    def close(self) -> None:
        """Take the stand-ins out of the models; the weights stay wherever they are."""
        for streamer in self.streamers:
            streamer.uninstall()

    def release(self) -> None:
        """Leave the pipeline as a plain one, every weight on the device, for other code to use."""
        self.use("fast")
        self.close()

    def stats(self) -> dict:
        return {"mode": self.mode, "plan": self.plan.summary(), "host_bytes": self.host_bytes,
                "prepare_seconds": self.prepare_seconds, "switches": list(self.switches),
                "streamers": [streamer.stats() for streamer in self.streamers]}
