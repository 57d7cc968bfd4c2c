"""Collocation points of a PINN problem and the rank-independent ways to split them.

A :class:`CollocationPoints` holds three *point sets*, each a group of tensors of one length:

* ``interior``: ``(N, d)`` points where the PDE residual is evaluated;
* ``constraint``: ``(Nc, d)`` boundary / initial points with ``constraint_target`` ``(Nc,)``,
  the values the solution takes there;
* ``periodic``: ``(Np, d)`` pairs ``periodic_lower`` / ``periodic_upper`` of points on opposite
  faces of a periodic direction, where the solution must agree (empty for most problems).

:meth:`CollocationPoints.shard` and :meth:`CollocationPoints.select` act on every point set
alike, so a problem with an extra set needs no special handling by a trainer: ``sizes`` names
the sets, and ``points.select(**{name: index[name] for name in points.sizes})`` works for all.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ..data import shard_bounds

# Which tensor fields make up each point set; the fields of one set always have one length.
POINT_SETS: dict[str, tuple[str, ...]] = {
    "interior": ("interior",),
    "constraint": ("constraint", "constraint_target"),
    "periodic": ("periodic_lower", "periodic_upper"),
}


@dataclass(frozen=True, eq=False)
class CollocationPoints:
    """The collocation points of one PINN problem (or of one rank's shard, or a mini-batch).

    Args:
        interior: ``(N, d)`` PDE residual points.
        constraint: ``(Nc, d)`` boundary / initial points.
        constraint_target: ``(Nc,)`` values the solution must take at ``constraint``.
        periodic_lower: ``(Np, d)`` points on the lower face of a periodic direction, or
            ``None`` for none (stored as an empty ``(0, d)`` tensor).
        periodic_upper: ``(Np, d)`` their partners on the upper face (``None``: none).
    """

    interior: torch.Tensor
    constraint: torch.Tensor
    constraint_target: torch.Tensor
    periodic_lower: torch.Tensor | None = None
    periodic_upper: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.interior.dim() != 2:
            raise ValueError(f"interior must be (N, d), got shape {tuple(self.interior.shape)}")
        dim = self.interior.shape[1]
        empty = self.interior.new_empty((0, dim))
        for name in ("periodic_lower", "periodic_upper"):
            if getattr(self, name) is None:
                object.__setattr__(self, name, empty)  # frozen: the one place we fill defaults
        for name in ("constraint", "periodic_lower", "periodic_upper"):
            tensor = getattr(self, name)
            if tensor.dim() != 2 or tensor.shape[1] != dim:
                raise ValueError(f"{name} must be (n, {dim}), got shape {tuple(tensor.shape)}")
        if self.constraint_target.shape != (self.constraint.shape[0],):
            raise ValueError(
                f"constraint_target must be ({self.constraint.shape[0]},), "
                f"got shape {tuple(self.constraint_target.shape)}")
        if self.periodic_lower.shape != self.periodic_upper.shape:
            raise ValueError(
                f"periodic_lower {tuple(self.periodic_lower.shape)} and periodic_upper "
                f"{tuple(self.periodic_upper.shape)} must have one shape")

    @property
    def input_dim(self) -> int:
        """Number of coordinates of a point."""
        return self.interior.shape[1]

    @property
    def sizes(self) -> dict[str, int]:
        """Length of each point set: ``{"interior": N, "constraint": Nc, "periodic": Np}``."""
        return {name: getattr(self, fields[0]).shape[0] for name, fields in POINT_SETS.items()}

    @property
    def n_constraint_residuals(self) -> int:
        """Number of entries of a problem's constraint residual on these points (``Nc + Np``)."""
        return self.constraint.shape[0] + self.periodic_lower.shape[0]

    def _tensors(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def shard(self, *, rank: int, world_size: int) -> CollocationPoints:
        """Rank ``rank``'s contiguous shard of every point set (:func:`shard_bounds`).

        The shards of ranks ``0 .. world_size - 1``, concatenated in rank order, are exactly
        the whole sets, whatever ``world_size`` is.
        """
        parts = {}
        for fields in POINT_SETS.values():
            start, stop = shard_bounds(getattr(self, fields[0]).shape[0], rank=rank,
                                       world_size=world_size)
            parts.update({name: getattr(self, name)[start:stop] for name in fields})
        return CollocationPoints(**parts)

    def select(self, *, interior: torch.Tensor, constraint: torch.Tensor,
               periodic: torch.Tensor | None = None) -> CollocationPoints:
        """The rows ``interior`` / ``constraint`` / ``periodic`` (int64 indices or bool masks)
        of each point set, e.g. a collocation mini-batch.

        Args:
            interior: rows of the interior set.
            constraint: rows of the constraint set (its targets follow).
            periodic: rows of the periodic pairs; may be ``None`` only when there are none.
        """
        if periodic is None:
            if self.periodic_lower.shape[0]:
                raise ValueError("these points have periodic pairs: pass `periodic` indices too")
            periodic = torch.zeros(0, dtype=torch.long)
        indices = {"interior": interior, "constraint": constraint, "periodic": periodic}
        parts = {}
        for set_name, fields in POINT_SETS.items():
            index = indices[set_name].to(getattr(self, fields[0]).device)
            parts.update({name: getattr(self, name)[index] for name in fields})
        return CollocationPoints(**parts)

    def to(self, *args, **kwargs) -> CollocationPoints:
        """All tensors moved / cast as ``Tensor.to(*args, **kwargs)`` does (a device, a dtype)."""
        return CollocationPoints(**{name: tensor.to(*args, **kwargs)
                                    for name, tensor in self._tensors().items()})
