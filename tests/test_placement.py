"""Balanced-mode planning and the moves between performance modes, on the CPU with a tiny FLUX.

The CPU stands in for the GPU here: the same plan, packing and moves run, with plain copies where
CUDA would copy on a side stream from page-locked memory; memory figures are the weights' bytes.
"""

import logging

import pytest
import torch

from conftest import tiny_flux_pipeline
from fluxworker.engines.placement import (
    Placement,
    encoder_places,
    pipeline_modules,
    plan_balanced,
    spread,
    transformer_places,
)
from fluxworker.engines.streaming import tensor_bytes


def sizes(pipe):
    blocks = [tensor_bytes(m[i]) for m, i in transformer_places(pipe.transformer)]
    encoder = [tensor_bytes(m[i]) for m, i in encoder_places(pipe.text_encoder_2)]
    total = sum(tensor_bytes(m) for m in pipeline_modules(pipe))
    return blocks, encoder, total


def test_spread_streams_every_other_block_of_equal_ones():
    assert spread([10] * 10, 50) == [0, 2, 4, 6, 8]


def test_spread_reaches_the_bytes_needed_and_mixes_sizes():
    block_sizes = [7] * 4 + [3] * 8
    chosen = spread(block_sizes, 30)
    assert sum(block_sizes[i] for i in chosen) >= 30
    assert any(i < 4 for i in chosen) and any(i >= 4 for i in chosen)


def test_spread_streams_nothing_or_everything_at_the_extremes():
    assert spread([5, 5, 5], 0) == []
    assert spread([5, 5, 5], 15) == [0, 1, 2]
    assert spread([5, 5, 5], 100) == [0, 1, 2]


def test_a_budget_that_holds_everything_streams_nothing():
    pipe = tiny_flux_pipeline()
    _, _, total = sizes(pipe)
    plan = plan_balanced(pipe, budget_bytes=total + 10_000, reserve_bytes=10_000)
    assert plan.transformer_streamed == [] and plan.encoder_streamed == []
    assert plan.expected_peak_bytes == total + 10_000


def test_t5_streams_before_the_transformer_does():
    pipe = tiny_flux_pipeline()
    blocks, encoder, total = sizes(pipe)
    reserve = 200_000
    plan = plan_balanced(pipe, budget_bytes=total - sum(encoder) + reserve, reserve_bytes=reserve)
    assert plan.encoder_streamed == list(range(len(encoder)))
    assert plan.transformer_streamed == []


def test_a_tighter_budget_streams_transformer_blocks_and_stays_within_it():
    pipe = tiny_flux_pipeline()
    blocks, encoder, total = sizes(pipe)
    reserve = 200_000
    budget = total - sum(encoder) + reserve - 1
    plan = plan_balanced(pipe, budget_bytes=budget, reserve_bytes=reserve)
    assert plan.transformer_streamed and len(plan.transformer_streamed) < len(blocks)
    assert plan.expected_peak_bytes <= budget
    assert plan.streamed_per_step == sum(blocks[i] for i in plan.transformer_streamed)


def test_a_budget_too_small_for_the_fixed_parts_streams_everything_and_says_so(caplog):
    pipe = tiny_flux_pipeline()
    blocks, _, _ = sizes(pipe)
    with caplog.at_level(logging.WARNING):
        plan = plan_balanced(pipe, budget_bytes=1000, reserve_bytes=100)
    assert plan.transformer_streamed == list(range(len(blocks)))
    assert "over its budget" in caplog.text


@pytest.fixture
def placement():
    pipe = tiny_flux_pipeline()
    blocks, encoder, total = sizes(pipe)
    reserve = 200_000
    plan = plan_balanced(pipe, budget_bytes=total - sum(encoder) + reserve - 1, reserve_bytes=reserve)
    return pipe, Placement(pipe, "cpu", plan, pin=False)


def test_switching_modes_moves_only_the_streamed_blocks_and_never_packs_again(placement):
    pipe, placement = placement
    hosts = [block.host.data_ptr() for block in placement.packed]
    resident = pipe.vae.decoder.conv_out.weight.data_ptr()
    placement.use("fast")
    assert placement.switches[-1]["bytes"] == placement.host_bytes > 0
    placement.use("balanced")
    assert placement.switches[-1]["bytes"] == 0
    placement.use("fast")
    assert placement.use("fast") == 0.0  # already there: nothing to do
    assert [block.host.data_ptr() for block in placement.packed] == hosts
    assert pipe.vae.decoder.conv_out.weight.data_ptr() == resident  # resident weights never move
    assert [(s["from"], s["to"]) for s in placement.switches] == [
        (None, "fast"), ("fast", "balanced"), ("balanced", "fast")]


def test_in_balanced_mode_streamed_blocks_live_in_host_memory_behind_stand_ins(placement):
    pipe, placement = placement
    placement.use("balanced")
    places = transformer_places(pipe.transformer)
    for position in placement.plan.transformer_streamed:
        modules, index = places[position]
        assert type(modules[index]).__name__ == "_StreamedBlock"
    for block in placement.packed:
        assert all(block.host.data_ptr() <= t.data_ptr() < block.host.data_ptr() + block.nbytes
                   for t in block.tensors)
    placement.use("fast")
    for position in placement.plan.transformer_streamed:
        modules, index = places[position]
        assert type(modules[index]).__name__ != "_StreamedBlock"
    for block in placement.packed:
        assert not any(block.host.data_ptr() <= t.data_ptr() < block.host.data_ptr() + block.nbytes
                       for t in block.tensors)


def test_release_leaves_a_plain_pipeline(placement):
    pipe, placement = placement
    placement.use("balanced")
    placement.release()
    assert placement.mode == "fast"
    assert not any(type(m).__name__ == "_StreamedBlock" for m in pipe.transformer.modules())
    assert not any(type(m).__name__ == "_StreamedBlock" for m in pipe.text_encoder_2.modules())


def test_a_move_to_fast_that_runs_out_of_memory_falls_back_to_balanced(placement, monkeypatch):
    # Stands in for the GPU refusing an allocation halfway through the move (CUDA only).
    from fluxworker.engines import streaming

    pipe, placement = placement
    placement.use("balanced")
    calls = []
    original = streaming.Packed.to_device

    def refuse_the_second(self, device):
        calls.append(self)
        if len(calls) == 2:
            raise torch.OutOfMemoryError("CUDA out of memory")
        original(self, device)

    monkeypatch.setattr(streaming.Packed, "to_device", refuse_the_second)
    with pytest.raises(torch.OutOfMemoryError):
        placement.use("fast")
    assert placement.mode == "balanced"
    for block in placement.packed:
        assert all(block.host.data_ptr() <= t.data_ptr() < block.host.data_ptr() + block.nbytes
                   for t in block.tensors)
    assert all(streamer.installed for streamer in placement.streamers)
    monkeypatch.undo()
    placement.use("fast")
    assert placement.mode == "fast"
