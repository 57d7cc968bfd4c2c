"""Where a rank's owned parameters sit in its flat buffers (pure bookkeeping, no tensors made).

A rank owns one contiguous run of blocks (:mod:`mlbfgs_hpc.partition`). Its flat buffers
(gradient, parameters, EMAs, direction) hold those blocks' parameters back to back, in block
order and, inside a block, in the block's parameter order. Per-group ``lr`` and
``weight_decay`` apply to *segments*: maximal runs of consecutive elements whose parameters
share one param group. Example, blocks 1 and 2 owned, ``a``/``b``/``c``/``d`` parameters::

    block            1            2
    params          a(3)  b(2)   c(4)  d(1)
    group            0     0      1     0
    flat slice      |aaa|bb|    |cccc|d|      block_slices {1: 0:5, 2: 5:10}
    segments        [0, 5) g0   [5, 9) g1  [9, 10) g0

Segments never merge across a change of group, so each gets one multiply with its group's
value; a run of one group that spans a block boundary is one segment.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .blocks import ParamBlock


@dataclass(frozen=True)
class Segment:
    """A run of owned elements ``[start, stop)`` that share one param group."""

    start: int
    stop: int
    group: int


@dataclass(frozen=True)
class LocalLayout:
    """One rank's view of the flat parameter vector.

    Attributes:
        owned_blocks: indices of the blocks this rank owns, in order.
        block_slices: each owned block's slice of the rank's flat buffers.
        segments: the runs of one param group, in order (:class:`Segment`).
        params: the owned parameters in flat order.
        max_block_numel: the largest owned block (0 if none): the size of the pair scratch.
    """

    owned_blocks: tuple[int, ...]
    block_slices: Mapping[int, slice]
    segments: tuple[Segment, ...]
    params: tuple[torch.Tensor, ...]
    max_block_numel: int

    @property
    def numel(self) -> int:
        """Elements this rank owns (the length of its flat buffers)."""
        return self.segments[-1].stop if self.segments else 0

    @property
    def param_sizes(self) -> list[int]:
        """``numel`` of each owned parameter, in flat order (to split the flat buffers)."""
        return [p.numel() for p in self.params]


def build_local_layout(*, blocks: Sequence[ParamBlock], owned_blocks: Iterable[int],
                       param_groups: Sequence[Mapping[str, Any]]) -> LocalLayout:
    """The flat layout of ``owned_blocks`` (a rank's contiguous run of ``blocks``).

    Args:
        blocks: every block of the model, in flat order.
        owned_blocks: the indices this rank owns (``Ownership.blocks_of(rank)``).
        param_groups: the optimizer's param groups (dicts with a ``"params"`` list); a
            parameter's group is the one whose list holds it.

    Raises:
        ValueError: an owned block holds a parameter that is in no param group.
    """
    group_of = {id(p): gi for gi, group in enumerate(param_groups) for p in group["params"]}
    owned = tuple(owned_blocks)
    segments: list[Segment] = []
    slices: dict[int, slice] = {}
    params: list[torch.Tensor] = []
    cursor = 0
    for b in owned:
        block = blocks[b]
        slices[b] = slice(cursor, cursor + block.numel)
        for name, p in zip(block.param_names, block.params, strict=True):
            if id(p) not in group_of:
                raise ValueError(f"parameter {name!r} of block {b} is in no param group")
            gi = group_of[id(p)]
            if segments and segments[-1].group == gi:
                segments[-1] = Segment(segments[-1].start, cursor + p.numel(), gi)
            else:
                segments.append(Segment(cursor, cursor + p.numel(), gi))
            params.append(p)
            cursor += p.numel()
    return LocalLayout(owned_blocks=owned, block_slices=slices, segments=tuple(segments),
                       params=tuple(params),
                       max_block_numel=max((blocks[b].numel for b in owned), default=0))
