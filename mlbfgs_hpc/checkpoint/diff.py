"""Comparing two checkpoints (``mlbfgs-ckpt diff``): the training state entry by entry, the
run metadata apart.

*Training state* is what decides how training continues: the model's parameters and buffers,
every optimizer tensor (mL-BFGS blocks by block index, whatever shard or world size wrote
them), the optimizer's counters and param groups, the LR scheduler, the data-order position
(``extra``) and, when asked, the per-rank RNG states. Only differences there count.

*Run metadata* differs between runs that agree: wall-clock time (``extra/elapsed_seconds``),
how the checkpoint came about (``extra/final``: at the end of the run, or on a signal that
arrived at the last step), creation time, host names, package versions, world size and the
run configuration (it names the run directory). It is reported apart and never counts as a
difference.

Tolerances follow ``numpy.allclose``: an element matches when ``|a - b| <= atol + rtol·|b|``;
NaN matches NaN and an infinity matches only the same infinity. Given ``atol`` alone, ``rtol``
is numpy's default 1e-5. Given ``rtol`` alone, the absolute floor ``atol`` is ``rtol`` times
the largest ``|b|`` of the entry (of the whole tensor): float rounding in a sum is relative to
the sum's scale, not to each element, so the elements of a tensor that happen to be near zero
(a parameter difference ``s``, a momentum buffer) are judged on the tensor's scale. That is
what makes ``--rtol 1e-4`` say "1 process and 2 ranks agree" when they differ only by the
order of float32 sums; numpy's fixed default ``atol=1e-8`` fails such elements at random.
Give both for numpy's exact rule. Without ``atol`` and ``rtol`` floating values are compared
bit for bit (any NaN still matches any NaN: the optimizer's diagnostics are NaN when
undefined). Integers and booleans are always exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .reader import CheckpointReader
from .tree import LazyTensor, flatten

#: Keys of ``extra`` that describe the run, not its training state (diff shows them apart):
#: wall-clock seconds, and whether the checkpoint was the run's final one.
RUN_METADATA_EXTRA_KEYS: tuple[str, ...] = ("elapsed_seconds", "final")
#: Groups of training-state entries, in the order the summary names them.
STATE_GROUPS: tuple[str, ...] = ("model", "optimizer", "scheduler", "extra", "rng")
#: numpy.allclose's default rtol, used when only atol is given.
NUMPY_RTOL = 1e-5
_BIT_INTS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@dataclass(frozen=True, kw_only=True)
class Tolerance:
    """``numpy.allclose`` tolerances: an element matches when ``|a-b| <= atol + rtol·|b|``.

    Use :meth:`from_options`; ``Tolerance()`` is bitwise comparison.

    Args:
        atol: absolute tolerance (>= 0); ``None``: bitwise, or (with ``rtol``) scaled.
        rtol: relative tolerance (>= 0), relative to the second checkpoint's value.
    """

    atol: float | None = None
    rtol: float | None = None

    @classmethod
    def from_options(cls, *, atol: float | None, rtol: float | None) -> Tolerance:
        """Bitwise when both are ``None``; ``atol`` alone: ``rtol`` is numpy's 1e-5; ``rtol``
        alone: the absolute floor is ``rtol`` × the entry's largest ``|b|`` (:meth:`floor`).

        Raises:
            ValueError: a tolerance is negative or not finite.
        """
        for name, value in (("atol", atol), ("rtol", rtol)):
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if atol is None and rtol is None:
            return cls()
        return cls(atol=None if atol is None else float(atol),
                   rtol=NUMPY_RTOL if rtol is None else float(rtol))

    @property
    def bitwise(self) -> bool:
        return self.atol is None and self.rtol is None

    def floor(self, scale: float) -> float:
        """The absolute tolerance for an entry whose largest finite ``|b|`` is ``scale``."""
        assert self.rtol is not None
        return self.rtol * scale if self.atol is None else self.atol

    def describe(self) -> str:
        if self.bitwise:
            return "bitwise"
        if self.atol is None:
            return f"within rtol={self.rtol:g}, atol = rtol × each entry's largest |b|"
        return f"within atol={self.atol:g}, rtol={self.rtol:g}"


@dataclass(frozen=True, kw_only=True)
class EntryDiff:
    """One training-state entry that differs.

    Attributes:
        key: the entry, e.g. ``optimizer/blocks/000001/rho``.
        reason: what differs, e.g. ``3 of 10 elements differ ... (max |a-b| = 1.5e-05)``.
    """

    key: str
    reason: str

    def __str__(self) -> str:
        return f"{self.key}: {self.reason}"


@dataclass(kw_only=True)
class GroupStats:
    """Per group of entries: how many were compared and differ, and the largest differences
    over all their elements (within tolerance or not)."""

    compared: int = 0
    differing: int = 0
    max_abs: float = 0.0
    max_rel: float = 0.0


@dataclass(frozen=True, kw_only=True)
class CheckpointDiff:
    """The outcome of :func:`compare_checkpoints`.

    Attributes:
        a: the first checkpoint directory.
        b: the second.
        tolerance: the tolerances used.
        compared: training-state entries present in both.
        differences: training-state entries that differ (or exist in one only).
        metadata: run metadata that differs (``"created: '...' vs '...'"``); never counted.
        groups: statistics per group (``model``, ``optimizer``, ...).
    """

    a: Path
    b: Path
    tolerance: Tolerance
    compared: int
    differences: list[EntryDiff]
    metadata: list[str]
    groups: dict[str, GroupStats] = field(default_factory=dict)

    @property
    def identical(self) -> bool:
        """No training-state entry differs (run metadata may)."""
        return not self.differences

    def summary(self) -> str:
        """One line: the verdict and the largest difference per group."""
        parts = []
        for name, stats in self.groups.items():
            text = f"{name} {stats.max_abs:.3g}"
            if stats.max_abs > 0:
                text += f" (rel {stats.max_rel:.3g})"
            if stats.differing:
                text += f" [{stats.differing} differ]"
            parts.append(text)
        how = self.tolerance.describe()
        verdict = (f"identical ({how}): {self.compared} entries match" if self.identical else
                   f"DIFFERENT ({how}): {len(self.differences)} of {self.compared} entries "
                   f"differ")
        return f"{verdict}; largest |a-b| per group: {', '.join(parts) or 'none'}"


def _group(key: str) -> str:
    return key.split("/", 1)[0]


def _resolve(value: Any) -> Any:
    return value() if isinstance(value, LazyTensor) else value


def _float_diff(a: torch.Tensor, b: torch.Tensor, tol: Tolerance
                ) -> tuple[int, float, float]:
    """(elements that differ, max |a-b|, max |a-b|/|b|) of two same-shape float tensors."""
    fa, fb = a.reshape(-1).double(), b.reshape(-1).double()
    equal = (fa == fb) | (torch.isnan(fa) & torch.isnan(fb))
    delta = (fa - fb).abs().nan_to_num(nan=math.inf, posinf=math.inf).masked_fill(equal, 0.0)
    if tol.bitwise:
        # Bit patterns, so -0.0 vs 0.0 counts; any NaN still matches any NaN.
        view = _BIT_INTS[a.element_size()]
        bits_differ = a.reshape(-1).view(view) != b.reshape(-1).view(view)
        differ = bits_differ & ~(torch.isnan(fa) & torch.isnan(fb))
    else:
        finite = torch.isfinite(fa) & torch.isfinite(fb)
        finite_b = fb.abs()[torch.isfinite(fb)]
        scale = float(finite_b.max()) if finite_b.numel() else 0.0
        bound = tol.floor(scale) + tol.rtol * fb.abs()  # type: ignore[operator]
        differ = ~equal & (~finite | (delta > bound))
    if delta.numel() == 0:
        return 0, 0.0, 0.0
    rel = torch.where(delta > 0, delta / fb.abs(), torch.zeros_like(delta))
    return int(differ.sum()), float(delta.max()), float(rel.nan_to_num(nan=math.inf).max())


def compare_values(a: Any, b: Any, tol: Tolerance) -> tuple[str | None, float, float]:
    """Why ``a`` and ``b`` differ (or ``None``), with the largest absolute and relative
    difference of their elements (0 for non-numbers)."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if a.dtype != b.dtype or a.shape != b.shape:
            return f"{a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}", math.inf, math.inf
        if a.is_complex():
            a, b = torch.view_as_real(a), torch.view_as_real(b)
        if a.is_floating_point():
            n, max_abs, max_rel = _float_diff(a, b, tol)
        else:  # integers and booleans: exact, whatever the tolerance
            n = int((a != b).sum())
            delta = (a.reshape(-1).double() - b.reshape(-1).double()).abs()
            max_abs = float(delta.max()) if delta.numel() else 0.0
            max_rel = float((delta / b.reshape(-1).double().abs()).nan_to_num(nan=0.0).max()
                            ) if n else 0.0
            tol = Tolerance()
        if n == 0:
            return None, max_abs, max_rel
        bound = "" if tol.bitwise else " by more than atol + rtol·|b|"
        rel = f", max rel {max_rel:.3g}" if a.is_floating_point() else ""
        return (f"{n} of {a.numel()} elements differ{bound} (max |a-b| = {max_abs:.3g}{rel})",
                max_abs, max_rel)
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return f"{type(a).__name__} vs {type(b).__name__}", math.inf, math.inf
    if isinstance(a, float) and isinstance(b, float):
        if a == b or (math.isnan(a) and math.isnan(b)):
            return None, 0.0, 0.0
        delta = abs(a - b) if math.isfinite(a - b) else math.inf
        rel = delta / abs(b) if b else math.inf
        if not tol.bitwise and math.isfinite(a) and math.isfinite(b) and \
                delta <= tol.floor(abs(b)) + tol.rtol * abs(b):  # type: ignore[operator]
            return None, delta, rel
        return f"{a!r} vs {b!r}", delta, rel
    return (None if (type(a) is type(b) and a == b) else f"{a!r} vs {b!r}"), 0.0, 0.0


def _metadata(reader: CheckpointReader) -> dict[str, Any]:
    """The run metadata of a checkpoint, flattened to ``key: value``."""
    manifest = reader.manifest
    extra = manifest.get("extra") or {}
    meta = {"world_size": manifest["world_size"], "created": manifest.get("created"),
            "hosts": sorted({s["host"] for s in manifest.get("shards", [])}),
            "block_owners": [b["rank"] for b in manifest["blocks"]],
            "versions": manifest.get("versions", {}), "config": manifest.get("config", {}),
            "extra": {k: extra[k] for k in RUN_METADATA_EXTRA_KEYS if k in extra}}
    out: dict[str, Any] = {}
    for key, value in meta.items():
        if isinstance(value, dict):
            flatten(value, key, out)
        else:
            out[key] = value
    return out


def _metadata_differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    lines = []
    for key in list(a) + [k for k in b if k not in a]:
        va, vb = a.get(key, "<absent>"), b.get(key, "<absent>")
        if va != vb:
            lines.append(f"{key}: {va!r} vs {vb!r}")
    return lines


def compare_checkpoints(a: str | Path, b: str | Path, *, atol: float | None = None,
                        rtol: float | None = None, include_rng: bool = False
                        ) -> CheckpointDiff:
    """Compare the training state of two checkpoints and list their run metadata apart.

    Args:
        a: first checkpoint (or run directory: its newest valid checkpoint).
        b: second checkpoint (or run directory); relative tolerances are relative to it.
        atol: absolute tolerance for floating values (``numpy.allclose`` semantics).
        rtol: relative tolerance for floating values. Both ``None``: bitwise; one of them
            ``None``: numpy's default for it (``atol=1e-8``, ``rtol=1e-5``).
        include_rng: also compare the per-rank RNG states (meaningful on equal world sizes).

    Raises:
        ValueError: a tolerance is negative or not finite.
        CheckpointError: a checkpoint cannot be read.
    """
    tol = Tolerance.from_options(atol=atol, rtol=rtol)
    with CheckpointReader(path=a) as ra, CheckpointReader(path=b) as rb:
        metadata_keys = {f"extra/{k}" for k in RUN_METADATA_EXTRA_KEYS}
        ea = {k: v for k, v in ra.entries(include_rng=include_rng).items()
              if k not in metadata_keys}
        eb = {k: v for k, v in rb.entries(include_rng=include_rng).items()
              if k not in metadata_keys}
        groups = {name: GroupStats() for name in STATE_GROUPS
                  if any(_group(k) == name for k in (*ea, *eb))}
        differences = [EntryDiff(key=k, reason=f"only in {ra.path}") for k in ea if k not in eb]
        differences += [EntryDiff(key=k, reason=f"only in {rb.path}") for k in eb if k not in ea]
        for entry in differences:
            groups.setdefault(_group(entry.key), GroupStats()).differing += 1
        compared = 0
        for key in ea:
            if key not in eb:
                continue
            compared += 1
            reason, max_abs, max_rel = compare_values(_resolve(ea[key]), _resolve(eb[key]), tol)
            stats = groups.setdefault(_group(key), GroupStats())
            stats.compared += 1
            stats.max_abs = max(stats.max_abs, max_abs)
            stats.max_rel = max(stats.max_rel, max_rel)
            if reason is not None:
                stats.differing += 1
                differences.append(EntryDiff(key=key, reason=reason))
        metadata = _metadata_differences(_metadata(ra), _metadata(rb))
        return CheckpointDiff(a=ra.path, b=rb.path, tolerance=tol, compared=compared,
                              differences=differences, metadata=metadata, groups=groups)


def diff_checkpoints(a: str | Path, b: str | Path, *, atol: float | None = None,
                     rtol: float | None = None, include_rng: bool = False
                     ) -> tuple[list[str], int]:
    """Training-state differences between two checkpoints (see :func:`compare_checkpoints`).

    Model entries, every optimizer tensor, optimizer counters and param groups, scheduler
    state and the data-order position in ``extra`` are compared; RNG states only with
    ``include_rng``. Run metadata (wall-clock time, whether the checkpoint was the final one,
    hosts, versions, configuration) is not.

    Returns:
        The differences as ``"key: reason"`` lines (empty when they match) and the number of
        entries compared.
    """
    result = compare_checkpoints(a, b, atol=atol, rtol=rtol, include_rng=include_rng)
    return [str(d) for d in result.differences], result.compared
