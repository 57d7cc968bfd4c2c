"""Blocks: contiguous runs of whole layers, the unit of the block-diagonal Hessian.

A *layer* is a module that owns parameters directly (``recurse=False``), taken in
registration order. A *block* is a run of consecutive layers whose parameter count reaches
``block_size`` (the last block may be smaller). The blocks of a model depend only on the model
and ``block_size``, never on the number of ranks, so the mathematics and checkpoints are the
same on 1 or 512 ranks::

    model layers:   conv1 (896)  conv2 (18k)  fc1 (401k)  fc2 (1.3k)
    block_size=None ->  [conv1] [conv2] [fc1] [fc2]        one layer per block (default)
    block_size=20000 -> [conv1 conv2] [fc1] [fc2]          runs of layers reaching 20k params

Without a model (plain ``params`` given to :class:`~mlbfgs_hpc.MLBFGS`) each parameter tensor
is its own block, the closest we can get to "one layer per block" without module structure.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ParamBlock:
    """One block: named parameter tensors laid out contiguously in the flat vector.

    Attributes:
        name: a readable name (the block's first and last layer).
        param_names: the fully qualified names of the parameters, in layout order.
        params: the parameter tensors themselves, in the same order.
    """

    name: str
    param_names: tuple[str, ...]
    params: tuple[torch.Tensor, ...]

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.params)

    @property
    def shapes(self) -> tuple[tuple[int, ...], ...]:
        return tuple(tuple(p.shape) for p in self.params)


def build_blocks(model: torch.nn.Module, *, block_size: int | None = None) -> list[ParamBlock]:
    """Group a model's trainable parameters into blocks of whole layers.

    Args:
        model: the model; its modules that directly own trainable parameters are the layers.
        block_size: target parameter count of a block. Layers are appended to the current
            block until it holds at least ``block_size`` parameters. ``None`` (default) means
            one layer per block.

    Returns:
        The blocks in registration order. Every trainable parameter appears exactly once
        (tied parameters are counted at their first appearance).

    Raises:
        ValueError: ``block_size`` is not a positive integer, or the model has no trainable
            parameters.
    """
    if block_size is not None and (not isinstance(block_size, int) or isinstance(block_size, bool)
                                   or block_size < 1):
        raise ValueError(f"block_size must be None or an integer >= 1, got {block_size!r}")
    target = 1 if block_size is None else block_size
    layers: list[tuple[str, list[tuple[str, torch.Tensor]]]] = []
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        owned = []
        for param_name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            full_name = f"{module_name}.{param_name}" if module_name else param_name
            owned.append((full_name, param))
        if owned:
            layers.append((module_name or "<root>", owned))
    if not layers:
        raise ValueError("model has no trainable parameters to put into blocks")

    blocks: list[ParamBlock] = []
    current: list[tuple[str, list[tuple[str, torch.Tensor]]]] = []
    current_numel = 0
    for layer in layers:
        current.append(layer)
        current_numel += sum(p.numel() for _, p in layer[1])
        if current_numel >= target:
            blocks.append(_make_block(current))
            current, current_numel = [], 0
    if current:
        blocks.append(_make_block(current))
    logger.debug("built %d blocks from %d layers", len(blocks), len(layers))
    return blocks


def blocks_from_parameters(params: Iterable[torch.Tensor]) -> list[ParamBlock]:
    """One block per parameter tensor, named ``param.<index>`` (used without a model)."""
    return [ParamBlock(name=f"param.{i}", param_names=(f"param.{i}",), params=(p,))
            for i, p in enumerate(params)]


def _make_block(layers: Sequence[tuple[str, list[tuple[str, torch.Tensor]]]]) -> ParamBlock:
    name = layers[0][0] if len(layers) == 1 else f"{layers[0][0]}..{layers[-1][0]}"
    names = tuple(n for _, owned in layers for n, _ in owned)
    params = tuple(p for _, owned in layers for _, p in owned)
    return ParamBlock(name=name, param_names=names, params=params)
