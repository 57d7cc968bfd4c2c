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
value; a run of one group that spans a block boundary is one segment. Each owned parameter
also has a :class:`ParamSpan`: its slice of the flat buffers and where it sits in its block
(to leave a parameter without gradient alone, :mod:`mlbfgs_hpc.participation`)::

    param spans     a: [0, 3) block 0 +0   b: [3, 5) block 0 +3   c: [5, 9) block 1 +0 ...
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
class ParamSpan:
    """Where one owned parameter sits: ``[start, stop)`` of the rank's flat buffers, and
    ``block`` (the position of its block among the rank's owned blocks) with ``offset``, its
    first element inside that block."""

    start: int
    stop: int
    block: int
    offset: int


@dataclass(frozen=True)
class LocalLayout:
    """One rank's view of the flat parameter vector.

    Attributes:
        owned_blocks: indices of the blocks this rank owns, in order.
        block_slices: each owned block's slice of the rank's flat buffers.
        segments: the runs of one param group, in order (:class:`Segment`).
        params: the owned parameters in flat order.
        max_block_numel: the largest owned block (0 if none): the size of the pair scratch.
        param_spans: each owned parameter's :class:`ParamSpan`, in flat order.
        first_param: the layout index (over every block's parameters, in block order) of the
            first owned parameter; the owned ones follow it contiguously.
    """

    owned_blocks: tuple[int, ...]
    block_slices: Mapping[int, slice]
    segments: tuple[Segment, ...]
    params: tuple[torch.Tensor, ...]
    max_block_numel: int
    param_spans: tuple[ParamSpan, ...] = ()
    first_param: int = 0

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
    spans: list[ParamSpan] = []
    cursor = 0
    for position, b in enumerate(owned):
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
            spans.append(ParamSpan(start=cursor, stop=cursor + p.numel(), block=position,
                                   offset=cursor - slices[b].start))
            cursor += p.numel()
    first = sum(len(blocks[b].params) for b in range(owned[0])) if owned else 0
    return LocalLayout(owned_blocks=owned, block_slices=slices, segments=tuple(segments),
                       params=tuple(params),
                       max_block_numel=max((blocks[b].numel for b in owned), default=0),
                       param_spans=tuple(spans), first_param=first)
