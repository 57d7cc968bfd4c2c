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

Blocks hold every parameter, frozen ones (``requires_grad=False``) included, as a torch
optimizer's param groups do: the optimizer reads ``requires_grad`` and ``.grad`` at every
step (:mod:`mlbfgs_hpc.participation`), so a layer frozen now may be unfrozen later. Names
are canonical (:mod:`mlbfgs_hpc.naming`): the same for a model, its ``torch.compile``d
version and its DDP wrapper.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .naming import canonical_name, unwrap_model

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


def build_blocks(model: nn.Module, *, block_size: int | None = None) -> list[ParamBlock]:
    """Group a model's parameters into blocks of whole layers.

    Args:
        model: the model (``torch.compile``d or DDP-wrapped: the blocks are those of the
            module inside); its modules that directly own parameters are the layers.
        block_size: target parameter count of a block. Layers are appended to the current
            block until it holds at least ``block_size`` parameters. ``None`` (default) means
            one layer per block.

    Returns:
        The blocks in registration order. Every parameter, frozen or not, appears exactly
        once (tied parameters are counted at their first appearance), under its canonical
        name (:func:`~mlbfgs_hpc.naming.canonical_name`).

    Raises:
        ValueError: ``block_size`` is not a positive integer, the model has no parameters,
            or an embedding produces sparse gradients (``sparse=True``).
    """
    if block_size is not None and (not isinstance(block_size, int) or isinstance(block_size, bool)
                                   or block_size < 1):
        raise ValueError(f"block_size must be None or an integer >= 1, got {block_size!r}")
    target = 1 if block_size is None else block_size
    layers: list[tuple[str, list[tuple[str, torch.Tensor]]]] = []
    seen: set[int] = set()
    for module_name, module in unwrap_model(model).named_modules():
        module_name = canonical_name(module_name)
        owned = []
        for param_name, param in module.named_parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            full_name = f"{module_name}.{param_name}" if module_name else param_name
            owned.append((full_name, param))
        if owned:
            _refuse_sparse_gradients(module, [name for name, _ in owned])
            layers.append((module_name or "<root>", owned))
    if not layers:
        raise ValueError("model has no parameters to put into blocks")

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
            are not optimized (by name) and how to build matching blocks, or the mixed
            dtypes/devices.
    """
    in_params = {id(p) for p in params}
    in_blocks = [p for b in blocks for p in b.params]
    if len({id(p) for p in in_blocks}) != len(in_blocks):
        raise ValueError("blocks must not share parameters")
    names = {id(p): n for b in blocks for n, p in zip(b.param_names, b.params)}
    missing = [i for i, p in enumerate(params) if id(p) not in names]
    extra_params = [p for p in in_blocks if id(p) not in in_params]
    extra = [names[id(p)] for p in extra_params]
    if missing or extra:
        covered = [names[id(p)] for p in in_blocks if id(p) in in_params]
        raise ValueError(
            "blocks must cover exactly the optimized parameters: "
            f"params not in any block (param index): {missing}; "
            f"block params not being optimized: {extra}"
            + _cover_hint(covered, missing=bool(missing),
                          extra_frozen=bool(extra_params) and not any(
                              p.requires_grad for p in extra_params)))
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


def _cover_hint(covered: Sequence[str], *, missing: bool, extra_frozen: bool) -> str:
    """What to pass instead, for :func:`check_blocks_cover`'s error."""
    if missing:
        return ""
    if extra_frozen:
        return (". Frozen parameters may stay in the optimizer (it reads requires_grad at "
                "every step and leaves a frozen one untouched): pass all of the model's "
                "parameters, e.g. MLBFGS(model.parameters(), blocks=build_blocks(model))")
    prefix = _common_module(covered)
    if prefix:
        attribute = "".join(f"[{part}]" if part.isdigit() else f".{part}"
                            for part in prefix.split("."))
        return (f". To optimize only part of a model, build the blocks of that part: "
                f"blocks=build_blocks(model{attribute}) for the parameters under "
                f"'{prefix}.'")
    return (". To optimize only part of a model, build the blocks of that part: "
            "blocks=build_blocks(submodule) with MLBFGS(submodule.parameters(), ...)")


def _common_module(names: Sequence[str]) -> str:
    """The longest module path (dotted, without the parameter's own name) that every name
    lies under, e.g. ``head`` for ``head.weight``, ``head.bias``; '' if none."""
    paths = [name.split(".")[:-1] for name in names]
    if not paths:
        return ""
    common: list[str] = []
    for parts in zip(*paths):
        if len(set(parts)) != 1:
            break
        common.append(parts[0])
    return ".".join(common)


def _refuse_sparse_gradients(module: nn.Module, names: Sequence[str]) -> None:
    """mL-BFGS keeps dense buffers per block: refuse an embedding that makes sparse gradients
    at construction rather than fail inside the first step."""
    if getattr(module, "sparse", False) is True and isinstance(
            module, (nn.Embedding, nn.EmbeddingBag)):
        raise ValueError(
            f"{', '.join(names)}: {type(module).__name__}(sparse=True) produces sparse "
            "gradients, which MLBFGS cannot use (its state is dense per block): build it "
            "with sparse=False, or optimize it with an optimizer for sparse gradients "
            "(e.g. torch.optim.SparseAdam) and give MLBFGS the other parameters")
