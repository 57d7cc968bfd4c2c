"""The flat layout of a rank's owned blocks (mlbfgs_hpc.layout): pure bookkeeping."""

from __future__ import annotations

import pytest
import torch

from mlbfgs_hpc.blocks import ParamBlock
from mlbfgs_hpc.layout import Segment, build_local_layout


def _block(name: str, *sizes: int) -> ParamBlock:
    params = tuple(torch.zeros(n) for n in sizes)
    return ParamBlock(name=name, param_names=tuple(f"{name}.{i}" for i in range(len(sizes))),
                      params=params)


def test_module_docstring_example() -> None:
    blocks = [_block("x", 7), _block("ab", 3, 2), _block("cd", 4, 1)]
    x, (a, b), (c, d) = blocks[0].params, blocks[1].params, blocks[2].params
    groups = [{"params": [*x, a, b, d]}, {"params": [c]}]
    layout = build_local_layout(blocks=blocks, owned_blocks=range(1, 3), param_groups=groups)
    assert layout.owned_blocks == (1, 2)
    assert layout.block_slices == {1: slice(0, 5), 2: slice(5, 10)}
    assert layout.segments == (Segment(0, 5, 0), Segment(5, 9, 1), Segment(9, 10, 0))
    assert [id(p) for p in layout.params] == [id(a), id(b), id(c), id(d)]
    assert layout.param_sizes == [3, 2, 4, 1]
    assert layout.numel == 10 and layout.max_block_numel == 5


def test_one_group_across_blocks_is_one_segment() -> None:
    blocks = [_block("p", 2, 3), _block("q", 4)]
    groups = [{"params": [p for blk in blocks for p in blk.params]}]
    layout = build_local_layout(blocks=blocks, owned_blocks=[0, 1], param_groups=groups)
    assert layout.segments == (Segment(0, 9, 0),)
    assert layout.max_block_numel == 5


def test_rank_without_blocks() -> None:
    blocks = [_block("p", 2)]
    layout = build_local_layout(blocks=blocks, owned_blocks=range(1, 1),
                                param_groups=[{"params": list(blocks[0].params)}])
    assert layout.numel == 0 and layout.max_block_numel == 0
    assert layout.segments == () and layout.params == () and dict(layout.block_slices) == {}


def test_parameter_outside_every_group_is_rejected() -> None:
    blocks = [_block("p", 2, 2)]
    with pytest.raises(ValueError, match=r"'p\.1' of block 0 is in no param group"):
        build_local_layout(blocks=blocks, owned_blocks=[0],
                           param_groups=[{"params": [blocks[0].params[0]]}])


def test_optimizer_applies_each_group_lr_to_its_segment() -> None:
    """Two groups interleaved inside one block: the first step (d = g, no pairs yet, no
    momentum history) moves each parameter by its own group's lr times its gradient."""
    from mlbfgs_hpc.optimizer import MLBFGS

    a, b, c = (torch.nn.Parameter(torch.ones(n)) for n in (3, 2, 4))
    block = ParamBlock(name="abc", param_names=("a", "b", "c"), params=(a, b, c))
    opt = MLBFGS([{"params": [a, c], "lr": 0.1}, {"params": [b], "lr": 0.01}],
                 blocks=[block], grad_backend=None, momentum=0.0)
    for p in (a, b, c):
        p.grad = torch.full_like(p, 2.0)
    opt.step()
    torch.testing.assert_close(a.detach(), torch.full((3,), 0.8))
    torch.testing.assert_close(b.detach(), torch.full((2,), 0.98))
    torch.testing.assert_close(c.detach(), torch.full((4,), 0.8))
