"""Weight streaming on the CPU: the same ring, order and bookkeeping as on CUDA, with plain copies
instead of copies on a side stream (the only part that needs a GPU)."""

import pytest
import torch
from torch import nn

from fluxworker.engines.streaming import BlockStreamer, Packed, tensor_bytes, unique_tensors


class Block(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.up = nn.Linear(width, 2 * width)
        self.down = nn.Linear(2 * width, width)
        self.register_buffer("scale", torch.full((width,), 0.5))

    def forward(self, x):
        return x + self.down(torch.relu(self.up(x))) * self.scale


class Stack(nn.Module):
    def __init__(self, count: int = 6, width: int = 8):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(Block(width) for _ in range(count))

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


def streamer_for(stack: Stack, positions, cyclic=True, slots=2) -> BlockStreamer:
    packed = [(stack.blocks, i, Packed(stack.blocks[i], pin=False)) for i in positions]
    return BlockStreamer(packed, "cpu", slots=slots, cyclic=cyclic)


def inside(tensor: torch.Tensor, buffer: torch.Tensor) -> bool:
    start = buffer.data_ptr()
    return start <= tensor.data_ptr() < start + buffer.numel()


@pytest.fixture
def x():
    return torch.randn(3, 8, generator=torch.Generator().manual_seed(1))


def test_packing_keeps_values_and_points_every_tensor_into_one_host_buffer():
    block = Block(8)
    before = [t.detach().clone() for t in unique_tensors(block)]
    packed = Packed(block, pin=False)
    assert packed.nbytes >= tensor_bytes(block)
    for tensor, value in zip(unique_tensors(block), before):
        assert torch.equal(tensor, value)
        assert inside(tensor, packed.host)


def test_tied_weights_are_packed_once():
    block = Block(8)
    block.other = block.up  # the same Linear reachable twice
    packed = Packed(block, pin=False)
    assert len(packed.tensors) == 5  # up.weight, up.bias, down.weight, down.bias, scale


def test_a_streamed_stack_computes_exactly_what_the_resident_one_does(x):
    stack = Stack()
    expected = stack(x)
    streamer = streamer_for(stack, [1, 2, 4, 5])
    streamer.install()
    for _ in range(3):
        assert torch.equal(stack(x), expected)
    assert streamer.misses == 0
    streamer.uninstall()
    assert all(type(block) is Block for block in stack.blocks)
    assert torch.equal(stack(x), expected)


def test_a_block_runs_from_the_ring_and_goes_back_to_host_memory(x):
    stack = Stack()
    streamer = streamer_for(stack, [0, 3])
    seen = []
    inner = stack.blocks[3]
    inner.register_forward_pre_hook(lambda module, args: seen.append(
        any(inside(module.up.weight, slot) for slot in streamer.ring)))
    streamer.install()
    stack(x)
    assert seen == [True]
    host = streamer.blocks[1].host
    assert inside(inner.up.weight, host) and inside(inner.scale, host)


def test_the_next_blocks_are_fetched_in_order_and_around_the_end_of_a_pass(x):
    stack = Stack()
    streamer = streamer_for(stack, [0, 2, 4], slots=2)
    streamer.install()
    assert sorted(streamer.holder) == [0, 1]  # installing fetches the first two
    stack(x)
    # after block 4 (the last) the first two of the next pass are already there
    assert sorted(streamer.holder) == [0, 1]
    assert streamer.loads == 2 + 3  # two at install, then one per block run
    assert streamer.bytes_copied == sum(b.nbytes for b in streamer.blocks[:2]) + sum(b.nbytes for b in streamer.blocks)


def test_a_one_pass_streamer_holds_its_ring_only_while_the_pass_runs(x):
    stack = Stack()
    expected = stack(x)
    streamer = streamer_for(stack, [0, 1, 2, 3, 4, 5], cyclic=False)
    streamer.install()
    assert streamer.ring is None
    assert torch.equal(stack(x), expected)
    assert streamer.ring is None
    assert streamer.loads == 6


def test_blocks_called_out_of_order_are_refetched_and_still_correct(x):
    stack = Stack()
    expected_block = [block(x) for block in stack.blocks]
    streamer = streamer_for(stack, [0, 1, 2, 3, 4, 5])
    streamer.install()
    assert torch.equal(stack.blocks[4](x), expected_block[4])  # slots held 0 and 1
    assert streamer.misses == 1
    assert sorted(streamer.holder) == [0, 5]  # refilled from 4 on, in running order
    assert torch.equal(stack.blocks[0](x), expected_block[0])
    assert streamer.misses == 1
    assert torch.equal(stack.blocks[2](x), expected_block[2])
    assert streamer.misses == 2


def test_an_error_inside_a_block_leaves_the_streamer_usable(x):
    stack = Stack()
    expected = stack(x)
    streamer = streamer_for(stack, [1, 3])
    streamer.install()
    with pytest.raises(RuntimeError):
        stack(torch.randn(3, 5))  # wrong width: fails inside the first block
    assert torch.equal(stack(x), expected)
