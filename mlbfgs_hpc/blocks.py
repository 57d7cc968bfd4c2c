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


def check_blocks_cover(blocks: Sequence[ParamBlock], params: Sequence[torch.Tensor]) -> None:
    """Check that ``blocks`` cover exactly ``params``, once each, in one floating dtype and on
    one device (what the optimizer's flat buffers need).

    Raises:
        ValueError: naming the uncovered parameters (by index), the blocks' parameters that
            are not optimized (by name), or the mixed dtypes/devices.
    """
    in_params = {id(p) for p in params}
    in_blocks = [p for b in blocks for p in b.params]
    if len({id(p) for p in in_blocks}) != len(in_blocks):
        raise ValueError("blocks must not share parameters")
    names = {id(p): n for b in blocks for n, p in zip(b.param_names, b.params)}
    missing = [i for i, p in enumerate(params) if id(p) not in names]
    extra = [names[id(p)] for p in in_blocks if id(p) not in in_params]
    if missing or extra:
        raise ValueError(
            "blocks must cover exactly the optimized (trainable) parameters: "
            f"params not in any block (param index): {missing}; "
            f"block params not being optimized: {extra}")
    dtypes = {p.dtype for p in in_blocks}
    devices = {p.device for p in in_blocks}
    if len(dtypes) != 1 or len(devices) != 1 or not next(iter(dtypes)).is_floating_point:
        raise ValueError("params must share one floating dtype and one device, got "
                         f"dtypes {sorted(map(str, dtypes))}, devices "
                         f"{sorted(map(str, devices))}")


def _make_block(layers: Sequence[tuple[str, list[tuple[str, torch.Tensor]]]]) -> ParamBlock:
    name = layers[0][0] if len(layers) == 1 else f"{layers[0][0]}..{layers[-1][0]}"
    names = tuple(n for _, owned in layers for n, _ in owned)
    params = tuple(p for _, owned in layers for _, p in owned)
    return ParamBlock(name=name, param_names=names, params=params)
