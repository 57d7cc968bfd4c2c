"""Curvature pairs from the momentum snapshots, for every block a rank owns (every T steps).

For owned block k (its slice ``sl`` of the rank's flat buffers)::

    s = m_param[sl] − snap_param[sl]      y = m_grad[sl] − snap_grad[sl]     (DESIGN.md §1.3)
    pair_momentum p > 0:  s̄ ← p·s̄ + (1−p)·s,  ȳ likewise   (the authors' "double momentum")
    BlockCurvature.offer_pair(s, y)  →  damping, acceptance, the ring   (mlbfgs_hpc.curvature)

The pair is formed in scratch buffers as large as the largest block, so a rejected pair never
touches the ring. A block none of whose parameters had a gradient since its last snapshot has
``s = y = 0`` exactly (its EMAs were held, :mod:`mlbfgs_hpc.participation`): it offers no
pair (nothing was measured; offered, it would count as rejected). Only the blocks the caller
names as possibly idle are tested, so the usual pair step costs nothing more. The smoothed pairs are not part of the checkpointed state (the option is
off by default; a run that turns it on restarts the smoothing on resume).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

import torch

from .config import MLBFGSConfig
from .curvature import BlockCurvature


class PairFormer:
    """Forms and offers the owned blocks' pairs.

    Args:
        block_slices: owned block id → its slice of the flat buffers.
        curvature: owned block id → its curvature ring.
        config: the optimizer's constants (pair smoothing, damping, ...).
        numel: elements of the flat buffers (the owned slice).
        max_block_numel: elements of the largest owned block (scratch size).
        dtype: the buffers' dtype.
        device: the buffers' device.
    """

    def __init__(self, *, block_slices: Mapping[int, slice],
                 curvature: Mapping[int, BlockCurvature], config: MLBFGSConfig, numel: int,
                 max_block_numel: int, dtype: torch.dtype, device: torch.device) -> None:
        self.block_slices, self.curvature, self.config = block_slices, curvature, config
        kw = {"dtype": dtype, "device": device}
        smooth = numel if config.pair_momentum else 0
        self._smooth_s, self._smooth_y = torch.zeros(smooth, **kw), torch.zeros(smooth, **kw)
        self._s = torch.zeros(max_block_numel, **kw)
        self._y = torch.zeros(max_block_numel, **kw)
        self._h = torch.zeros(max_block_numel if config.double_damping else 0, **kw)

    def form_(self, state: Mapping[str, torch.Tensor], *, first: bool,
              maybe_still: Collection[int] = ()) -> None:
        """Offer every owned block its pair from the flat ``state`` (``m_param``, ``m_grad``
        and their snapshots); ``first``: the run's first pair (starts the smoothing);
        ``maybe_still``: blocks that may not have moved (skipped if ``s = y = 0``)."""
        p = self.config.pair_momentum
        for b, sl in self.block_slices.items():
            n = sl.stop - sl.start
            s, y = self._s[:n], self._y[:n]
            torch.sub(state["m_param"][sl], state["snap_param"][sl], out=s)
            torch.sub(state["m_grad"][sl], state["snap_grad"][sl], out=y)
            if b in maybe_still and not (bool(torch.count_nonzero(s))
                                         or bool(torch.count_nonzero(y))):
                continue
            if p:
                smooth_s, smooth_y = self._smooth_s[sl], self._smooth_y[sl]
                if first:
                    smooth_s.copy_(s)
                    smooth_y.copy_(y)
                else:
                    smooth_s.lerp_(s, 1.0 - p)
                    smooth_y.lerp_(y, 1.0 - p)
                s.copy_(smooth_s)
                y.copy_(smooth_y)
            self.curvature[b].offer_pair(s, y, config=self.config, scratch=self._h[:n])

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor this object allocated (for memory accounting)."""
        return [self._smooth_s, self._smooth_y, self._s, self._y, self._h]
