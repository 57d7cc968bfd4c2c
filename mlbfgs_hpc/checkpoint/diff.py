"""Comparing two checkpoints entry by entry (``mlbfgs-ckpt diff``)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from .reader import CheckpointReader
from .tree import LazyTensor


def _resolve_value(value: Any) -> Any:
    return value() if isinstance(value, LazyTensor) else value


def _compare(a: Any, b: Any, atol: float | None) -> str | None:
    """Why ``a`` and ``b`` differ (bitwise when ``atol`` is None), or ``None``."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if a.dtype != b.dtype or a.shape != b.shape:
            return f"{a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"
        if atol is None or not a.is_floating_point():
            fa, fb = a.reshape(-1).contiguous(), b.reshape(-1).contiguous()
            view = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}.get(
                fa.element_size())
            if view is not None and not fa.is_complex():
                differ = fa.view(view) != fb.view(view)
            else:
                differ = ~((fa == fb) | (torch.isnan(fa) & torch.isnan(fb)))
            n = int(differ.sum())
            if n == 0:
                return None
            if a.is_floating_point():
                delta = (fa.double() - fb.double()).abs().nan_to_num(nan=math.inf).max()
                return f"{n} of {fa.numel()} elements differ (max |a-b| = {float(delta):.3g})"
            return f"{n} of {fa.numel()} elements differ"
        both_nan = torch.isnan(a) & torch.isnan(b)
        delta = (a.double() - b.double()).abs().masked_fill(both_nan, 0.0)
        delta = delta.nan_to_num(nan=math.inf)
        worst = float(delta.max()) if delta.numel() else 0.0
        if worst <= atol:
            return None
        return (f"{int((delta > atol).sum())} of {a.numel()} elements differ by more than "
                f"{atol:g} (max |a-b| = {worst:.3g})")
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return f"{type(a).__name__} vs {type(b).__name__}"
    if isinstance(a, float) and isinstance(b, float) and not isinstance(a, bool):
        if (math.isnan(a) and math.isnan(b)) or a == b:
            return None
        if atol is not None and abs(a - b) <= atol:
            return None
        return f"{a!r} vs {b!r}"
    return None if (type(a) is type(b) and a == b) else f"{a!r} vs {b!r}"


def diff_checkpoints(a: str | Path, b: str | Path, *, atol: float | None = None,
                     include_rng: bool = False) -> tuple[list[str], int]:
    """Differences between two checkpoints, compared entry by entry.

    Model entries, every optimizer tensor (mL-BFGS blocks by block index, whichever shard or
    world size wrote them), optimizer counters and param groups, scheduler state and ``extra``
    are compared; RNG states only with ``include_rng`` (they are per rank).

    Args:
        a: first checkpoint (or run directory).
        b: second checkpoint (or run directory).
        atol: absolute tolerance for floating values; ``None`` compares bitwise (NaN equals a
            NaN with the same bits).
        include_rng: also compare the per-rank RNG states.

    Returns:
        The list of differences (empty when they match) and the number of entries compared.
    """
    if atol is not None and not (math.isfinite(atol) and atol >= 0):
        raise ValueError(f"atol must be a finite number >= 0 or None, got {atol!r}")
    with CheckpointReader(path=a) as ra, CheckpointReader(path=b) as rb:
        ea = ra.entries(include_rng=include_rng)
        eb = rb.entries(include_rng=include_rng)
        diffs = [f"{key}: only in {ra.path}" for key in ea if key not in eb]
        diffs += [f"{key}: only in {rb.path}" for key in eb if key not in ea]
        compared = 0
        for key in ea:
            if key in eb:
                compared += 1
                reason = _compare(_resolve_value(ea[key]), _resolve_value(eb[key]), atol)
                if reason is not None:
                    diffs.append(f"{key}: {reason}")
    return diffs, compared
